"""The operations pages in headless Chromium: accessible (axe-core), under the strict policy, and the tools page
following a circuit breaker as it opens, without a reload."""

from __future__ import annotations

import httpx
import pytest
from playwright.async_api import Browser
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from tests.fakes.tool_server import ToolServer
from tests.support.browser import axe_violations, csp_violations, local_user, new_page, sign_in
from tests.support.runs import create_workflow, name, start_run, wait_for, wait_run
from tests.support.tenants import MakeTenant
from tests.support.tools import http_tool, register

pytestmark = pytest.mark.xdist_group("engine")

BREAKER = "(tool) => document.querySelector(`tr[data-tool='${tool}'] .breaker`)?.textContent.trim()"


async def test_ops_pages_pass_axe_and_the_tools_page_shows_a_breaker_opening_without_a_reload(
    browser: Browser, base_url: str, client: httpx.AsyncClient, make_tenant: MakeTenant,
    sessionmaker: async_sessionmaker[AsyncSession], worker: Settings, tool_server: ToolServer,
) -> None:
    tenant = await make_tenant()
    headers = tenant.headers
    await register(client, headers, name="flaky_api", retry={"max_attempts": 1},
                   breaker={"failure_threshold": 2, "window_s": 600, "open_s": 600},
                   executor=http_tool(tool_server.url + "/fail"))
    # Spend to chart, and a run paused on its budget to list.
    await client.put("/api/v1/budgets", json={"daily_usd": "20"}, headers=headers)
    await register(client, headers, name="paid", cost_usd="1.5", executor={"kind": "builtin", "name": "echo"})
    paid = name()
    await create_workflow(client, headers, paid, [{"id": "a", "tool": "paid", "args": {}},
                                                  {"id": "b", "needs": ["a"], "tool": "paid", "args": {}}],
                          limits={"max_cost_usd": 1.5})
    paused = await start_run(client, headers, paid)
    await wait_for(client, headers, paused["id"], lambda r: r["status"] == "paused")

    person = await local_user(sessionmaker, tenant.tenant_id, roles=("admin",))
    page = await new_page(browser, base_url)
    refused = csp_violations(page)
    await sign_in(page, person, next_="/tools")

    for url in ("/tools", "/tools/flaky_api", "/tools/echo", "/budgets", "/audit"):
        response = await page.goto(url)
        assert response is not None and response.status == 200, url
        assert await axe_violations(page) == [], url
    await page.goto("/budgets")
    assert await page.locator("svg.burn-chart rect.bar").count() >= 1
    await page.click("text=The figures as a table")
    assert await axe_violations(page) == []

    # Verify through the button: htmx swaps the result in, on the same page.
    await page.goto("/audit")
    await page.click("#verification button[type=submit]")
    await page.wait_for_selector("#verification .verdict")
    assert "Intact." in await page.inner_text("#verification .verdict")
    assert page.url.endswith("/audit")
    assert await axe_violations(page) == []

    await page.goto("/tools")
    assert await page.evaluate(BREAKER, "flaky_api") == "closed"
    workflow = name()
    await create_workflow(client, headers, workflow, [{"id": "call", "tool": "flaky_api", "args": {}}])
    for _ in range(2):
        run = await wait_run(client, headers, (await start_run(client, headers, workflow))["id"])
        assert run["status"] == "failed"
    # No reload: the page reads the breakers again every few seconds and swaps its table in.
    await page.wait_for_function(f"() => ({BREAKER})('flaky_api') === 'open'", timeout=15_000)
    assert await axe_violations(page) == []
    assert refused == []
