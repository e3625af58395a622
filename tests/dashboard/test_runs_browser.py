"""The runs list in headless Chromium: a bulk cancel answers per run, the list follows the tenant's runs
without a reload (but not while rows are selected), axe-core passes, and the strict policy holds."""

from __future__ import annotations

import httpx
from playwright.async_api import Browser
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.support.browser import axe_violations, csp_violations, local_user, new_page, sign_in
from tests.support.runs import create_workflow, name, start_run
from tests.support.tenants import MakeTenant


def status_of(run_id: str) -> str:
    """A function for page.wait_for_function/evaluate: the run's status as its row shows it."""
    return f"() => document.querySelector('#runs-live tr[data-run=\"{run_id}\"] .status')?.textContent.trim()"


async def test_bulk_cancel_answers_per_row_and_the_list_follows_the_tenants_runs(
    browser: Browser, base_url: str, client: httpx.AsyncClient, make_tenant: MakeTenant,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    tenant = await make_tenant()
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [{"id": "w", "wait": {"signal": "go"}}])
    runs = [(await start_run(client, tenant.headers, workflow))["id"] for _ in range(4)]
    person = await local_user(sessionmaker, tenant.tenant_id, roles=("operator",))
    page = await new_page(browser, base_url)
    refused = csp_violations(page)
    await sign_in(page, person, next_="/runs")
    response = await page.goto("/runs")
    assert response is not None and response.status == 200
    assert await axe_violations(page) == []

    for run_id in runs[:3]:
        await page.get_by_label(f"Select run {run_id}").check()
    await page.get_by_role("button", name="Cancel", exact=True).click()
    await page.wait_for_function("() => document.querySelectorAll('#bulk-results tr[data-outcome=\"done\"]').length"
                                 " === 3")
    assert (await page.locator("#bulk-title").text_content() or "").strip() == "Cancel: 3 of 3 done"
    results = await page.locator("#bulk-results tbody tr").all_inner_texts()
    assert sorted(results) == sorted(f"{run_id}\tdone: now cancelled" for run_id in runs[:3]), results
    # The selection cleared, the list shows what the action did, without a reload.
    for run_id in runs[:3]:
        await page.wait_for_function(f"() => ({status_of(run_id)})() === 'cancelled'")
    assert await page.evaluate(status_of(runs[3])) == "waiting"
    assert await axe_violations(page) == []

    # While a row is selected the list holds still (a refresh would drop the selection)...
    await page.get_by_label(f"Select run {runs[3]}").check()
    signalled = await client.post(f"/api/v1/runs/{runs[3]}/signals/go", json={}, headers=tenant.headers)
    assert signalled.status_code == 200, signalled.text
    await page.wait_for_function("() => document.getElementById('live-note').textContent.includes('Runs changed')")
    assert await page.evaluate(status_of(runs[3])) == "waiting"
    assert await page.get_by_label(f"Select run {runs[3]}").is_checked()
    # ...and catches up once the selection is cleared.
    await page.get_by_label(f"Select run {runs[3]}").uncheck()
    await page.wait_for_function(f"() => ({status_of(runs[3])})() === 'succeeded'")

    # A run that finishes while nothing is selected shows up at once.
    fifth = (await start_run(client, tenant.headers, workflow))["id"]
    await page.wait_for_function(f"() => ({status_of(fifth)})() === 'waiting'")
    signalled = await client.post(f"/api/v1/runs/{fifth}/signals/go", json={}, headers=tenant.headers)
    assert signalled.status_code == 200, signalled.text
    await page.wait_for_function(f"() => ({status_of(fifth)})() === 'succeeded'")
    assert await axe_violations(page) == []
    assert refused == []
