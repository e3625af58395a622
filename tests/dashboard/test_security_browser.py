"""The dashboard's security in headless Chromium: switching tenants, hostile text shown as text (no script
of a user's ever runs), and the admin pages accessible and within the strict Content-Security-Policy."""

from __future__ import annotations

import re
from collections.abc import Iterable

import httpx
from playwright.async_api import Browser, Dialog, Page
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.auth.users import LOCAL_ISSUER
from app.config import Settings
from tests.support.browser import axe_violations, csp_violations, local_user, new_page, sign_in
from tests.support.runs import create_workflow, name, start_run, wait_run
from tests.support.signin import grant
from tests.support.tenants import MakeTenant

SCRIPT = "<script>alert(1)</script>"
IMG = "<img src=x onerror=alert(1)>"


def dialogs(page: Page) -> list[str]:
    """A list that fills with the message of every alert/confirm/prompt the page opens (dismissed)."""
    opened: list[str] = []

    async def dismiss(dialog: Dialog) -> None:
        opened.append(dialog.message)
        await dialog.dismiss()

    page.on("dialog", dismiss)
    return opened


async def main_text(page: Page, url: str) -> str:
    response = await page.goto(url)
    assert response is not None and response.status == 200, (url, response and response.status)
    return await page.text_content("main") or ""


async def test_a_user_of_two_tenants_switches_with_the_header_and_sees_the_others_runs(
    browser: Browser, base_url: str, client: httpx.AsyncClient, make_tenant: MakeTenant,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    first, second = await make_tenant(), await make_tenant()
    runs = {}
    for tenant in (first, second):
        workflow = name()
        await create_workflow(client, tenant.headers, workflow, [{"id": "w", "wait": {"signal": "go"}}])
        runs[tenant.tenant_id] = (await start_run(client, tenant.headers, workflow))["id"]
    person = await local_user(sessionmaker, first.tenant_id, roles=("viewer",))
    await grant(sessionmaker, second.tenant_id, LOCAL_ISSUER, person.username, ("operator",))
    page = await new_page(browser, base_url)
    refused = csp_violations(page)
    await sign_in(page, person, next_="/runs")

    by_name = {first.name: first, second.name: second}
    active = by_name[(await page.inner_text("#tenant-switch option:checked")).strip()]
    other = second if active is first else first
    assert runs[active.tenant_id] in await page.content()
    assert runs[other.tenant_id] not in await page.content()
    assert await axe_violations(page) == []

    await page.select_option("#tenant-switch", str(other.tenant_id))
    async with page.expect_navigation():
        await page.click("form[action='/auth/tenant'] button[type=submit]")
    await page.goto("/runs")
    assert (await page.inner_text("#tenant-switch option:checked")).strip() == other.name
    assert runs[other.tenant_id] in await page.content()
    assert runs[active.tenant_id] not in await page.content()
    assert (await page.inner_text(".roles")).strip() == ("operator" if other is second else "viewer")
    # The other tenant's run is the 404 page from here, as any unknown run.
    response = await page.goto(f"/runs/{runs[active.tenant_id]}")
    assert response is not None and response.status == 404
    assert refused == []


async def test_hostile_text_is_shown_as_text_and_never_runs(
    browser: Browser, base_url: str, client: httpx.AsyncClient, make_tenant: MakeTenant, worker: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    tenant = await make_tenant()
    echoed, gated, rejected = name(), name(), name()
    await create_workflow(client, tenant.headers, echoed, [{"id": "e", "tool": "echo", "args": {"html": IMG}}])
    await create_workflow(client, tenant.headers, gated, [{"id": "ok", "approval": {"reason": SCRIPT}}])
    await create_workflow(client, tenant.headers, rejected, [{"id": "ok", "approval": {"reason": "r"}}])
    echo_run = await wait_run(client, tenant.headers, (await start_run(client, tenant.headers, echoed,
                                                                        {"note": SCRIPT}))["id"])
    assert echo_run["status"] == "succeeded", echo_run
    await start_run(client, tenant.headers, gated)
    refused_run = await start_run(client, tenant.headers, rejected)
    approval = (await client.get("/api/v1/approvals", params={"run": refused_run["id"]},
                                 headers=tenant.headers)).json()["items"][0]
    # Free text of the admin pages: a member's name, an API key's name, an identity-provider group.
    for answer in (
        await client.post("/api/v1/members", json={"subject": SCRIPT, "name": IMG, "roles": ["viewer"]},
                          headers=tenant.headers),
        await client.post("/api/v1/api-keys", json={"name": SCRIPT, "roles": ["viewer"]}, headers=tenant.headers),
        await client.put("/api/v1/settings", json={"role_mapping": {IMG: ["viewer"]}}, headers=tenant.headers),
    ):
        assert answer.status_code in (200, 201), answer.text
    admin = await local_user(sessionmaker, tenant.tenant_id, roles=("admin",))
    page = await new_page(browser, base_url)
    opened, refused = dialogs(page), csp_violations(page)
    await sign_in(page, admin, next_="/approvals")
    # An approval comment typed in the browser (four-eyes: the admin did not start the run).
    await page.fill(f"#comment-{approval['id']}", IMG)
    async with page.expect_navigation():
        await page.click(f"form[action='/approvals/{approval['id']}'] button[value=reject]")
    decided = (await client.get(f"/api/v1/approvals/{approval['id']}", headers=tenant.headers)).json()
    assert (decided["status"], decided["comment"]) == ("rejected", IMG), decided

    shown: dict[str, tuple[str, ...]] = {
        "/runs": (),
        f"/runs/{echo_run['id']}": (SCRIPT, IMG),  # run input, its output (JSON views)
        f"/runs/{refused_run['id']}?tab=events": (IMG,),  # the rejection's comment, in the run's events
        "/approvals": (SCRIPT,),
        "/workflows": (),
        f"/workflows/{echoed}": (IMG,),
        "/admin/members": (SCRIPT, IMG),
        "/admin/keys": (SCRIPT,),
        "/admin/settings": (IMG,),
    }
    for url, texts in shown.items():
        text = await main_text(page, url)
        for hostile in texts:
            assert hostile in text, (url, hostile, text[:2000])
        assert await page.locator("main img, main script").count() == 0, url
    assert opened == [] and refused == []


async def test_the_admin_pages_pass_axe_within_the_policy(
    browser: Browser, base_url: str, make_tenant: MakeTenant, sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    tenant = await make_tenant()
    admin = await local_user(sessionmaker, tenant.tenant_id, roles=("admin",))
    page = await new_page(browser, base_url)
    opened, refused = dialogs(page), csp_violations(page)
    await sign_in(page, admin, next_="/admin/members")
    assert await axe_violations(page) == []

    # Fill the forms as a person would, checking each page the answers lead to.
    await page.goto("/admin/secrets")
    await page.fill("#secret-name", "openai_key")
    await page.fill("#secret-value", "sk-never-shown")
    await submit(page, "Set secret")
    assert "openai_key" in await page.inner_text("main") and "sk-never-shown" not in await page.content()
    assert await page.input_value("#secret-value") == ""

    await page.goto("/admin/providers")
    await page.fill("#provider-name", "openai")
    await page.fill("#provider-base-url", "https://api.openai.com/v1")
    await page.fill("#provider-secret", "openai_key")
    await page.fill("#provider-models", "gpt-4o 2.50 10.00")
    await submit(page, "Add provider")
    assert page.url.endswith("/admin/providers/openai")

    await page.goto("/admin/keys")
    await page.fill("#key-name", "deploys")
    await page.check("input[name=role_operator]")
    await submit(page, "Create key")
    key = await page.input_value("#new-key-value")
    assert re.fullmatch(r"stw_\S+", key), key
    assert await axe_violations(page) == [], "the new key's page"

    await page.goto("/admin/settings")
    await page.fill("#approval_timeout_s", "-1")
    await submit(page, "Save settings")
    assert await page.locator("#approval_timeout_s-error").count() == 1
    assert await axe_violations(page) == [], "the settings form with an error"

    for url in ("/admin/members", "/admin/keys", "/admin/settings", "/admin/providers", "/admin/providers/openai",
                "/admin/secrets"):
        await main_text(page, url)
        assert await axe_violations(page) == [], url
        assert await page.locator("nav[aria-label=Admin] a[aria-current=page]").count() == 1, url
    await check_phone_width(page, ("/admin/members", "/admin/keys", "/admin/settings", "/admin/providers",
                                   "/admin/secrets"))
    assert opened == [] and refused == []


async def submit(page: Page, label: str) -> None:
    async with page.expect_navigation():
        await page.get_by_role("button", name=label).click()


async def check_phone_width(page: Page, urls: Iterable[str]) -> None:
    """At a phone's width the page does not scroll sideways: wide tables scroll in their own box."""
    await page.set_viewport_size({"width": 390, "height": 800})
    for url in urls:
        await page.goto(url)
        widths = await page.evaluate("() => [document.documentElement.scrollWidth,"
                                     " document.documentElement.clientWidth]")
        assert widths[0] <= widths[1], (url, widths)
        assert await axe_violations(page) == [], url
