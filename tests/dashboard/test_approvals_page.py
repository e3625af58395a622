"""The approvals inbox in-process against the real database and worker: its order, what each request shows,
the edited-arguments check, the lost race, escaping and tenant isolation."""

from __future__ import annotations

import asyncio
import html
import re
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from tests.fakes.model_server import ModelServer, Turn
from tests.fakes.tool_server import ToolServer
from tests.support.providers import add_provider, model_name
from tests.support.runs import create_workflow, name, start_run
from tests.support.signin import SignIn
from tests.support.tenants import MakeTenant, TenantKey
from tests.support.tools import http_tool, register

XSS = "<script>alert(1)</script>"
REFUND_SCHEMA = {"type": "object", "required": ["order", "amount"], "additionalProperties": False,
                 "properties": {"order": {"type": "string"}, "amount": {"type": "number", "maximum": 1000}}}


@pytest.fixture(scope="module")
def model_server() -> Iterator[ModelServer]:
    with ModelServer() as server:
        yield server


def csrf_of(page: str) -> str:
    token = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert token, page[:500]
    return token.group(1)


def order_of(page: str) -> list[str]:
    """The run ids of the inbox's requests, in the order shown."""
    return re.findall(r'<article class="approval"[^>]*>\s*<h2[^>]*>.*?href="/runs/([0-9a-f-]{36})"', page, re.S)


async def approval_run(client: httpx.AsyncClient, tenant: TenantKey, reason: str = "ok?",
                       timeout_s: float | None = None, headers: dict[str, str] | None = None) -> dict[str, Any]:
    workflow = name()
    gate: dict[str, Any] = {"reason": reason, **({"timeout_s": timeout_s} if timeout_s else {})}
    await create_workflow(client, tenant.headers, workflow, [{"id": "ok", "approval": gate}])
    return await start_run(client, headers or tenant.headers, workflow)


async def pending(client: httpx.AsyncClient, headers: dict[str, str], run_id: str) -> dict[str, Any]:
    """The run's pending approval, once the worker has asked for it."""
    for _ in range(300):
        items = (await client.get("/api/v1/approvals", params={"status": "pending", "run": run_id},
                                  headers=headers)).json()["items"]
        if items:
            return dict(items[0])
        await asyncio.sleep(0.05)
    raise AssertionError(f"no pending approval for run {run_id}")


async def gated_tool_run(client: httpx.AsyncClient, tenant: TenantKey, tool_server: ToolServer,
                         args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    tool = f"refund_{uuid.uuid4().hex[:6]}"
    await register(client, tenant.headers, name=tool, effect="write", input_schema=REFUND_SCHEMA,
                   autonomy={"mode": "manual"}, executor=http_tool(tool_server.url + "/write"))
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [{"id": "refund", "tool": tool, "args": args}])
    run = await start_run(client, tenant.headers, workflow)
    return run, await pending(client, tenant.headers, run["id"])


async def test_requests_the_user_may_decide_come_first_soonest_to_expire_first_a_page_at_a_time(
    client: httpx.AsyncClient, make_tenant: MakeTenant, sign_in: SignIn
) -> None:
    tenant = await make_tenant()
    approver = await sign_in(tenant, ("operator", "approver"))
    token = csrf_of((await approver.get("/runs")).text)
    never = await approval_run(client, tenant)
    later = await approval_run(client, tenant, timeout_s=7200)
    soon = await approval_run(client, tenant, timeout_s=600)
    # Started by the approver: four-eyes withholds it from them, so it comes last though it expires first.
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [{"id": "ok", "approval": {"reason": "mine",
                                                                                       "timeout_s": 60}}])
    started = await approver.post("/api/v1/runs", json={"workflow": workflow, "input": {}},
                                  headers={"X-CSRF-Token": token})
    assert started.status_code == 201, started.text
    mine = started.json()

    page = await approver.get("/approvals")
    assert page.status_code == 200, page.text
    assert order_of(page.text) == [soon["id"], later["id"], never["id"], mine["id"]]
    blocked = page.text[page.text.index(f'href="/runs/{mine["id"]}"'):]
    assert "four-eyes: you started this run" in blocked and 'value="approve"' not in blocked

    first = (await approver.get("/approvals", params={"limit": 2})).text
    assert order_of(first) == [soon["id"], later["id"]]
    more = re.search(r'<a rel="next" href="([^"]+)"', first)
    assert more, first
    rest = (await approver.get(html.unescape(more.group(1)))).text
    assert order_of(rest) == [never["id"], mine["id"]]
    assert "limit=2" in more.group(1) and 'rel="next"' not in rest
    bad = await approver.get("/approvals", params={"cursor": "junk"})
    assert bad.status_code == 422 and "/query/cursor" in bad.text


@pytest.mark.xdist_group("engine")
async def test_an_agents_request_shows_its_last_model_turn_the_runs_cost_and_escapes_what_it_said(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, model_server: ModelServer,
    tool_server: ToolServer, sign_in: SignIn,
) -> None:
    model = model_name()
    model_server.script(model, [
        Turn.tool_calls([("send_email", {"to": XSS})], content=f"I will mail {XSS} now."),
        Turn.final("done"),
    ])
    await add_provider(client, tenant.headers, model_server, model)
    await register(client, tenant.headers, name="send_email", description="Send an email.", effect="write",
                   input_schema={"type": "object", "required": ["to"], "properties": {"to": {"type": "string"}}},
                   executor=http_tool(tool_server.url + "/write"), autonomy={"mode": "manual"})
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [
        {"id": "agent", "agent": {"model": f"local/{model}", "instructions": "You help.", "input": "mail them",
                                  "tools": ["send_email"]}}])
    run = await start_run(client, tenant.headers, workflow)
    approval = await pending(client, tenant.headers, run["id"])
    usage = (await client.get("/api/v1/budgets/usage", params={"run": run["id"]}, headers=tenant.headers)).json()

    page = (await (await sign_in(tenant, ("approver",))).get("/approvals")).text
    article = page[page.index(f'id="approval-{approval["id"]}"'):]
    assert XSS not in page
    assert "last model turn" in article
    assert "I will mail &lt;script&gt;alert(1)&lt;/script&gt; now." in article
    assert "Calls <strong>send_email</strong> (this request)" in article
    assert f"{usage['run']['cost_usd']} USD" in article and usage["run"]["cost_usd"] != "0"
    assert f'href="/runs/{run["id"]}/steps/agent/conversation"' in article
    assert "&lt;script&gt;" in article.split("Proposed arguments")[1]  # the arguments, escaped


@pytest.mark.xdist_group("engine")
async def test_the_editor_check_shows_schema_errors_at_their_pointers_and_the_diff(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, tool_server: ToolServer, sign_in: SignIn,
) -> None:
    _, approval = await gated_tool_run(client, tenant, tool_server, {"order": "o-1", "amount": 50})
    approver = await sign_in(tenant, ("approver",))
    page = (await approver.get("/approvals")).text
    token = csrf_of(page)
    assert f'hx-post="/approvals/{approval["id"]}/check"' in page
    check = f"/approvals/{approval['id']}/check"

    bad = await approver.post(check, data={"csrf_token": token, "args": '{"order": 7, "amount": 5000, "x": 1}'})
    assert bad.status_code == 200, bad.text
    assert 'data-check="invalid"' in bad.text
    assert "<code>/order</code>: 7 is not of type &#39;string&#39;" in bad.text
    assert "<code>/amount</code>: 5000 is greater than the maximum of 1000" in bad.text
    assert "<code>/</code>: Additional properties are not allowed" in bad.text

    good = await approver.post(check, data={"csrf_token": token, "args": '{"order": "o-1", "amount": 40}'})
    assert 'data-check="valid"' in good.text
    rows = re.findall(r'<tr class="diff-(added|removed)">.*?<span aria-hidden="true">(.)</span>.*?<pre>(.*?)</pre>',
                      good.text, re.S)
    assert rows == [("removed", "−", '  &#34;amount&#34;: 50,'), ("added", "+", '  &#34;amount&#34;: 40,')], good.text

    same = await approver.post(check, data={"csrf_token": token, "args": '{"amount": 50, "order": "o-1"}'})
    assert 'data-check="valid"' in same.text and "No change" in same.text
    junk = await approver.post(check, data={"csrf_token": token, "args": "{nope"})
    assert junk.status_code == 200 and "Not JSON yet" in junk.text
    escaped = await approver.post(check, data={"csrf_token": token, "args": f'{{"order": "{XSS}", "amount": 1}}'})
    assert XSS not in escaped.text and "&lt;script&gt;" in escaped.text

    # The same rules hold when deciding: an invalid edit is refused, a valid one is what gets approved.
    refused = await approver.post(f"/approvals/{approval['id']}", data={
        "csrf_token": token, "decision": "approve", "args": '{"order": "o-1", "amount": 5000}'})
    assert refused.status_code == 422 and "/body/args/amount" in refused.text
    done = await approver.post(f"/approvals/{approval['id']}", data={
        "csrf_token": token, "decision": "approve", "args": '{"order": "o-1", "amount": 40}', "comment": "less"})
    assert done.status_code == 303, done.text
    read = (await client.get(f"/api/v1/approvals/{approval['id']}", headers=tenant.headers)).json()
    assert (read["status"], read["approved_args"]) == ("approved", {"order": "o-1", "amount": 40})


async def test_arguments_sent_back_unchanged_are_approved_as_proposed(
    client: httpx.AsyncClient, tenant: TenantKey, sign_in: SignIn
) -> None:
    run = await approval_run(client, tenant)
    approval = await pending(client, tenant.headers, run["id"])
    approver = await sign_in(tenant, ("approver",))
    token = csrf_of((await approver.get("/approvals")).text)
    done = await approver.post(f"/approvals/{approval['id']}", data={"csrf_token": token, "decision": "approve"})
    assert done.status_code == 303
    read = (await client.get(f"/api/v1/approvals/{approval['id']}", headers=tenant.headers)).json()
    assert read["approved_args"] is None


async def test_a_decision_that_lost_the_race_names_who_decided_first_and_when(
    client: httpx.AsyncClient, make_tenant: MakeTenant, sign_in: SignIn
) -> None:
    tenant = await make_tenant()
    run = await approval_run(client, tenant, reason="ship?")
    approval = await pending(client, tenant.headers, run["id"])
    first, second = await sign_in(tenant, ("approver",)), await sign_in(tenant, ("approver",))
    first_name = (await first.get("/auth/me")).json()["user"]["subject"]
    tokens = [csrf_of((await browser.get("/approvals")).text) for browser in (first, second)]

    won = await first.post(f"/approvals/{approval['id']}", data={
        "csrf_token": tokens[0], "decision": "reject", "comment": f"no: {XSS}"})
    assert won.status_code == 303, won.text
    lost = await second.post(f"/approvals/{approval['id']}", data={"csrf_token": tokens[1], "decision": "approve"})
    assert lost.status_code == 409, lost.text
    assert "Already decided" in lost.text and "already rejected" in lost.text
    assert f"by <strong>{first_name}</strong>" in lost.text
    decided_at = (await client.get(f"/api/v1/approvals/{approval['id']}", headers=tenant.headers)).json()["decided_at"]
    assert re.search(r'<time datetime="' + re.escape(decided_at[:19]), lost.text), (decided_at, lost.text)
    assert XSS not in lost.text and "no: &lt;script&gt;alert(1)&lt;/script&gt;" in lost.text

    # The API's answer to the same race carries the decider too.
    late = await client.post(f"/api/v1/approvals/{approval['id']}/decision", json={"decision": "approve"},
                             headers=(await make_tenant(name=tenant.name, roles=("approver",))).headers)
    problem = late.json()
    assert late.status_code == 409 and problem["status_now"] == "rejected", problem
    assert problem["decided_by_name"] == first_name and problem["decided_by"].startswith("user:")
    assert problem["decided_at"][:19] == decided_at[:19]


async def test_another_tenants_request_is_the_same_404_and_never_listed(
    client: httpx.AsyncClient, make_tenant: MakeTenant, sign_in: SignIn
) -> None:
    tenant, other = await make_tenant(), await make_tenant()
    theirs = await approval_run(client, other, reason=XSS)
    approval = await pending(client, other.headers, theirs["id"])
    approver = await sign_in(tenant, ("approver",))
    page = (await approver.get("/approvals")).text
    assert theirs["id"] not in page and approval["id"] not in page
    token = csrf_of(page)
    for path in (f"/approvals/{approval['id']}", f"/approvals/{uuid.uuid4()}"):
        decided = await approver.post(path, data={"csrf_token": token, "decision": "reject", "comment": "x"})
        assert decided.status_code == 404, decided.text
    checked = await approver.post(f"/approvals/{approval['id']}/check", data={"csrf_token": token, "args": "{}"})
    assert checked.status_code == 404
    still = (await client.get(f"/api/v1/approvals/{approval['id']}", headers=other.headers)).json()
    assert still["status"] == "pending"


async def test_bad_input_is_a_422_page_never_a_500(
    client: httpx.AsyncClient, tenant: TenantKey, sign_in: SignIn
) -> None:
    run = await approval_run(client, tenant, reason=XSS)
    approval = await pending(client, tenant.headers, run["id"])
    approver = await sign_in(tenant, ("approver",))
    page = (await approver.get("/approvals")).text
    assert XSS not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    token = csrf_of(page)
    target = f"/approvals/{approval['id']}"
    for data, pointer in (({"decision": "maybe"}, "/form/decision"),
                          ({"decision": "reject", "comment": "x" * 2001}, "/form/comment"),
                          ({"decision": "approve", "args": "{nope"}, "/form/args"),
                          ({"decision": "approve", "args": "[1, 2]"}, "/form/args")):
        answer = await approver.post(target, data={"csrf_token": token, **data})
        assert answer.status_code == 422 and pointer in answer.text, (data, answer.status_code, answer.text[:300])
    step_check = await approver.post(f"{target}/check", data={"csrf_token": token, "args": "{}"})
    assert step_check.status_code == 422 and "no arguments to edit" in step_check.text


async def test_the_names_of_starters_are_escaped(
    client: httpx.AsyncClient, tenant: TenantKey, sign_in: SignIn, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    starter = await sign_in(tenant, ("operator",))
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [{"id": "ok", "approval": {"reason": "r"}}])
    started = await starter.post("/api/v1/runs", json={"workflow": workflow, "input": {}},
                                 headers={"X-CSRF-Token": csrf_of((await starter.get("/runs")).text)})
    assert started.status_code == 201, started.text
    subject = (await starter.get("/auth/me")).json()["user"]["subject"]
    async with sessionmaker() as db, db.begin():
        await db.execute(text("UPDATE app_user SET name = :n WHERE issuer = 'local' AND subject = :s"),
                         {"n": XSS, "s": subject})
    page = (await (await sign_in(tenant, ("approver",))).get("/approvals")).text
    assert XSS not in page
    assert "<dt>Run started by</dt><dd>&lt;script&gt;alert(1)&lt;/script&gt;</dd>" in page
