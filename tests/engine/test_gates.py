"""Gates against the database: an approval's status moves once, whoever races for it."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.clock import now
from app.engine.attempts import fire_wait_timeout
from app.engine.gates import ApprovalStatus, move_approval
from app.engine.state_machine import IllegalTransition
from app.engine.transaction import in_tx
from app.runtime import Runtime
from tests.support.runs import create_workflow, name, start_run
from tests.support.tenants import MakeTenant, TenantKey

pytestmark = pytest.mark.xdist_group("engine")

DECISIONS = (ApprovalStatus.APPROVED, ApprovalStatus.REJECTED, ApprovalStatus.EXPIRED, ApprovalStatus.CANCELLED)


async def approval_of(client: httpx.AsyncClient, tenant: TenantKey) -> tuple[str, str]:
    """Start a run whose one step waits for an approval; (run id, approval id). No worker is needed:
    the request that starts the run asks for the approval."""
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [{"id": "gate", "approval": {"reason": "ship it?"}}])
    run = await start_run(client, tenant.headers, workflow)
    listed = await client.get("/api/v1/approvals", params={"run": run["id"]}, headers=tenant.headers)
    (approval,) = listed.json()["items"]
    assert approval["status"] == "pending"
    return str(run["id"]), str(approval["id"])


async def approval_row(runtime: Runtime, approval_id: str) -> Any:
    return await runtime.pg.fetchrow("SELECT status, version FROM approval WHERE id = $1", uuid.UUID(approval_id))


async def test_concurrent_moves_of_one_approval_land_once(
    client: httpx.AsyncClient, tenant: TenantKey, app: FastAPI
) -> None:
    """Four transactions, none holding the run lock, each trying another move: exactly one lands."""
    runtime: Runtime = app.state.runtime
    _, approval_id = await approval_of(client, tenant)

    async def move(to: ApprovalStatus) -> bool:
        async with runtime.pg.acquire() as conn, conn.transaction():
            return await move_approval(conn, uuid.UUID(approval_id), to=to, decided_at=now())

    landed = await asyncio.gather(*(move(to) for to in DECISIONS))
    assert sorted(landed) == [False, False, False, True]
    row = await approval_row(runtime, approval_id)
    assert row["status"] == DECISIONS[landed.index(True)] and row["version"] == 2


async def test_a_move_blocked_behind_another_finds_it_decided(
    client: httpx.AsyncClient, tenant: TenantKey, app: FastAPI
) -> None:
    """The loser waits on the winner's row lock, then sees the committed status and reports it lost."""
    runtime: Runtime = app.state.runtime
    _, approval_id = await approval_of(client, tenant)
    key = uuid.UUID(approval_id)
    async with runtime.pg.acquire() as first, runtime.pg.acquire() as second:
        winner = first.transaction()
        await winner.start()
        assert await move_approval(first, key, to=ApprovalStatus.APPROVED, decided_by="someone", decided_at=now())
        loser = asyncio.create_task(move_approval(second, key, to=ApprovalStatus.EXPIRED, decided_at=now()))
        blocked_pid = second.get_server_pid()
        for _ in range(500):
            waiting = await runtime.pg.fetchval(
                "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", blocked_pid
            )
            if waiting:
                break
            await asyncio.sleep(0.01)
        assert waiting, "the second move never waited for the first one's row lock"
        await winner.commit()
        assert await loser is False
    row = await approval_row(runtime, approval_id)
    assert row["status"] == "approved" and row["version"] == 2
    # Once decided, it moves no more; and nothing moves an approval back to pending.
    async with runtime.pg.acquire() as conn:
        assert await move_approval(conn, key, to=ApprovalStatus.CANCELLED) is False
        with pytest.raises(IllegalTransition):
            await move_approval(conn, key, to=ApprovalStatus.PENDING)


async def test_an_expiry_that_loses_to_a_decision_writes_nothing(
    client: httpx.AsyncClient, tenant: TenantKey, app: FastAPI
) -> None:
    """The deadline job reads the approval pending, then finds it decided when its guarded move runs."""
    runtime: Runtime = app.state.runtime
    run_id, approval_id = await approval_of(client, tenant)
    key = uuid.UUID(approval_id)
    step_run_id = await runtime.pg.fetchval(
        "UPDATE step_run SET wait_deadline = $2 WHERE run_id = $1 AND step_id = 'gate' RETURNING id",
        uuid.UUID(run_id), now(),
    )
    async with runtime.pg.acquire() as decider:
        decision = decider.transaction()
        await decision.start()
        assert await move_approval(decider, key, to=ApprovalStatus.APPROVED, decided_at=now())
        expiry = asyncio.create_task(in_tx(runtime, fire_wait_timeout, runtime.settings, step_run_id))
        for _ in range(500):
            blocked = await runtime.pg.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query LIKE 'UPDATE approval%'"
            )
            if blocked:
                break
            await asyncio.sleep(0.01)
        assert blocked, "the expiry never reached its guarded move"
        await decision.commit()
        assert await expiry is False
    row = await approval_row(runtime, approval_id)
    assert row["status"] == "approved" and row["version"] == 2
    assert await runtime.pg.fetchval("SELECT status FROM step_run WHERE id = $1", step_run_id) == "waiting"
    types = await runtime.pg.fetch("SELECT type FROM run_event WHERE run_id = $1", uuid.UUID(run_id))
    assert "approval_expired" not in {row["type"] for row in types}


async def run_lock_waiters(runtime: Runtime, count: int) -> None:
    """Wait until ``count`` transactions wait for a run's row lock (the engine's lock_run)."""
    for _ in range(1000):
        waiting = await runtime.pg.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' "
            "AND query LIKE 'SELECT id, tenant_id, status, version, priority%FOR UPDATE'"
        )
        if waiting >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{count} transactions never queued for the run lock")


@pytest.mark.parametrize("first", ["decision", "expiry"])
async def test_a_decision_racing_the_expiry_lands_once(
    client: httpx.AsyncClient, make_tenant: MakeTenant, app: FastAPI, first: str
) -> None:
    """The approver's decision (HTTP) and the deadline job, queued one behind the other for the run's
    lock: the first lands, the second learns it lost (409 for the decision, False for the job)."""
    runtime: Runtime = app.state.runtime
    admin = await make_tenant()
    approver = await make_tenant(name=admin.name, roles=("approver", "viewer"))
    run_id, approval_id = await approval_of(client, admin)
    step_run_id = await runtime.pg.fetchval(
        "UPDATE step_run SET wait_deadline = $2 WHERE run_id = $1 AND step_id = 'gate' RETURNING id",
        uuid.UUID(run_id), now(),
    )

    async def decide() -> httpx.Response:
        return await client.post(f"/api/v1/approvals/{approval_id}/decision", json={"decision": "approve"},
                                 headers=approver.headers)

    async def expire() -> bool:
        return await in_tx(runtime, fire_wait_timeout, runtime.settings, step_run_id)

    async with runtime.pg.acquire() as holder, holder.transaction():
        await holder.execute("SELECT 1 FROM run WHERE id = $1 FOR UPDATE", uuid.UUID(run_id))
        decision = asyncio.create_task(decide()) if first == "decision" else None
        expiry = asyncio.create_task(expire()) if first == "expiry" else None
        await run_lock_waiters(runtime, 1)
        decision = decision or asyncio.create_task(decide())
        expiry = expiry or asyncio.create_task(expire())
        await run_lock_waiters(runtime, 2)
    # The holder let go: the waiters take the lock in the order they asked for it.
    decided, expired = await decision, await expiry

    row = await approval_row(runtime, approval_id)
    assert row["version"] == 2
    if first == "decision":
        assert decided.status_code == 200 and expired is False, decided.text
        assert row["status"] == "approved"
    else:
        assert decided.status_code == 409 and expired is True, decided.text
        assert decided.json()["status_now"] == "expired" and row["status"] == "expired"
    run = (await client.get(f"/api/v1/runs/{run_id}", headers=admin.headers)).json()
    types = [event["type"] for event in run["events"]]
    assert types.count("approval_approved") + types.count("approval_expired") == 1, types
    assert run["status"] == ("succeeded" if first == "decision" else "failed"), run
