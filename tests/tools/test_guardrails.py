"""Tool steps through the guardrails, against a real worker and a real misbehaving tool server."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from tests.fakes.tool_server import ToolServer
from tests.support.runs import create_workflow, name, start_run, step, wait_run
from tests.support.tenants import MakeTenant, TenantKey
from tests.support.tools import http_tool, register
from tests.support.workers import WorkerProcess

pytestmark = pytest.mark.xdist_group("engine")

SECRET = "tok-9b8c7d6e5f4a3b2c"


async def events(client: httpx.AsyncClient, headers: dict[str, str], run_id: str) -> list[dict[str, Any]]:
    r = await client.get(f"/api/v1/runs/{run_id}/events", params={"limit": 500}, headers=headers)
    assert r.status_code == 200, r.text
    return list(r.json()["items"])


async def one_step_run(client: httpx.AsyncClient, tenant: TenantKey, tool: str, args: dict[str, Any],
                       **definition: Any) -> dict[str, Any]:
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [{"id": "call", "tool": tool, "args": args}],
                          **definition)
    run = await start_run(client, tenant.headers, workflow)
    return await wait_run(client, tenant.headers, run["id"])


async def test_http_tool_with_secret_header(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, tool_server: ToolServer
) -> None:
    await client.put("/api/v1/secrets/echo_key", json={"value": SECRET}, headers=tenant.headers)
    await register(client, tenant.headers, name="echoer", executor=http_tool(
        tool_server.url + "/echo", headers={"Authorization": "Bearer ${{ secrets.echo_key }}"}))
    run = await one_step_run(client, tenant, "echoer", {"q": "hello"})
    assert run["status"] == "succeeded", run["steps"]
    call = next(c for c in tool_server.calls_to("/echo") if c.headers.get("authorization") == f"Bearer {SECRET}")
    assert call.idempotency_key == f"{run['id']}:call"
    # The server echoed the header back: the recorded output has it scrubbed.
    output = step(run, "call")["output"]
    assert output["body"]["headers"]["authorization"] == "Bearer [redacted]"
    trace = await events(client, tenant.headers, run["id"])
    called = [e for e in trace if e["type"] == "tool_called"]
    assert called and called[0]["data"]["tool"] == "echoer" and called[0]["data"]["version"] == 1
    full = (await client.get(f"/api/v1/runs/{run['id']}", headers=tenant.headers)).text
    assert SECRET not in full and SECRET not in str(trace)


async def test_secret_echoed_in_an_error_body_is_scrubbed(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, tool_server: ToolServer
) -> None:
    await client.put("/api/v1/secrets/echo_key", json={"value": SECRET}, headers=tenant.headers)
    await register(client, tenant.headers, name="leaky", executor=http_tool(
        tool_server.url + "/echo-400", headers={"Authorization": "Bearer ${{ secrets.echo_key }}"}))
    run = await one_step_run(client, tenant, "leaky", {})
    assert run["status"] == "failed"
    error = step(run, "call")["error"]
    assert error["class"] == "http_400" and "[redacted]" in error["message"]
    trace = await events(client, tenant.headers, run["id"])
    full = (await client.get(f"/api/v1/runs/{run['id']}", headers=tenant.headers)).text
    assert SECRET not in full and SECRET not in str(trace)


async def test_invalid_args_fail_with_every_schema_error(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, tool_server: ToolServer
) -> None:
    schema = {"type": "object", "required": ["order", "amount"],
              "properties": {"order": {"type": "string"}, "amount": {"type": "number", "maximum": 100}}}
    await register(client, tenant.headers, name="refund", input_schema=schema, executor=http_tool(
        tool_server.url + "/echo"))
    run = await one_step_run(client, tenant, "refund", {"amount": 500})
    assert run["status"] == "failed"
    error = step(run, "call")["error"]
    assert error["class"] == "invalid_args" and "'order' is a required property" in error["message"]
    assert "500 is greater than the maximum of 100" in error["message"]
    assert len(step(run, "call")["attempts"]) == 1  # permanent: not retried


@pytest.mark.parametrize("case", ["allowlist", "read_only", "role"])
async def test_permission_rejections_are_recorded_audited_and_alerted(
    case: str, client: httpx.AsyncClient, make_tenant: MakeTenant, worker: Settings, tool_server: ToolServer,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    admin = await make_tenant()
    await client.put("/api/v1/settings", json={"alert_webhook": tool_server.url + "/echo"}, headers=admin.headers)
    await register(client, admin.headers, name="pay", effect="write", required_roles=["approver"],
                   executor=http_tool(tool_server.url + "/write"))
    definition: dict[str, Any] = {}
    headers = admin.headers
    if case == "allowlist":
        definition = {"permissions": {"tools": ["echo"]}}
    elif case == "read_only":
        definition = {"permissions": {"read_only": True}}
    else:
        # A key of the same tenant whose roles lack "approver".
        starter = await make_tenant(name=admin.name, roles=("operator", "author", "viewer"))
        headers = starter.headers
    writes_before = len(tool_server.writes)
    workflow = name()
    await create_workflow(client, admin.headers, workflow, [{"id": "call", "tool": "pay", "args": {"n": 1}}],
                          **definition)
    run = await wait_run(client, headers, (await start_run(client, headers, workflow))["id"])
    assert run["status"] == "failed"
    error = step(run, "call")["error"]
    assert error["class"] == "guardrail_rejected"
    expected = {"allowlist": "not in this workflow's allowlist", "read_only": "this workflow is read-only",
                "role": "needs the role(s) approver"}[case]
    assert expected in error["message"]
    assert len(tool_server.writes) == writes_before
    rejected = [e for e in await events(client, admin.headers, run["id"]) if e["type"] == "guardrail_rejected"]
    assert rejected and rejected[0]["data"]["reason"] == {"allowlist": "not_allowed", "read_only": "read_only",
                                                          "role": "missing_role"}[case]
    async with sessionmaker() as session:
        audited = (await session.execute(text(
            "SELECT count(*) FROM audit_event WHERE tenant_id = :t AND action = 'guardrail.reject' "
            "AND target = :target AND outcome = 'denied'"), {"t": admin.tenant_id, "target": f"run:{run['id']}"}
        )).scalar_one()
    assert audited == 1
    for _ in range(100):
        alerts = [c for c in tool_server.calls_to("/echo") if isinstance(c.body, dict)
                  and c.body.get("type") == "guardrail_rejected" and c.body.get("run") == run["id"]]
        if alerts:
            break
        await asyncio.sleep(0.05)
    assert alerts, "the alert webhook was not called"
    reason = {"allowlist": "not_allowed", "read_only": "read_only", "role": "missing_role"}[case]
    metrics = (await client.get("/metrics")).text
    assert f'steward_guardrail_decisions_total{{guardrail="{reason}",outcome="rejected"}}' in metrics


async def test_shadow_mode_records_but_does_not_run_write_tools(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, tool_server: ToolServer
) -> None:
    schema = {"type": "object", "properties": {"card": {"type": "string", "writeOnly": True}}}
    await register(client, tenant.headers, name="charge", effect="write", input_schema=schema,
                   executor=http_tool(tool_server.url + "/write"))
    writes_before = len(tool_server.writes)
    run = await one_step_run(client, tenant, "charge", {"card": "4111111111111111"}, shadow=True)
    assert run["status"] == "succeeded", run
    output = step(run, "call")["output"]
    assert output["shadow"] is True and output["would_have_run"]["tool"] == "charge"
    assert output["would_have_run"]["args"] == {"card": "[redacted]"}
    assert len(tool_server.writes) == writes_before
    trace = await events(client, tenant.headers, run["id"])
    assert any(e["type"] == "tool_shadowed" for e in trace)
    assert "4111111111111111" not in str(trace)
    # A read tool still runs in shadow mode.
    run = await one_step_run(client, tenant, "echo", {"x": 1}, shadow=True)
    assert step(run, "call")["output"] == {"x": 1}


async def test_responses_are_cut_and_selected(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, tool_server: ToolServer
) -> None:
    await register(client, tenant.headers, name="huge", max_response_bytes=2048,
                   executor=http_tool(tool_server.url + "/huge?bytes=5000000"))
    run = await one_step_run(client, tenant, "huge", {})
    output = step(run, "call")["output"]
    assert run["status"] == "succeeded" and output["truncated"] is True and len(output["body"]) == 2048
    await register(client, tenant.headers, name="picky", response="${{ body.received.keep }}",
                   executor=http_tool(tool_server.url + "/echo"))
    run = await one_step_run(client, tenant, "picky", {"keep": {"a": 1}, "drop": "x" * 1000})
    assert step(run, "call")["output"] == {"a": 1}


async def test_rate_limited_tool_retries_after_retry_after(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, tool_server: ToolServer
) -> None:
    await register(client, tenant.headers, name="limited", retry={"max_attempts": 3, "backoff_base_s": 0.01},
                   executor=http_tool(tool_server.url + "/ratelimit?times=1&retry_after=1"))
    run = await one_step_run(client, tenant, "limited", {})
    assert run["status"] == "succeeded", run
    first, second = step(run, "call")["attempts"]
    assert first["error"]["class"] == "http_429"
    from datetime import datetime

    gap = datetime.fromisoformat(second["started_at"]) - datetime.fromisoformat(first["finished_at"])
    assert gap.total_seconds() >= 0.9


async def test_hanging_tool_hits_its_hard_timeout(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, tool_server: ToolServer
) -> None:
    await register(client, tenant.headers, name="hangs", timeout_s=0.3, retry={"max_attempts": 2,
                                                                               "backoff_base_s": 0.01},
                   executor=http_tool(tool_server.url + "/hang?seconds=5"))
    run = await one_step_run(client, tenant, "hangs", {})
    assert run["status"] == "failed"
    attempts = step(run, "call")["attempts"]
    assert [a["error"]["class"] for a in attempts] == ["timeout", "timeout"]


async def test_ssrf_refused_unless_allowlisted(
    client: httpx.AsyncClient, tenant: TenantKey, strict_worker: Settings, tool_server: ToolServer
) -> None:
    await register(client, tenant.headers, name="internal", executor=http_tool(tool_server.url + "/echo"))
    for target in ("internal", "http"):
        args = {} if target == "internal" else {"url": tool_server.url + "/echo", "method": "POST"}
        run = await one_step_run(client, tenant, target, args)
        assert run["status"] == "failed"
        assert step(run, "call")["error"]["class"] == "forbidden_destination"
    await client.put("/api/v1/settings", json={"http_allowlist": ["127.0.0.1"]}, headers=tenant.headers)
    run = await one_step_run(client, tenant, "internal", {})
    assert run["status"] == "succeeded", run


async def test_breaker_opens_across_two_worker_processes_and_fallback_is_used(
    client: httpx.AsyncClient, tenant: TenantKey, worker_process: Callable[..., WorkerProcess],
    tool_server: ToolServer,
) -> None:
    await register(client, tenant.headers, name="backup", executor=http_tool(tool_server.url + "/echo"))
    await register(client, tenant.headers, name="flaky_api", fallback="backup",
                   retry={"max_attempts": 1}, breaker={"failure_threshold": 3, "window_s": 60, "open_s": 60},
                   executor=http_tool(tool_server.url + "/fail"))
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [{"id": "call", "tool": "flaky_api", "args": {}}])
    fails_before = len(tool_server.calls_to("/fail"))

    async def one() -> dict[str, Any]:
        return await wait_run(client, tenant.headers, (await start_run(client, tenant.headers, workflow))["id"], 30)

    # Two failures in the first worker process, the third in a second one: together they open the breaker.
    first = worker_process()
    early = [await one(), await one()]
    first.stop()
    worker_process()
    third = await one()
    later = await asyncio.gather(*(one() for _ in range(4)))
    assert [r["status"] for r in [*early, third]] == ["failed"] * 3
    assert len(tool_server.calls_to("/fail")) - fails_before == 3
    assert [r["status"] for r in later] == ["succeeded"] * 4
    assert all(step(r, "call")["output"]["body"]["received"] == {} for r in later)
    workers = [step(r, "call")["attempts"][0]["worker"] for r in [*early, third]]
    assert workers[0] == workers[1] != workers[2]
    trace = await events(client, tenant.headers, later[0]["id"])
    assert any(e["type"] == "fallback_used" and e["data"]["fallback"] == "backup" for e in trace)


async def test_worker_serves_its_tool_metrics(
    client: httpx.AsyncClient, tenant: TenantKey, worker_process: Callable[..., WorkerProcess],
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    worker_process(worker_metrics_port=port)
    run = await one_step_run(client, tenant, "echo", {"hello": 1})
    assert run["status"] == "succeeded", run
    async with httpx.AsyncClient() as scraper:
        body = (await scraper.get(f"http://127.0.0.1:{port}/metrics")).text
    ok_calls = 'steward_tool_calls_total{outcome="ok",tool="echo"}'
    calls = [line for line in body.splitlines() if line.startswith(ok_calls)]
    assert calls and float(calls[0].split()[-1]) >= 1, body[:2000]
    assert "steward_guardrail_overhead_seconds_count" in body
