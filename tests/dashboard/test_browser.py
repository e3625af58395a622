"""The dashboard in headless Chromium: sign-in through the browser, axe-core on the pages, and the vendored
htmx served by the app and running under its strict Content-Security-Policy."""

from __future__ import annotations

import json
from typing import Any

from playwright.async_api import Browser, Page
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from app.security_headers import CSP
from tests.support.browser import (
    axe_violations,
    csp_violations,
    local_admin,
    local_user,
    new_page,
    sign_in,
)
from tests.support.env import ROOT
from tests.support.tenants import MakeTenant

HTMX = ROOT / "static" / "vendor" / "htmx"
HTMX_URL = "/static/vendor/htmx/htmx.min.js"
# What the dashboard's pages put in their <head> before htmx: htmx's own indicator styles would be an
# inline <style>, which the policy refuses (dashboard.css styles .htmx-indicator instead).
HTMX_CONFIG: dict[str, object] = {"includeIndicatorStyles": False}


def pinned_htmx_version() -> str:
    """The version static/vendor/htmx/VERSION states (written by scripts/vendor-static.py)."""
    package, version = (HTMX / "VERSION").read_text().split()[:2]
    assert package == "htmx.org"
    return version


async def me(page: Page) -> dict[str, Any]:
    """``/auth/me`` with the page's cookies: who the browser is signed in as."""
    response = await page.context.request.get("/auth/me")
    assert response.status == 200, await response.text()
    found: dict[str, Any] = json.loads(await response.text())
    return found


async def test_sign_in_page_and_the_page_after_it_pass_axe(browser: Browser, base_url: str, settings: Settings,
                                                          make_tenant: MakeTenant) -> None:
    tenant = await make_tenant()
    admin = await local_admin(settings, tenant.tenant_id)
    page = await new_page(browser, base_url)
    refused = csp_violations(page)

    response = await page.goto("/auth/login")
    assert response is not None and response.headers["content-security-policy"] == CSP
    assert await axe_violations(page) == []

    await sign_in(page, admin, next_="/runs")
    user = (await me(page))["user"]
    assert (user["issuer"], user["subject"]) == ("local", "admin")
    assert await axe_violations(page) == []
    assert refused == []


async def test_axe_violations_reports_what_it_finds(browser: Browser, base_url: str) -> None:
    """The check above could not pass by finding nothing: an image without a text alternative is caught."""
    page = await new_page(browser, base_url)
    await page.goto("/auth/login")
    await page.evaluate("document.querySelector('main').append(document.createElement('img'))")
    found = await axe_violations(page)
    assert [(v["id"], v["impact"], v["nodes"]) for v in found] == [("image-alt", "critical", ["img"])], found
    assert await axe_violations(page, impacts=("minor",)) == []


async def test_a_local_user_signs_in_with_their_roles(browser: Browser, base_url: str, make_tenant: MakeTenant,
                                                      sessionmaker: async_sessionmaker[AsyncSession]) -> None:
    tenant = await make_tenant()
    operator = await local_user(sessionmaker, tenant.tenant_id, roles=("operator",))
    page = await new_page(browser, base_url)
    await sign_in(page, operator, next_="/auth/me")
    who = await me(page)
    assert (who["user"]["issuer"], who["user"]["subject"]) == ("local", operator.username)
    assert who["tenant"] == {"id": str(tenant.tenant_id), "name": tenant.name, "roles": ["operator"]}
    assert [t["id"] for t in who["tenants"]] == [str(tenant.tenant_id)]


async def test_vendored_htmx_is_served_as_javascript(browser: Browser, base_url: str) -> None:
    page = await new_page(browser, base_url)
    response = await page.goto(HTMX_URL)
    assert response is not None and response.status == 200
    assert response.headers["content-type"].split(";")[0] in ("text/javascript", "application/javascript")
    assert await response.body() == (HTMX / "htmx.min.js").read_bytes()


async def add_htmx(page: Page, config: dict[str, object] | None) -> None:
    """Load the vendored htmx into ``page`` with a <script src>, as a dashboard page does (``config``: the
    htmx-config meta element first)."""
    if config is not None:
        await page.evaluate("""(config) => {
            const meta = document.createElement("meta");
            meta.name = "htmx-config";
            meta.content = JSON.stringify(config);
            document.head.append(meta);
        }""", config)
    await page.evaluate("""(src) => new Promise((resolve, reject) => {
        const script = document.createElement("script");
        script.src = src;
        script.onload = resolve;
        script.onerror = () => reject(new Error("could not load " + src));
        document.head.append(script);
    })""", HTMX_URL)


async def test_vendored_htmx_runs_under_the_strict_policy(browser: Browser, base_url: str) -> None:
    page = await new_page(browser, base_url)
    refused = csp_violations(page)
    response = await page.goto("/auth/login")
    assert response is not None and response.headers["content-security-policy"] == CSP

    await add_htmx(page, HTMX_CONFIG)
    assert await page.evaluate("htmx.version") == pinned_htmx_version()
    # A swap: htmx fetches a fragment from the app and puts it in the page.
    await page.evaluate("""() => {
        const target = document.createElement("div");
        target.id = "swapped";
        target.setAttribute("hx-get", "/static/vendor/htmx/VERSION");
        target.setAttribute("hx-trigger", "load");
        document.body.append(target);
        htmx.process(target);
    }""")
    await page.wait_for_function("() => document.getElementById('swapped').textContent.startsWith('htmx.org')")
    assert refused == []


async def test_htmx_indicator_styles_would_break_the_policy(browser: Browser, base_url: str) -> None:
    """Why pages set ``includeIndicatorStyles: false``: htmx's default adds an inline <style> the policy refuses."""
    page = await new_page(browser, base_url)
    refused = csp_violations(page)
    await page.goto("/auth/login")
    async with page.expect_console_message(lambda m: "Content Security Policy" in m.text) as message:
        await add_htmx(page, None)
    assert "Applying inline style violates" in (await message.value).text, refused
