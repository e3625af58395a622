"""The dashboard's pages in headless Chromium: accessible (axe-core), under the strict policy, and live."""

from __future__ import annotations

import httpx
from playwright.async_api import Browser
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.support.browser import axe_violations, csp_violations, local_user, new_page, sign_in
from tests.support.runs import create_workflow, name, start_run
from tests.support.tenants import MakeTenant

RUN_STATUS = "() => document.querySelector('#run-live .status')?.textContent.trim()"


async def test_pages_pass_axe_and_a_run_page_follows_its_run_without_a_reload(
    browser: Browser, base_url: str, client: httpx.AsyncClient, make_tenant: MakeTenant,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    tenant = await make_tenant()
    workflow, gated = name(), name()
    await create_workflow(client, tenant.headers, workflow, [{"id": "w", "wait": {"signal": "go"}}])
    await create_workflow(client, tenant.headers, gated, [{"id": "ok", "approval": {"reason": "ship it?"}}])
    run = await start_run(client, tenant.headers, workflow)
    await start_run(client, tenant.headers, gated)
    person = await local_user(sessionmaker, tenant.tenant_id, roles=("operator", "approver"))
    page = await new_page(browser, base_url)
    refused = csp_violations(page)
    await sign_in(page, person, next_="/runs")

    for url in ("/runs", f"/runs/{run['id']}", "/approvals", "/workflows", f"/workflows/{workflow}"):
        response = await page.goto(url)
        assert response is not None and response.status == 200, url
        assert await axe_violations(page) == [], url

    await page.goto(f"/runs/{run['id']}")
    assert await page.evaluate(RUN_STATUS) == "waiting"
    signalled = await client.post(f"/api/v1/runs/{run['id']}/signals/go", json={"payload": {"ok": True}},
                                  headers=tenant.headers)
    assert signalled.status_code == 200, signalled.text
    # No reload: the page's poll swaps the live part in, and stops once the run has ended.
    await page.wait_for_function(f"() => ({RUN_STATUS})() === 'succeeded'")
    assert await page.evaluate("() => document.querySelector('#run-live').hasAttribute('hx-trigger')") is False
    assert refused == []
