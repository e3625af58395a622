"""Approval gates: manual and conditional tools, approval steps, four-eyes, edits, expiry, races."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from app.config import Settings
from tests.fakes.tool_server import ToolServer
from tests.support.runs import create_workflow, name, start_run, step, wait_for, wait_run
from tests.support.tenants import MakeTenant, TenantKey
from tests.support.tools import http_tool, register

pytestmark = pytest.mark.xdist_group("engine")

REFUND_SCHEMA = {"type": "object", "required": ["order", "amount"],
                 "properties": {"order": {"type": "string"}, "amount": {"type": "number", "maximum": 1000}}}


async def gated_run(
    client: httpx.AsyncClient, starter: TenantKey, admin: TenantKey, tool_server: ToolServer, args: dict[str, Any],
    autonomy: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], str]:
    tool = f"refund_{name()[3:]}"
    await register(client, admin.headers, name=tool, effect="write", input_schema=REFUND_SCHEMA,
                   autonomy=autonomy or {"mode": "manual"}, executor=http_tool(tool_server.url + "/write"))
    workflow = name()
    await create_workflow(client, admin.headers, workflow, [{"id": "refund", "tool": tool, "args": args}])
    run = await start_run(client, starter.headers, workflow)
    return run, tool


async def pending(client: httpx.AsyncClient, headers: dict[str, str], run_id: str) -> dict[str, Any]:
    for _ in range(200):
        r = await client.get("/api/v1/approvals", params={"status": "pending", "run": run_id}, headers=headers)
        items = r.json()["items"]
        if items:
            return dict(items[0])
        await asyncio.sleep(0.05)
    raise AssertionError("no pending approval appeared")


async def decide(client: httpx.AsyncClient, headers: dict[str, str], approval_id: str, **body: Any) -> httpx.Response:
    return await client.post(f"/api/v1/approvals/{approval_id}/decision", json=body, headers=headers)


@pytest.fixture
async def people(make_tenant: MakeTenant) -> tuple[TenantKey, TenantKey]:
    """An operator who starts runs and an approver in the same tenant."""
    admin = await make_tenant()
    approver = await make_tenant(name=admin.name, roles=("approver", "viewer"))
    return admin, approver


async def test_manual_tool_waits_then_runs_once_approved(
    client: httpx.AsyncClient, people: tuple[TenantKey, TenantKey], worker: Settings, tool_server: ToolServer
) -> None:
    admin, approver = people
    run, tool = await gated_run(client, admin, admin, tool_server, {"order": "o-1", "amount": 50})
    approval = await pending(client, approver.headers, run["id"])
    assert approval["tool"] == tool and approval["tool_version"] == 1
    assert approval["args"] == {"order": "o-1", "amount": 50} and approval["kind"] == "tool"
    waiting = await wait_for(client, admin.headers, run["id"], lambda r: r["status"] == "waiting")
    assert step(waiting, "refund")["status"] == "waiting"
    assert not [w for w in tool_server.writes if w.idempotency_key == f"{run['id']}:refund"]
    # Four-eyes: whoever started the run cannot approve it.
    own = await decide(client, admin.headers, approval["id"], decision="approve")
    assert own.status_code == 403 and "four-eyes" in own.json()["detail"]
    ok = await decide(client, approver.headers, approval["id"], decision="approve", comment="fine")
    assert ok.status_code == 200 and ok.json()["status"] == "approved"
    done = await wait_run(client, admin.headers, run["id"])
    assert done["status"] == "succeeded", done["steps"]
    writes = [w for w in tool_server.writes if w.idempotency_key == f"{run['id']}:refund"]
    assert [w.body for w in writes] == [{"order": "o-1", "amount": 50}]
    again = await decide(client, approver.headers, approval["id"], decision="reject")
    assert again.status_code == 409


async def test_approve_with_edited_arguments(
    client: httpx.AsyncClient, people: tuple[TenantKey, TenantKey], worker: Settings, tool_server: ToolServer
) -> None:
    admin, approver = people
    run, _ = await gated_run(client, admin, admin, tool_server, {"order": "o-2", "amount": 900})
    approval = await pending(client, approver.headers, run["id"])
    bad = await decide(client, approver.headers, approval["id"], decision="approve", args={"order": "o-2",
                                                                                          "amount": 5000})
    assert bad.status_code == 422 and bad.json()["errors"][0]["pointer"] == "/body/args/amount"
    ok = await decide(client, approver.headers, approval["id"], decision="approve",
                      args={"order": "o-2", "amount": 90}, comment="a tenth")
    assert ok.json()["approved_args"] == {"order": "o-2", "amount": 90}
    done = await wait_run(client, admin.headers, run["id"])
    assert done["status"] == "succeeded", done["steps"]
    writes = [w.body for w in tool_server.writes if w.idempotency_key == f"{run['id']}:refund"]
    assert writes == [{"order": "o-2", "amount": 90}]


async def test_reject_fails_the_step(
    client: httpx.AsyncClient, people: tuple[TenantKey, TenantKey], worker: Settings, tool_server: ToolServer
) -> None:
    admin, approver = people
    run, _ = await gated_run(client, admin, admin, tool_server, {"order": "o-3", "amount": 10})
    approval = await pending(client, approver.headers, run["id"])
    r = await decide(client, approver.headers, approval["id"], decision="reject", comment="not this one")
    assert r.status_code == 200
    done = await wait_run(client, admin.headers, run["id"])
    assert done["status"] == "failed"
    assert step(done, "refund")["error"]["class"] == "approval_rejected"
    assert "not this one" in step(done, "refund")["error"]["message"]
    # Retrying the run asks again: the rejection does not carry over, nor could an approval.
    r = await client.post(f"/api/v1/runs/{run['id']}/retry", headers=admin.headers)
    assert r.status_code == 200, r.text
    again = await pending(client, approver.headers, run["id"])
    assert again["id"] != approval["id"]
    r = await client.get(f"/api/v1/approvals/{approval['id']}", headers=approver.headers)
    assert r.json()["status"] == "rejected"
    await decide(client, approver.headers, again["id"], decision="approve")
    done = await wait_run(client, admin.headers, run["id"])
    assert done["status"] == "succeeded", done


async def test_concurrent_decisions_exactly_one_wins(
    client: httpx.AsyncClient, people: tuple[TenantKey, TenantKey], make_tenant: MakeTenant, worker: Settings,
    tool_server: ToolServer,
) -> None:
    admin, approver = people
    other = await make_tenant(name=admin.name, roles=("approver",))
    run, _ = await gated_run(client, admin, admin, tool_server, {"order": "o-4", "amount": 10})
    approval = await pending(client, approver.headers, run["id"])
    results = await asyncio.gather(
        decide(client, approver.headers, approval["id"], decision="approve"),
        decide(client, other.headers, approval["id"], decision="reject"),
    )
    assert sorted(r.status_code for r in results) == [200, 409]


async def test_conditional_autonomy(
    client: httpx.AsyncClient, people: tuple[TenantKey, TenantKey], worker: Settings, tool_server: ToolServer
) -> None:
    admin, approver = people
    autonomy = {"mode": "conditional", "condition": "args.amount > 100"}
    small, _ = await gated_run(client, admin, admin, tool_server, {"order": "o-5", "amount": 100}, autonomy)
    assert (await wait_run(client, admin.headers, small["id"]))["status"] == "succeeded"
    big, _ = await gated_run(client, admin, admin, tool_server, {"order": "o-6", "amount": 101}, autonomy)
    approval = await pending(client, approver.headers, big["id"])
    assert "args.amount > 100" in approval["reason"]


async def test_approval_step_approve_and_expiry_policies(
    client: httpx.AsyncClient, people: tuple[TenantKey, TenantKey], worker: Settings
) -> None:
    admin, approver = people
    workflow = name()
    await create_workflow(client, admin.headers, workflow, [
        {"id": "ok", "approval": {"reason": "ship it?"}},
        {"id": "after", "needs": ["ok"], "tool": "echo", "args": {"by": "${{ steps.ok.output.by }}"}},
    ])
    run = await start_run(client, admin.headers, workflow)
    approval = await pending(client, approver.headers, run["id"])
    assert approval["kind"] == "step" and approval["reason"] == "ship it?"
    await decide(client, approver.headers, approval["id"], decision="approve", comment="go")
    done = await wait_run(client, admin.headers, run["id"])
    assert done["status"] == "succeeded" and step(done, "ok")["output"]["comment"] == "go"
    assert step(done, "after")["output"]["by"].startswith("key:")

    expiring = name()
    await create_workflow(client, admin.headers, expiring, [{"id": "gate", "approval": {"timeout_s": 0.3}}])
    run = await start_run(client, admin.headers, expiring)
    done = await wait_run(client, admin.headers, run["id"])
    assert done["status"] == "failed" and step(done, "gate")["error"]["class"] == "approval_expired"
    listed = await client.get("/api/v1/approvals", params={"run": run["id"]}, headers=admin.headers)
    assert listed.json()["items"][0]["status"] == "expired"

    flagged = name()
    await create_workflow(client, admin.headers, flagged, [
        {"id": "gate", "approval": {"timeout_s": 0.3, "on_expiry": "flag"}}])
    run = await start_run(client, admin.headers, flagged)
    for _ in range(100):
        item = (await client.get("/api/v1/approvals", params={"run": run["id"]}, headers=admin.headers)).json()
        if item["items"] and item["items"][0]["flagged"]:
            break
        await asyncio.sleep(0.05)
    assert item["items"][0]["status"] == "pending" and item["items"][0]["flagged"] is True
    current = (await client.get(f"/api/v1/runs/{run['id']}", headers=admin.headers)).json()
    assert step(current, "gate")["status"] == "waiting"
    await decide(client, approver.headers, item["items"][0]["id"], decision="approve")
    assert (await wait_run(client, admin.headers, run["id"]))["status"] == "succeeded"


async def test_cancelling_the_run_cancels_its_pending_approvals(
    client: httpx.AsyncClient, people: tuple[TenantKey, TenantKey], worker: Settings, tool_server: ToolServer
) -> None:
    admin, approver = people
    run, _ = await gated_run(client, admin, admin, tool_server, {"order": "o-9", "amount": 5})
    approval = await pending(client, approver.headers, run["id"])
    assert (await client.post(f"/api/v1/runs/{run['id']}/cancel", headers=admin.headers)).status_code == 200
    r = await client.get(f"/api/v1/approvals/{approval['id']}", headers=approver.headers)
    assert r.json()["status"] == "cancelled"
    late = await decide(client, approver.headers, approval["id"], decision="approve")
    assert late.status_code == 409 and late.json()["status_now"] == "cancelled"
