"""A run's page in headless Chromium: its tabs pass axe-core under the strict policy, and a person pauses,
resumes, cancels, retries, signals and starts a run again from it."""

from __future__ import annotations

import json

import httpx
from playwright.async_api import Browser, Page
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from tests.support.browser import axe_violations, csp_violations, local_user, new_page, sign_in
from tests.support.runs import create_workflow, name, run_events, start_run, step, wait_for, wait_run
from tests.support.tenants import MakeTenant, TenantKey

XSS = "<script>alert(1)</script>"
RUN_STATUS = "() => document.querySelector('#run-live .status')?.textContent.trim()"
TABS = ("graph", "timeline", "steps", "events", "reasoning", "budget")
WAITS = [{"id": "w", "wait": {"signal": "go"}}]


async def operator_page(
    browser: Browser, base_url: str, sessionmaker: async_sessionmaker[AsyncSession], tenant: TenantKey, next_: str,
    roles: tuple[str, ...] = ("operator",),
) -> tuple[Page, list[str]]:
    """A page signed in as a new member with ``roles``, on ``next_``, and the policy violations it meets."""
    person = await local_user(sessionmaker, tenant.tenant_id, roles=roles)
    page = await new_page(browser, base_url)
    refused = csp_violations(page)
    await sign_in(page, person, next_=next_)
    return page, refused


async def click_and_land(page: Page, selector: str) -> None:
    """Click a form's button and wait for the page the form's redirect leads to."""
    async with page.expect_navigation():
        await page.click(selector)


async def status_becomes(page: Page, status: str) -> None:
    await page.wait_for_function(f"() => ({RUN_STATUS})() === {json.dumps(status)}")


async def every_tab_passes_axe(page: Page, run_id: str) -> None:
    for tab in TABS:
        response = await page.goto(f"/runs/{run_id}?tab={tab}")
        assert response is not None and response.status == 200, tab
        assert await page.get_attribute(f"nav.tabs a[href$='tab={tab}']", "aria-current") == "page"
        assert await axe_violations(page) == [], tab


async def test_every_tab_of_a_busy_run_passes_axe(
    browser: Browser, base_url: str, client: httpx.AsyncClient, make_tenant: MakeTenant, worker: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    tenant = await make_tenant()
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [
        {"id": "fetch", "tool": "echo", "args": {"note": XSS}},
        {"id": "each", "needs": ["fetch"], "map": {"items": list(range(60)), "tool": "echo", "args": {}}},
        {"id": "flaky", "needs": ["fetch"], "tool": "fail", "args": {"message": XSS},
         "retry": {"max_attempts": 2, "jitter": False, "backoff_base_s": 0.01}},
        {"id": "w", "wait": {"signal": "go"}},
    ])
    run = await start_run(client, tenant.headers, workflow, {"note": XSS})
    await wait_run(client, tenant.headers, run["id"], 30)
    page, refused = await operator_page(browser, base_url, sessionmaker, tenant, f"/runs/{run['id']}",
                                        roles=("admin",))
    await every_tab_passes_axe(page, run["id"])
    # The graph's nodes are links to the steps' details.
    await page.goto(f"/runs/{run['id']}")
    async with page.expect_navigation():
        await page.click("a.dag-node[aria-label*='(step flaky,']")
    assert page.url.endswith(f"/runs/{run['id']}?tab=steps#step-flaky")
    assert await page.evaluate("() => document.querySelector('#step-flaky') !== null")
    # The map's items come a page at a time.
    await page.click("#step-each summary")
    assert await page.locator("#step-each table.items tbody tr").count() == 50
    await click_and_land(page, "#step-each a[rel=next]")
    assert await page.locator("#step-each table.items tbody tr").count() == 10
    assert await axe_violations(page) == []
    await page.goto(f"/runs/{run['id']}/again")
    assert await axe_violations(page) == []
    assert await page.evaluate("() => document.querySelectorAll('script:not([src])').length") == 0
    assert refused == []


async def test_pause_resume_and_cancel_from_the_page(
    browser: Browser, base_url: str, client: httpx.AsyncClient, make_tenant: MakeTenant,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    tenant = await make_tenant()
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, WAITS)
    run = await start_run(client, tenant.headers, workflow)
    page, refused = await operator_page(browser, base_url, sessionmaker, tenant, f"/runs/{run['id']}")
    assert await page.evaluate(RUN_STATUS) == "waiting"
    await click_and_land(page, "form[action$='/pause'] button")
    await status_becomes(page, "paused")
    assert await page.is_disabled("form[action$='/pause'] button")
    await every_tab_passes_axe(page, run["id"])
    await click_and_land(page, "form[action$='/resume'] button")
    await status_becomes(page, "waiting")
    await click_and_land(page, "form[action$='/cancel'] button")
    await status_becomes(page, "cancelled")
    assert (await client.get(f"/api/v1/runs/{run['id']}", headers=tenant.headers)).json()["status"] == "cancelled"
    await every_tab_passes_axe(page, run["id"])
    assert refused == []


async def test_retry_a_failed_run_from_the_page(
    browser: Browser, base_url: str, client: httpx.AsyncClient, make_tenant: MakeTenant, worker: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    tenant = await make_tenant()
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [
        {"id": "boom", "tool": "fail", "args": {"message": "down"}, "retry": {"max_attempts": 1}}])
    run = await wait_run(client, tenant.headers, (await start_run(client, tenant.headers, workflow))["id"])
    assert run["status"] == "failed"
    page, refused = await operator_page(browser, base_url, sessionmaker, tenant, f"/runs/{run['id']}?tab=timeline")
    assert await axe_violations(page) == []
    await click_and_land(page, "form[action$='/retry'] button")
    # The retried step runs again (and fails again): a second attempt, after the run_retried event.
    again = await wait_for(client, tenant.headers, run["id"],
                           lambda r: r["status"] == "failed" and len(step(r, "boom")["attempts"]) == 2, 30)
    assert [e["type"] for e in await run_events(client, tenant.headers, run["id"])].count("run_retried") == 1
    await page.goto(f"/runs/{run['id']}?tab=timeline")
    assert await page.locator(".gantt-attempt.gantt-failed").count() == len(step(again, "boom")["attempts"])
    assert await axe_violations(page) == []
    assert refused == []


async def test_send_a_signal_from_the_page(
    browser: Browser, base_url: str, client: httpx.AsyncClient, make_tenant: MakeTenant,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    tenant = await make_tenant()
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, WAITS)
    run = await start_run(client, tenant.headers, workflow)
    page, refused = await operator_page(browser, base_url, sessionmaker, tenant, f"/runs/{run['id']}")
    assert await page.input_value("#signal-name") == "go"
    await page.fill("#signal-payload", json.dumps({"approved": True, "note": XSS}))
    await click_and_land(page, "form[action$='/signal'] button")
    await status_becomes(page, "succeeded")
    done = (await client.get(f"/api/v1/runs/{run['id']}", headers=tenant.headers)).json()
    assert step(done, "w")["output"] == {"approved": True, "note": XSS}
    assert await page.is_disabled("#signal-name")  # nothing waits any more: the form says why
    assert "the run waits for no signal" in await page.inner_text("#why-signal")
    assert await axe_violations(page) == []
    assert refused == []


async def test_start_again_with_edited_input(
    browser: Browser, base_url: str, client: httpx.AsyncClient, make_tenant: MakeTenant,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    tenant = await make_tenant()
    workflow = name()
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    await create_workflow(client, tenant.headers, workflow, WAITS, input_schema=schema)
    run = await start_run(client, tenant.headers, workflow, {"n": 1})
    page, refused = await operator_page(browser, base_url, sessionmaker, tenant, f"/runs/{run['id']}")
    await click_and_land(page, "a[href$='/again']")
    assert json.loads(await page.input_value("#again-input")) == {"n": 1}
    await page.fill("#again-input", json.dumps({"n": "one"}))
    await click_and_land(page, "#again-start")
    assert "/input/n" in await page.inner_text("#input-errors")  # the schema's complaint, on the form
    assert await axe_violations(page) == []
    await page.fill("#again-input", json.dumps({"n": 2, "note": XSS}))
    await click_and_land(page, "#again-preview")
    assert await page.locator("table.diff tr.diff-added").count() == 2
    assert XSS in await page.inner_text("table.diff")  # shown as text, never run
    assert await axe_violations(page) == []
    await click_and_land(page, "#again-start")
    new_id = page.url.rsplit("/", 1)[1]
    assert new_id != run["id"]
    new = (await client.get(f"/api/v1/runs/{new_id}", headers=tenant.headers)).json()
    assert (new["workflow"], new["input"]) == (workflow, {"n": 2, "note": XSS})
    await every_tab_passes_axe(page, new_id)
    assert refused == []
