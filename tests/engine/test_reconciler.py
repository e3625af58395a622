"""The reconciler against the database: a row it cannot repair does not stop the rest of its pass."""

from __future__ import annotations

import uuid

import httpx
import pytest
from fastapi import FastAPI

from app.clock import now
from app.engine.reconciler import reconcile_once
from app.runtime import Runtime
from tests.support.runs import create_workflow, name, start_run, step
from tests.support.tenants import TenantKey

pytestmark = pytest.mark.xdist_group("engine")

WAIT = [{"id": "w", "wait": {"signal": "go", "timeout_s": 3600}}]


async def test_a_broken_row_is_counted_and_the_others_are_still_repaired(
    client: httpx.AsyncClient, tenant: TenantKey, app: FastAPI
) -> None:
    runtime: Runtime = app.state.runtime
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, WAIT)
    run_ids = [uuid.UUID((await start_run(client, tenant.headers, workflow))["id"]) for _ in range(3)]
    # Every wait is past its deadline now; the middle run's step no longer matches its definition (a row
    # broken by hand or by a bug), so advancing that run raises.
    await runtime.pg.execute(
        "UPDATE step_run SET wait_deadline = $2 WHERE run_id = ANY($1::uuid[])", run_ids, now()
    )
    broken = run_ids[1]
    await runtime.pg.execute("UPDATE step_run SET step_id = 'ghost' WHERE run_id = $1", broken)

    report = await reconcile_once(runtime)

    assert report.rows_failed >= 1 and report.waits_timed_out >= 2
    for run_id in (run_ids[0], run_ids[2]):
        run = (await client.get(f"/api/v1/runs/{run_id}", headers=tenant.headers)).json()
        assert run["status"] == "failed" and step(run, "w")["error"]["class"] == "wait_timeout", run
    # The broken run's transaction rolled back: untouched, and tried again (and counted) next pass.
    assert await runtime.pg.fetchval("SELECT status FROM step_run WHERE run_id = $1", broken) == "waiting"
    assert await runtime.pg.fetchval("SELECT status FROM run WHERE id = $1", broken) == "waiting"
    assert (await reconcile_once(runtime)).rows_failed >= 1
    # Repaired by hand, it is handled like the others.
    await runtime.pg.execute("UPDATE step_run SET step_id = 'w' WHERE run_id = $1", broken)
    await reconcile_once(runtime)
    assert await runtime.pg.fetchval("SELECT status FROM run WHERE id = $1", broken) == "failed"
