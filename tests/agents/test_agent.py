"""``agent`` steps against a scripted model server and real tool servers, through the real guardrails."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from tests.fakes.model_server import ModelServer, Turn
from tests.fakes.tool_server import ToolServer
from tests.support.clock import clear_of_the_hour_boundary
from tests.support.providers import add_provider, model_name
from tests.support.runs import create_workflow, name, run_events, start_run, step, wait_for, wait_run
from tests.support.tenants import MakeTenant, TenantKey
from tests.support.tools import http_tool, register
from tests.support.workers import WorkerProcess

pytestmark = pytest.mark.xdist_group("engine")

LOOKUP_SCHEMA = {"type": "object", "required": ["q"], "properties": {"q": {"type": "string"}},
                 "additionalProperties": False}


def results(request: Any) -> list[dict[str, Any]]:
    """The tool results the model was sent in one request, decoded."""
    return [json.loads(m["content"].split("… [cut")[0]) if "… [cut" not in m["content"] else m["content"]
            for m in request.tool_messages]


async def tools(client: httpx.AsyncClient, tenant: TenantKey, server: ToolServer, **autonomy: Any) -> None:
    await register(client, tenant.headers, name="lookup", description="Look something up.",
                   input_schema=LOOKUP_SCHEMA, executor=http_tool(server.url + "/echo"))
    await register(client, tenant.headers, name="send_email", description="Send an email.", effect="write",
                   input_schema={"type": "object", "required": ["to"], "properties": {"to": {"type": "string"}}},
                   executor=http_tool(server.url + "/write"), **autonomy)


async def agent_run(client: httpx.AsyncClient, tenant: TenantKey, model: str, *, tool_names: list[str],
                    input: Any = None, agent: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    workflow = name()
    limits = extra.pop("limits", None)
    await create_workflow(client, tenant.headers, workflow, [
        {"id": "agent", "agent": {"model": f"local/{model}", "instructions": "You help.",
                                  "input": "${{ input.task }}", "tools": tool_names, **(agent or {})}}], **extra)
    body = {"limits": limits} if limits else {}
    return await start_run(client, tenant.headers, workflow, input or {"task": "find steward"}, **body)


async def test_the_model_corrects_itself_after_each_structured_error(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, model_server: ModelServer,
    tool_server: ToolServer, db: AsyncSession,
) -> None:
    model = model_name()
    model_server.script(model, [
        Turn.tool_calls([("search_web", {"q": "steward"})]),
        Turn.tool_calls([("lookup", {"query": 1})]),
        Turn.tool_calls([("send_email", {"to": "boss@example.com"})]),
        Turn.tool_calls([("lookup", {"q": "steward"})]),
        Turn.final("Steward is a control plane."),
    ])
    await add_provider(client, tenant.headers, model_server, model)
    await tools(client, tenant, tool_server)
    writes_before = len(tool_server.writes)
    started = await agent_run(client, tenant, model, tool_names=["lookup", "send_email"],
                              permissions={"read_only": True})
    run = await wait_run(client, tenant.headers, started["id"])
    assert run["status"] == "succeeded", run
    assert step(run, "agent")["output"] == "Steward is a control plane."
    calls = model_server.calls(model)
    assert [c.turn for c in calls] == [0, 1, 2, 3, 4]
    unknown, invalid, forbidden, ok = (results(calls[i])[-1] for i in range(1, 5))
    assert unknown["error"] == "unknown_tool" and "lookup, send_email" in unknown["message"]
    assert invalid["error"] == "invalid_args"
    assert {e["message"] for e in invalid["errors"]} == {
        "'q' is a required property", "Additional properties are not allowed ('query' was unexpected)"}
    assert forbidden["error"] == "guardrail_rejected" and "read-only" in forbidden["message"]
    assert ok["ok"] is True and ok["result"]["body"]["received"] == {"q": "steward"}, ok
    assert len(tool_server.writes) == writes_before  # the write tool never ran
    # The decision chain, in order: five model turns, four tool-call outcomes between them.
    trace = [e for e in await run_events(client, tenant.headers, run["id"])
             if e["type"] in ("model_called", "guardrail_rejected", "tool_called")]
    assert [(e["type"], e["data"].get("reason")) for e in trace] == [
        ("model_called", None), ("guardrail_rejected", "unknown_tool"),
        ("model_called", None), ("guardrail_rejected", "invalid_args"),
        ("model_called", None), ("guardrail_rejected", "read_only"),
        ("model_called", None), ("tool_called", None), ("model_called", None)]
    heard = [e["data"] for e in await run_events(client, tenant.headers, run["id"])
             if e["type"] == "agent_tool_result"]
    assert [(h["tool"], h["ok"]) for h in heard] == [
        ("search_web", False), ("lookup", False), ("send_email", False), ("lookup", True)]
    turn = trace[0]["data"]
    assert turn["tool_calls"] == [{"id": "call_0_0", "name": "search_web"}] and turn["cost_usd"]
    audit = (await db.execute(text(
        "SELECT action, coalesce(data->>'reason', outcome) FROM audit_event WHERE tenant_id = :t "
        "AND action IN ('guardrail.reject', 'tool.call') ORDER BY id"), {"t": tenant.tenant_id})).all()
    # Every guardrail decision and every call that ran is on the audit record.
    assert [tuple(r) for r in audit] == [("guardrail.reject", "unknown_tool"), ("guardrail.reject", "invalid_args"),
                                         ("guardrail.reject", "read_only"), ("tool.call", "ok")]


async def test_identical_failing_calls_end_the_loop(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, model_server: ModelServer,
    tool_server: ToolServer,
) -> None:
    model = model_name()
    model_server.script(model, lambda body: Turn.tool_calls([("lookup", {"query": "again"})]))
    await add_provider(client, tenant.headers, model_server, model)
    await tools(client, tenant, tool_server)
    started = await agent_run(client, tenant, model, tool_names=["lookup"], agent={"loop_limit": 3})
    run = await wait_run(client, tenant.headers, started["id"])
    error = step(run, "agent")["error"]
    assert run["status"] == "failed" and error["class"] == "agent_loop", run
    assert "3 times" in error["message"]
    assert len(model_server.calls(model)) == 3


async def test_max_turns_ends_an_agent_that_never_answers(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, model_server: ModelServer,
    tool_server: ToolServer,
) -> None:
    model = model_name()
    model_server.script(model, lambda body: Turn.tool_calls([("lookup", {"q": f"n{len(body['messages'])}"})]))
    await add_provider(client, tenant.headers, model_server, model)
    await tools(client, tenant, tool_server)
    started = await agent_run(client, tenant, model, tool_names=["lookup"], agent={"max_turns": 4})
    run = await wait_run(client, tenant.headers, started["id"])
    assert step(run, "agent")["error"]["class"] == "max_turns", run
    assert len(model_server.calls(model)) == 4


def counting_script(tool_calls: int) -> Callable[[dict[str, Any]], Turn]:
    """``tool_calls`` turns that each look up something new, then a final answer."""
    def turn(body: dict[str, Any]) -> Turn:
        n = sum(1 for m in body["messages"] if m["role"] == "assistant")
        if n < tool_calls:
            return Turn.tool_calls([("lookup", {"q": f"item {n}"})], usage=(200, 20))
        return Turn.final(f"looked up {n} things", usage=(200, 20))
    return turn


async def test_step_limit_pauses_the_run_and_raising_it_resumes_without_repeating_a_call(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, model_server: ModelServer,
    tool_server: ToolServer,
) -> None:
    model = model_name()
    model_server.script(model, counting_script(5))
    await add_provider(client, tenant.headers, model_server, model)
    await tools(client, tenant, tool_server)
    started = await agent_run(client, tenant, model, tool_names=["lookup"], limits={"max_steps": 3})
    run = await wait_for(client, tenant.headers, started["id"], lambda r: r["status"] == "paused")
    assert run["status_reason"] == "budget_exhausted"
    # Turn, call, turn: three steps; the 2nd turn's call would be the 4th, refused before it ran.
    assert len(model_server.calls(model)) == 2
    assert len([c for c in tool_server.calls_to("/echo") if c.idempotency_key
                and c.idempotency_key.startswith(f"{run['id']}:agent:")]) == 1
    # 6 turns and 5 calls in all.
    r = await client.put(f"/api/v1/runs/{run['id']}/limits", json={"max_steps": 11}, headers=tenant.headers)
    assert r.status_code == 200, r.text
    assert (await client.post(f"/api/v1/runs/{run['id']}/resume", headers=tenant.headers)).status_code == 200
    run = await wait_run(client, tenant.headers, run["id"])
    assert run["status"] == "succeeded" and step(run, "agent")["output"] == "looked up 5 things", run
    calls = model_server.calls(model)
    assert [c.turn for c in calls] == [0, 1, 2, 3, 4, 5]  # no model turn paid for twice
    echoed = [c for c in tool_server.calls_to("/echo") if c.idempotency_key
              and c.idempotency_key.startswith(f"{run['id']}:agent:")]
    assert len(echoed) == 5 and len({c.idempotency_key for c in echoed}) == 5
    usage = (await client.get("/api/v1/budgets/usage", params={"run": run["id"]}, headers=tenant.headers)).json()
    assert usage["run"]["tool_calls"] == 11


async def test_an_agent_that_loops_pauses_at_the_default_step_limit(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, model_server: ModelServer,
    tool_server: ToolServer,
) -> None:
    """Under the default max_steps (25) an agent that never answers, each turn looking up something new,
    is stopped by the budget: 13 model turns and the 12 calls it chose, the 13th call refused unmade."""
    model = model_name()
    model_server.script(model, lambda body: Turn.tool_calls([("lookup", {"q": f"n{len(body['messages'])}"})]))
    await add_provider(client, tenant.headers, model_server, model)
    await tools(client, tenant, tool_server)
    started = await agent_run(client, tenant, model, tool_names=["lookup"], agent={"max_turns": 100})
    run = await wait_for(client, tenant.headers, started["id"], lambda r: r["status"] in ("paused", "failed"))
    assert run["status"] == "paused" and run["status_reason"] == "budget_exhausted", run
    assert "25 agent steps" in run["error"]["message"], run["error"]
    assert len(model_server.calls(model)) == 13
    made = [c for c in tool_server.calls_to("/echo") if c.idempotency_key
            and c.idempotency_key.startswith(f"{run['id']}:agent:")]
    assert len(made) == 12
    events = await run_events(client, tenant.headers, run["id"])
    exhausted = [e["data"] for e in events if e["type"] == "budget_exhausted"]
    assert exhausted == [{"limit": "max_steps", "message": run["error"]["message"], "tool": "lookup",
                          "call_id": exhausted[0]["call_id"], "action": "pause"}]
    usage = (await client.get("/api/v1/budgets/usage", params={"run": run["id"]}, headers=tenant.headers)).json()
    assert usage["run"]["limits"]["max_steps"] == 25 and usage["run"]["tool_calls"] == 25


async def test_parallel_agents_of_one_run_share_max_steps_and_never_pass_it(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, model_server: ModelServer,
    tool_server: ToolServer,
) -> None:
    """Agents running at once in one run count their turns and calls against the one max_steps: each
    turn's chosen calls are counted when the turn is saved, under the run's usage row lock."""
    model = model_name()
    model_server.script(model, lambda body: Turn.tool_calls([("lookup", {"q": f"n{len(body['messages'])}"}),
                                                             ("lookup", {"q": f"m{len(body['messages'])}"})]))
    await add_provider(client, tenant.headers, model_server, model)
    await tools(client, tenant, tool_server)
    workflow = name()
    agent = {"model": f"local/{model}", "instructions": "You help.", "input": "go", "tools": ["lookup"],
             "max_turns": 100}
    await create_workflow(client, tenant.headers, workflow, [{"id": f"agent{i}", "agent": agent} for i in range(3)])
    started = await start_run(client, tenant.headers, workflow, {}, limits={"max_steps": 10})
    # Three agents at once on a busy machine: the bounds are hang guards only.
    run = await wait_for(client, tenant.headers, started["id"], lambda r: r["status"] in ("paused", "failed"), 60)
    # Steps still running when the run paused finish their turn or call: wait until none runs.
    run = await wait_for(client, tenant.headers, run["id"],
                         lambda r: not any(s["status"] == "running" for s in r["steps"]), 60)
    assert run["status"] == "paused" and run["status_reason"] == "budget_exhausted", run
    usage = (await client.get("/api/v1/budgets/usage", params={"run": run["id"]}, headers=tenant.headers)).json()
    assert usage["run"]["tool_calls"] == 10
    made = [c for c in tool_server.calls_to("/echo") if c.idempotency_key
            and c.idempotency_key.startswith(f"{run['id']}:")]
    assert len(model_server.calls(model)) + len(made) <= 10, (len(model_server.calls(model)), len(made))


async def test_token_limit_pauses_before_the_model_call_and_resumes_after_raising_it(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, model_server: ModelServer,
    tool_server: ToolServer,
) -> None:
    model = model_name()
    model_server.script(model, counting_script(1))
    await add_provider(client, tenant.headers, model_server, model)
    await tools(client, tenant, tool_server)
    # One turn reserves its prompt (a few hundred tokens at most) plus 500 for the answer.
    started = await agent_run(client, tenant, model, tool_names=["lookup"], agent={"max_tokens": 500},
                              limits={"max_tokens": 1200})
    run = await wait_for(client, tenant.headers, started["id"], lambda r: r["status"] == "paused")
    assert run["status_reason"] == "budget_exhausted" and "1200 tokens" in run["error"]["message"], run
    assert len(model_server.calls(model)) == 1
    usage = (await client.get("/api/v1/budgets/usage", params={"run": run["id"]}, headers=tenant.headers)).json()
    assert usage["run"]["tokens"] == 220 and usage["run"]["reserved_tokens"] == 0
    await client.put(f"/api/v1/runs/{run['id']}/limits", json={"max_tokens": 5000}, headers=tenant.headers)
    await client.post(f"/api/v1/runs/{run['id']}/resume", headers=tenant.headers)
    run = await wait_run(client, tenant.headers, run["id"])
    assert run["status"] == "succeeded", run
    assert [c.turn for c in model_server.calls(model)] == [0, 1]


async def test_twenty_concurrent_runs_never_spend_past_the_tenant_cap(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, model_server: ModelServer,
) -> None:
    model = model_name()
    # Every call reserves and spends exactly $1 (1000 answer tokens at $1000/M, prompts free).
    model_server.script(model, [Turn.final("ok", usage=(0, 1000))])
    await add_provider(client, tenant.headers, model_server, model,
                       price={"input_per_mtok": "0", "output_per_mtok": "1000"})
    # The cap is per clock hour: a test straddling the top of the hour would see two windows of $5.
    await clear_of_the_hour_boundary(margin_s=90)
    r = await client.put("/api/v1/budgets", json={"hourly_usd": 5}, headers=tenant.headers)
    assert r.status_code == 200, r.text
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [
        {"id": "ask", "llm": {"model": f"local/{model}", "prompt": "hi", "max_tokens": 1000}}])
    runs = await asyncio.gather(*(start_run(client, tenant.headers, workflow) for _ in range(20)))
    final = [await wait_for(client, tenant.headers, r["id"], lambda x: x["status"] in ("succeeded", "paused"))
             for r in runs]
    statuses = sorted(r["status"] for r in final)
    assert statuses.count("succeeded") == 5 and statuses.count("paused") == 15, statuses
    assert all(r["status_reason"] == "budget_exhausted" for r in final if r["status"] == "paused")
    assert len(model_server.calls(model)) == 5
    usage = (await client.get("/api/v1/budgets/usage", headers=tenant.headers)).json()
    assert float(usage["hour"]["spent_usd"]) == 5.0 and float(usage["hour"]["reserved_usd"]) == 0.0, usage


async def test_gated_agent_call_waits_for_approval_and_runs_the_edited_arguments(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, model_server: ModelServer,
    tool_server: ToolServer, make_tenant: MakeTenant,
) -> None:
    approver = await make_tenant(name=tenant.name, roles=("approver", "viewer"))
    model = model_name()
    model_server.script(model, [
        Turn.tool_calls([("send_email", {"to": "everyone@example.com"})]),
        Turn.tool_calls([("send_email", {"to": "spam@example.com"})]),
        Turn.final("sent"),
    ])
    await add_provider(client, tenant.headers, model_server, model)
    await tools(client, tenant, tool_server, autonomy={"mode": "manual"})
    started = await agent_run(client, tenant, model, tool_names=["send_email"])
    approvals = []
    for decision in ({"decision": "approve", "args": {"to": "team@example.com"}, "comment": "narrower"},
                     {"decision": "reject", "comment": "no spam"}):
        await wait_for(client, tenant.headers, started["id"], lambda r: r["status"] == "waiting")
        pending = (await client.get("/api/v1/approvals", params={"status": "pending", "run": started["id"]},
                                    headers=tenant.headers)).json()["items"]
        assert len(pending) == 1 and pending[0]["kind"] == "agent", pending
        approvals.append(pending[0])
        r = await client.post(f"/api/v1/approvals/{pending[0]['id']}/decision", json=decision,
                              headers=approver.headers)
        assert r.status_code == 200, r.text
    run = await wait_run(client, tenant.headers, started["id"])
    assert run["status"] == "succeeded" and step(run, "agent")["output"] == "sent", run
    assert [a["args"] for a in approvals] == [{"to": "everyone@example.com"}, {"to": "spam@example.com"}]
    sent = [w.body for w in tool_server.writes if w.idempotency_key and w.idempotency_key.startswith(run["id"])]
    assert sent == [{"to": "team@example.com"}]  # the edited arguments; the rejected call never ran
    calls = model_server.calls(model)
    assert [c.turn for c in calls] == [0, 1, 2]
    approved, rejected = results(calls[1])[-1], results(calls[2])[-1]
    assert approved["ok"] is True
    assert rejected == {"ok": False, "error": "approval_rejected", "message": "the call was rejected: no spam"}


async def test_a_failing_model_is_retried_by_the_engine_without_repeating_earlier_turns(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, model_server: ModelServer,
    tool_server: ToolServer,
) -> None:
    model = model_name()
    failures = iter([Turn.error(503, "overloaded"), Turn.error(429, "slow down", retry_after=0)])
    model_server.script(model, [
        Turn.tool_calls([("lookup", {"q": "a"})]),
        lambda body: next(failures, Turn.final("done")),
    ])
    await add_provider(client, tenant.headers, model_server, model)
    await tools(client, tenant, tool_server)
    started = await agent_run(client, tenant, model, tool_names=["lookup"])
    run = await wait_run(client, tenant.headers, started["id"])
    assert run["status"] == "succeeded", run
    assert [(c.turn, c.status) for c in model_server.calls(model)] == [(0, 200), (1, 503), (1, 429), (1, 200)]
    assert len([c for c in tool_server.calls_to("/echo") if c.idempotency_key
                and c.idempotency_key.startswith(run["id"])]) == 1
    failed = [e for e in await run_events(client, tenant.headers, run["id"]) if e["type"] == "model_call_failed"]
    assert [e["data"]["error"] for e in failed] == ["http_503", "http_429"]


async def test_tool_results_are_trimmed_for_the_model(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, model_server: ModelServer,
    tool_server: ToolServer,
) -> None:
    model = model_name()
    model_server.script(model, [Turn.tool_calls([("big", {})]), Turn.final("ok")])
    await add_provider(client, tenant.headers, model_server, model)
    await register(client, tenant.headers, name="big", executor=http_tool(tool_server.url + "/huge?bytes=50000",
                                                                            method="GET"))
    started = await agent_run(client, tenant, model, tool_names=["big"], agent={"max_result_bytes": 1000})
    run = await wait_run(client, tenant.headers, started["id"])
    assert run["status"] == "succeeded", run
    content = model_server.calls(model)[1].tool_messages[0]["content"]
    assert content.endswith("only the first 1000 shown]") and len(content.encode()) < 1100


async def test_the_model_api_key_never_leaves_the_vault(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, model_server: ModelServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = "sk-test-7f3e9a1b2c4d5e6f"
    model = model_name()
    model_server.script(model, [Turn.final("fine")])
    await client.put("/api/v1/secrets/model_key", json={"value": key}, headers=tenant.headers)
    await add_provider(client, tenant.headers, model_server, model, name="keyed", api_key_secret="model_key")
    caplog.set_level(logging.DEBUG)
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [
        {"id": "ask", "llm": {"model": f"keyed/{model}", "prompt": "hi"}}])
    run = await wait_run(client, tenant.headers, (await start_run(client, tenant.headers, workflow))["id"])
    assert run["status"] == "succeeded", run
    (request,) = model_server.calls(model)
    assert request.headers["authorization"] == f"Bearer {key}"
    seen = [
        (await client.get(f"/api/v1/runs/{run['id']}", headers=tenant.headers)).text,
        json.dumps(await run_events(client, tenant.headers, run["id"])),
        (await client.get("/api/v1/providers/keyed", headers=tenant.headers)).text,
        (await client.get("/api/v1/providers", headers=tenant.headers)).text,
        caplog.text,
    ]
    assert all(key not in text for text in seen)


async def test_sigkill_mid_agent_repeats_no_model_call_and_no_write(
    client: httpx.AsyncClient, tenant: TenantKey, model_server: ModelServer, tool_server: ToolServer,
    worker_process: Callable[..., WorkerProcess],
) -> None:
    model = model_name()
    model_server.script(model, [
        Turn.tool_calls([("send_email", {"to": "team@example.com"})]),
        Turn.tool_calls([("slow", {})]),
        Turn.final("all done"),
    ])
    await add_provider(client, tenant.headers, model_server, model)
    await tools(client, tenant, tool_server)
    await register(client, tenant.headers, name="slow", executor=http_tool(tool_server.url + "/hang?seconds=3"))
    doomed = worker_process(lease_s=1.5)
    started = await agent_run(client, tenant, model, tool_names=["send_email", "slow"])
    deadline = asyncio.get_running_loop().time() + 20
    while not [c for c in tool_server.calls_to("/hang") if c.idempotency_key
               and c.idempotency_key.startswith(started["id"])]:
        assert asyncio.get_running_loop().time() < deadline, "the agent never reached the slow tool"
        await asyncio.sleep(0.02)
    doomed.kill()
    worker_process(lease_s=1.5)
    run = await wait_run(client, tenant.headers, started["id"], timeout=30)
    assert run["status"] == "succeeded" and step(run, "agent")["output"] == "all done", run
    assert [c.turn for c in model_server.calls(model)] == [0, 1, 2]
    writes = [w for w in tool_server.writes if w.idempotency_key and w.idempotency_key.startswith(run["id"])]
    assert len(writes) == 1
    hangs = [c for c in tool_server.calls_to("/hang") if c.idempotency_key
             and c.idempotency_key.startswith(run["id"])]
    assert len(hangs) == 2  # the interrupted read ran again: it had not completed
    attempts = step(run, "agent")["attempts"]
    assert [a["error"]["class"] for a in attempts[:-1]] == ["worker_lost"] and attempts[-1]["status"] == "succeeded"


async def test_a_retried_run_starts_the_agent_conversation_afresh(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, model_server: ModelServer,
    tool_server: ToolServer,
) -> None:
    model = model_name()
    model_server.script(model, lambda body: Turn.tool_calls([("lookup", {"query": "wrong"})]))
    await add_provider(client, tenant.headers, model_server, model)
    await tools(client, tenant, tool_server)
    started = await agent_run(client, tenant, model, tool_names=["lookup"], agent={"loop_limit": 2})
    run = await wait_run(client, tenant.headers, started["id"])
    assert step(run, "agent")["error"]["class"] == "agent_loop", run
    model_server.script(model, [Turn.tool_calls([("lookup", {"q": "right"})]), Turn.final("fixed")])
    assert (await client.post(f"/api/v1/runs/{run['id']}/retry", headers=tenant.headers)).status_code == 200
    run = await wait_run(client, tenant.headers, run["id"])
    assert run["status"] == "succeeded" and step(run, "agent")["output"] == "fixed", run
    # Two failing turns, then the retry's conversation from its first turn: no old failure carried over.
    assert [c.turn for c in model_server.calls(model)] == [0, 1, 0, 1]
    assert len(model_server.calls(model)[2].messages) == 2
    r = await client.get(f"/api/v1/runs/{run['id']}/steps/agent/conversation", headers=tenant.headers)
    assert r.status_code == 200, r.text
    kinds = [(e["seq"], e["kind"]) for e in r.json()["items"]]
    assert kinds == [(0, "model"), (1, "tool"), (2, "model"), (3, "tool"), (4, "reset"), (5, "model"),
                     (6, "tool"), (7, "model")]
    assert r.json()["items"][-1]["data"]["message"]["content"] == "fixed"
    page = (await client.get(f"/api/v1/runs/{run['id']}/steps/agent/conversation", params={"limit": 3},
                             headers=tenant.headers)).json()
    assert len(page["items"]) == 3 and page["next_cursor"] == 2
    missing = await client.get(f"/api/v1/runs/{run['id']}/steps/nope/conversation", headers=tenant.headers)
    assert missing.status_code == 404 and missing.json()["type"].endswith("step-not-found")


def same_id_call(name: str, args: dict[str, Any]) -> Turn:
    """A turn from a server that reuses tool-call ids across turns (or derives them from the call)."""
    call = {"id": "call_0", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
    return Turn.raw({"id": "x", "object": "chat.completion", "model": "m", "choices": [{
        "index": 0, "finish_reason": "tool_calls",
        "message": {"role": "assistant", "content": None, "tool_calls": [call]}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})


async def test_a_repeated_identical_gated_call_asks_again(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, model_server: ModelServer,
    tool_server: ToolServer, make_tenant: MakeTenant,
) -> None:
    approver = await make_tenant(name=tenant.name, roles=("approver", "viewer"))
    model = model_name()
    email = {"to": "team@example.com"}
    model_server.script(model, [same_id_call("send_email", email), same_id_call("send_email", email),
                                Turn.final("sent twice")])
    await add_provider(client, tenant.headers, model_server, model)
    await tools(client, tenant, tool_server, autonomy={"mode": "manual"})
    started = await agent_run(client, tenant, model, tool_names=["send_email"])
    decided = []
    for _ in range(2):
        await wait_for(client, tenant.headers, started["id"], lambda r: r["status"] == "waiting")
        (approval,) = (await client.get("/api/v1/approvals", params={"status": "pending", "run": started["id"]},
                                        headers=tenant.headers)).json()["items"]
        decided.append(approval["call_id"])
        r = await client.post(f"/api/v1/approvals/{approval['id']}/decision", json={"decision": "approve"},
                              headers=approver.headers)
        assert r.status_code == 200, r.text
    run = await wait_run(client, tenant.headers, started["id"])
    assert run["status"] == "succeeded", run
    assert decided == ["1:call_0", "2:call_0"]
    writes = [w for w in tool_server.writes if w.idempotency_key and w.idempotency_key.startswith(run["id"])]
    assert len(writes) == 2 and len({w.idempotency_key for w in writes}) == 2
