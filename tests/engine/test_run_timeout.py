"""A run's ``timeout_s`` limit: the reconciler fails active runs past their deadline, once."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from app.engine.reconciler import reconcile_once
from app.runtime import Runtime
from tests.support.runs import create_workflow, name, start_run, step, wait_for, wait_run
from tests.support.tenants import TenantKey

pytestmark = pytest.mark.xdist_group("engine")

WAIT_FOREVER = [{"id": "w", "wait": {"signal": "never"}}]
# Past a 1 s limit, with room for a slow machine.
PAST_DEADLINE_S = 1.3


async def get_run(client: httpx.AsyncClient, tenant: TenantKey, run_id: str) -> dict[str, Any]:
    r = await client.get(f"/api/v1/runs/{run_id}", headers=tenant.headers)
    assert r.status_code == 200, r.text
    return dict(r.json())


async def waiting_run(client: httpx.AsyncClient, tenant: TenantKey, workflow: str, timeout_s: float) -> str:
    run = await start_run(client, tenant.headers, workflow, limits={"timeout_s": timeout_s})
    assert run["status"] == "waiting" and step(run, "w")["status"] == "waiting"
    return str(run["id"])


def events(run: dict[str, Any], type_: str) -> list[dict[str, Any]]:
    return [e for e in run["events"] if e["type"] == type_]


async def audited(sessionmaker: async_sessionmaker[AsyncSession], tenant: TenantKey, run_id: str) -> list[Any]:
    async with sessionmaker() as session:
        result = await session.execute(
            text("SELECT actor, outcome, data FROM audit_event WHERE tenant_id = :t AND action = 'run.timeout' "
                 "AND target = :target"),
            {"t": tenant.tenant_id, "target": f"run:{run_id}"},
        )
        return list(result.all())


async def status_reason(sessionmaker: async_sessionmaker[AsyncSession], run_id: str) -> str | None:
    async with sessionmaker() as session:
        reason = (await session.execute(text("SELECT status_reason FROM run WHERE id = :id"), {"id": run_id}))
        value: str | None = reason.scalar_one()
        return value


def assert_timed_out(run: dict[str, Any]) -> None:
    assert run["status"] == "failed", run
    assert run["error"] == {"class": "run_timeout", "message": "the run exceeded its limit of 1 s"}
    (failed,) = events(run, "run_failed")
    assert failed["data"]["status_reason"] == "run_timeout"
    assert failed["data"]["error"]["class"] == "run_timeout"


async def test_a_waiting_run_past_its_deadline_fails_and_one_within_it_is_untouched(
    client: httpx.AsyncClient, tenant: TenantKey, app: FastAPI, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    runtime: Runtime = app.state.runtime
    wf = name()
    await create_workflow(client, tenant.headers, wf, WAIT_FOREVER)
    due = await waiting_run(client, tenant, wf, 1)
    within = await waiting_run(client, tenant, wf, 3600)
    report = await reconcile_once(runtime)
    assert report.runs_timed_out == 0
    assert (await get_run(client, tenant, due))["status"] == "waiting"

    await asyncio.sleep(PAST_DEADLINE_S)
    report = await reconcile_once(runtime)
    assert report.runs_timed_out == 1
    run = await get_run(client, tenant, due)
    assert_timed_out(run)
    assert step(run, "w")["status"] == "cancelled"
    assert [e["data"]["reason"] for e in events(run, "step_cancelled")] == ["run timed out"]
    assert await status_reason(sessionmaker, due) == "run_timeout"
    ((actor, outcome, data),) = await audited(sessionmaker, tenant, due)
    assert (actor, outcome, data["timeout_s"], data["status_was"]) == ("system", "failed", 1, "waiting")

    untouched = await get_run(client, tenant, within)
    assert untouched["status"] == "waiting" and step(untouched, "w")["status"] == "waiting"
    assert untouched["error"] is None and not events(untouched, "run_failed")


async def test_a_paused_run_is_not_timed_out_until_resumed(
    client: httpx.AsyncClient, tenant: TenantKey, app: FastAPI, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    runtime: Runtime = app.state.runtime
    wf = name()
    await create_workflow(client, tenant.headers, wf, WAIT_FOREVER)
    held, raised = await waiting_run(client, tenant, wf, 1), await waiting_run(client, tenant, wf, 1)
    for run_id in (held, raised):
        r = await client.post(f"/api/v1/runs/{run_id}/pause", headers=tenant.headers)
        assert r.status_code == 200 and r.json()["status"] == "paused"
    await asyncio.sleep(PAST_DEADLINE_S)

    assert (await reconcile_once(runtime)).runs_timed_out == 0
    for run_id in (held, raised):
        paused = await get_run(client, tenant, run_id)
        assert paused["status"] == "paused" and step(paused, "w")["status"] == "waiting"
        assert not await audited(sessionmaker, tenant, run_id)

    # An admin raises one run's limit before resuming it; the other is resumed past its deadline.
    r = await client.put(f"/api/v1/runs/{raised}/limits", json={"timeout_s": 3600}, headers=tenant.headers)
    assert r.status_code == 200 and r.json()["limits"]["timeout_s"] == 3600
    for run_id in (held, raised):
        assert (await client.post(f"/api/v1/runs/{run_id}/resume", headers=tenant.headers)).status_code == 200
    assert (await get_run(client, tenant, held))["status"] in ("running", "waiting")

    assert (await reconcile_once(runtime)).runs_timed_out == 1
    run = await get_run(client, tenant, held)
    assert_timed_out(run)
    assert step(run, "w")["status"] == "cancelled"
    assert len(await audited(sessionmaker, tenant, held)) == 1
    still = await get_run(client, tenant, raised)
    assert still["status"] in ("running", "waiting") and step(still, "w")["status"] == "waiting"


async def test_concurrent_and_repeated_reconciles_fail_the_run_once(
    client: httpx.AsyncClient, tenant: TenantKey, app: FastAPI, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    runtime: Runtime = app.state.runtime
    wf = name()
    await create_workflow(client, tenant.headers, wf, WAIT_FOREVER)
    run_id = await waiting_run(client, tenant, wf, 1)
    await asyncio.sleep(PAST_DEADLINE_S)

    reports = await asyncio.gather(reconcile_once(runtime), reconcile_once(runtime))
    assert sum(r.runs_timed_out for r in reports) == 1
    assert (await reconcile_once(runtime)).runs_timed_out == 0
    run = await get_run(client, tenant, run_id)
    assert_timed_out(run)
    assert len(events(run, "step_cancelled")) == 1
    assert len(await audited(sessionmaker, tenant, run_id)) == 1


async def test_a_running_step_is_aborted(
    client: httpx.AsyncClient, tenant: TenantKey, app: FastAPI, worker: Settings
) -> None:
    wf = name()
    await create_workflow(
        client,
        tenant.headers,
        wf,
        [{"id": "long", "tool": "sleep", "args": {"seconds": 60}}, {"id": "next", "needs": ["long"], "tool": "echo"}],
    )
    run = await start_run(client, tenant.headers, wf, limits={"timeout_s": 1})
    await wait_for(client, tenant.headers, run["id"], lambda r: step(r, "long")["status"] == "running")
    await asyncio.sleep(PAST_DEADLINE_S)
    # The test worker's own reconciler may get there first: either way the run fails once.
    await reconcile_once(app.state.runtime)
    done = await wait_run(client, tenant.headers, run["id"], timeout=5)
    assert_timed_out(done)
    assert step(done, "long")["status"] == "cancelled"
    assert step(done, "long")["attempts"][-1]["status"] == "cancelled"
    assert step(done, "next")["status"] == "pending"
