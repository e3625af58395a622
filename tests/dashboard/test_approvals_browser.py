"""The approvals inbox and the workflow pages in headless Chromium: an agent's gated call approved with edited
arguments by a second person while the starter sees the buttons withheld, a rejection, the keyboard, axe-core
on every page, and the strict Content-Security-Policy never refusing anything."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from tests.fakes.model_server import ModelServer, Turn
from tests.fakes.tool_server import ToolServer
from tests.support.browser import axe_violations, csp_violations, local_user, new_page, sign_in
from tests.support.providers import add_provider, model_name
from tests.support.runs import create_workflow, name, start_run, step, wait_for, wait_run
from tests.support.tenants import MakeTenant
from tests.support.tools import http_tool, register

pytestmark = pytest.mark.xdist_group("engine")
SELECTED = "() => Array.from(document.querySelectorAll('[data-approval]')).findIndex(e => e.matches('.selected'))"


@pytest.fixture(scope="module")
def model_server() -> Iterator[ModelServer]:
    with ModelServer() as server:
        yield server


async def pending(client: httpx.AsyncClient, headers: dict[str, str], run_id: str) -> list[dict[str, Any]]:
    r = await client.get("/api/v1/approvals", params={"status": "pending", "run": run_id}, headers=headers)
    return list(r.json()["items"])


async def next_request(client: httpx.AsyncClient, headers: dict[str, str], run_id: str,
                       args: dict[str, Any]) -> dict[str, Any]:
    """The run's pending request for ``args``, once the agent has asked for it."""
    for _ in range(300):
        items = await pending(client, headers, run_id)
        if items and items[0]["args"] == args:
            return items[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run_id} never asked about {args}")


async def no_axe_violations(page: Page, what: str) -> None:
    assert await axe_violations(page) == [], what


async def test_a_second_person_approves_an_agents_call_with_edited_arguments_then_rejects_the_next(
    browser: Browser, base_url: str, client: httpx.AsyncClient, make_tenant: MakeTenant, worker: Settings,
    model_server: ModelServer, tool_server: ToolServer, sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    tenant = await make_tenant()
    model = model_name()
    model_server.script(model, [
        Turn.tool_calls([("send_email", {"to": "everyone@example.com"})], content="Mailing <b>everyone</b>."),
        Turn.tool_calls([("send_email", {"to": "spam@example.com"})]),
        Turn.final("sent"),
    ])
    await add_provider(client, tenant.headers, model_server, model)
    await register(client, tenant.headers, name="send_email", description="Send an email.", effect="write",
                   input_schema={"type": "object", "required": ["to"], "additionalProperties": False,
                                 "properties": {"to": {"type": "string", "maxLength": 40}}},
                   executor=http_tool(tool_server.url + "/write"), autonomy={"mode": "manual"})
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [
        {"id": "agent", "agent": {"model": f"local/{model}", "instructions": "You help.", "input": "${{ input.task }}",
                                  "tools": ["send_email"]}}],
        input_schema={"type": "object", "required": ["task"], "properties": {"task": {"type": "string"}}})

    # The starter starts the run from the workflow's generated form.
    starter = await new_page(browser, base_url)
    starter_refused = csp_violations(starter)
    await sign_in(starter, await local_user(sessionmaker, tenant.tenant_id, roles=("operator", "approver")),
                  next_=f"/workflows/{workflow}")
    await no_axe_violations(starter, "workflow page")
    await starter.click(f"a[href='/workflows/{workflow}/start?version=1']")
    await starter.click("form.run-form button[type=submit]")  # nothing filled in: the error is shown in place
    await starter.wait_for_selector("#f-2f-task[aria-invalid=true]")
    assert "required" in await starter.inner_text("#ef-2f-task")
    await no_axe_violations(starter, "start form with its errors")
    await starter.fill("#f-2f-task", "mail the team")
    await starter.click("form.run-form button[type=submit]")
    await starter.wait_for_url(lambda url: "/runs/" in url)
    run_id = starter.url.rsplit("/", 1)[1]
    await wait_for(client, tenant.headers, run_id, lambda r: r["status"] == "waiting")

    # Four-eyes: the starter sees the request and why they may not decide it, and no buttons.
    await starter.goto("/approvals")
    mine = starter.locator(f"article:has(a[href='/runs/{run_id}'])")
    assert "four-eyes: you started this run" in await mine.inner_text()
    assert await mine.locator("button").count() == 0
    await no_axe_violations(starter, "inbox as the starter")

    approver = await new_page(browser, base_url)
    refused = csp_violations(approver)
    await sign_in(approver, await local_user(sessionmaker, tenant.tenant_id, roles=("approver",)),
                  next_="/approvals")
    request = approver.locator(f"article:has(a[href='/runs/{run_id}'])")
    assert "Mailing <b>everyone</b>." in await request.locator("pre.said").inner_text()  # shown as text
    await approver.keyboard.press("j")
    await approver.keyboard.press("e")  # opens the editor and puts the caret in it
    editor = request.locator("textarea[name=args]")
    assert await approver.evaluate("() => document.activeElement.name") == "args"
    await editor.fill(json.dumps({"to": "x" * 41}))
    await request.locator(".check [data-check=invalid]").wait_for()
    assert "/to" in await request.locator(".check").inner_text()
    await editor.fill(json.dumps({"to": "team@example.com"}, indent=2))
    await request.locator(".check [data-check=valid]").wait_for()
    diff = await request.locator("table.diff").inner_text()
    assert "removed" in diff and "everyone@example.com" in diff and "added" in diff and "team@example.com" in diff
    await no_axe_violations(approver, "inbox with the editor's check")
    await approver.keyboard.press("Escape")  # out of the field: the keys act again
    async with approver.expect_navigation(url=lambda url: url.endswith("/approvals")):
        await approver.keyboard.press("a")

    # The agent's next call asks again: rejected, with the comment the keyboard jumped to.
    second = await next_request(client, tenant.headers, run_id, {"to": "spam@example.com"})
    await approver.goto("/approvals")
    await approver.keyboard.press("r")
    assert await approver.evaluate("() => document.activeElement.name") == "comment"
    await approver.keyboard.type("no spam, just j and k")  # keys typed into a field stay there
    assert await approver.evaluate(SELECTED) == 0
    async with approver.expect_navigation(url=lambda url: url.endswith("/approvals")):
        await approver.locator(f"#approval-{second['id']} button[value=reject]").click()

    run = await wait_run(client, tenant.headers, run_id)
    assert run["status"] == "succeeded" and step(run, "agent")["output"] == "sent", run
    sent = [w.body for w in tool_server.writes if w.idempotency_key and w.idempotency_key.startswith(run_id)]
    assert sent == [{"to": "team@example.com"}]
    decided = (await client.get(f"/api/v1/approvals/{second['id']}", headers=tenant.headers)).json()
    assert (decided["status"], decided["comment"]) == ("rejected", "no spam, just j and k")
    assert refused == [] and starter_refused == []


async def test_keyboard_moves_between_requests_and_approves_the_selected_one(
    browser: Browser, base_url: str, client: httpx.AsyncClient, make_tenant: MakeTenant,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    tenant = await make_tenant()
    runs = []
    for timeout in (600, 1200, 1800):  # the inbox shows them soonest to expire first: this order
        workflow = name()
        await create_workflow(client, tenant.headers, workflow,
                              [{"id": "ok", "approval": {"reason": f"expires in {timeout}s", "timeout_s": timeout}}])
        runs.append(await start_run(client, tenant.headers, workflow))
    page = await new_page(browser, base_url)
    refused = csp_violations(page)
    await sign_in(page, await local_user(sessionmaker, tenant.tenant_id, roles=("operator", "approver")),
                  next_="/approvals")
    assert await page.is_visible("#keys-hint")
    assert await page.evaluate(SELECTED) == -1
    for key, index in (("j", 0), ("j", 1), ("j", 2), ("j", 2), ("k", 1)):
        await page.keyboard.press(key)
        assert await page.evaluate(SELECTED) == index, key
    assert await page.evaluate("() => document.activeElement.getAttribute('aria-current')") == "true"
    await page.keyboard.press("Control+a")  # a modifier: not a shortcut
    assert (await pending(client, tenant.headers, runs[1]["id"])) != []
    async with page.expect_navigation(url=lambda url: url.endswith("/approvals")):
        await page.keyboard.press("a")
    run = await wait_run(client, tenant.headers, runs[1]["id"])
    assert run["status"] == "succeeded", run
    for other in (runs[0], runs[2]):
        assert len(await pending(client, tenant.headers, other["id"])) == 1
    await no_axe_violations(page, "inbox")
    for url in (f"/workflows/{run['workflow']}", f"/workflows/{run['workflow']}/diff?from=1&to=1",
                f"/workflows/{run['workflow']}/start"):
        await page.goto(url)
        await no_axe_violations(page, url)
    assert refused == []
