"""Checkpoint writes are fenced: only the attempt that holds a running step may write them."""

from __future__ import annotations

import uuid

import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.engine import checkpoints
from app.engine.advance import Claimed
from app.engine.checkpoints import Checkpoint, Fenced
from app.engine.transaction import in_tx
from app.runtime import Runtime
from tests.support.runs import create_workflow, name, start_run, wait_for
from tests.support.tenants import TenantKey

pytestmark = pytest.mark.xdist_group("engine")


async def claimed_for(runtime: Runtime, run_id: str, attempt_id: uuid.UUID | None = None) -> Claimed:
    row = await runtime.pg.fetchrow(
        "SELECT s.id, s.tenant_id, s.version, s.step_id, s.current_attempt_id, s.attempts, r.workflow_version_id "
        "FROM step_run s JOIN run r ON r.id = s.run_id WHERE s.run_id = $1", uuid.UUID(run_id))
    return Claimed(run_id=uuid.UUID(run_id), tenant_id=row["tenant_id"], workflow_version_id=row["workflow_version_id"],
                   priority="normal", step_run_id=row["id"], step_version=row["version"], step_id=row["step_id"],
                   map_index=None, attempt_id=attempt_id or row["current_attempt_id"], attempt_n=row["attempts"],
                   args={}, job_id="", worker_id="test")


async def test_only_the_holding_attempt_writes_checkpoints(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, app: FastAPI
) -> None:
    runtime: Runtime = app.state.runtime
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [{"id": "s", "tool": "sleep", "args": {"seconds": 5}}])
    run = await start_run(client, tenant.headers, workflow)
    await wait_for(client, tenant.headers, run["id"], lambda r: r["steps"][0]["status"] == "running")
    holder = await claimed_for(runtime, run["id"])
    event = ("model_called", {"turn": 1})
    await in_tx(runtime, checkpoints.save, holder, Checkpoint(0, "model", None, {"message": {}}), [event], [])
    # The same checkpoint again (a second writer), or a writer whose attempt is not the current one: fenced.
    with pytest.raises(Fenced):
        await in_tx(runtime, checkpoints.save, holder, Checkpoint(0, "model", None, {}), [event], [])
    stranger = await claimed_for(runtime, run["id"], attempt_id=uuid.uuid4())
    with pytest.raises(Fenced):
        await in_tx(runtime, checkpoints.save, stranger, Checkpoint(1, "tool", "c", {}), [event], [])
    # Once the step no longer runs (cancelled), its own attempt is fenced too.
    assert (await client.post(f"/api/v1/runs/{run['id']}/cancel", headers=tenant.headers)).status_code == 200
    with pytest.raises(Fenced):
        await in_tx(runtime, checkpoints.save, holder, Checkpoint(1, "tool", "c", {}), [event], [])
    saved = await checkpoints.load(runtime.pg, holder.step_run_id)
    assert [(c.seq, c.kind) for c in saved] == [(0, "model")]
    events = await runtime.pg.fetch(
        "SELECT type FROM run_event WHERE run_id = $1 AND type = 'model_called'", uuid.UUID(run["id"]))
    assert len(events) == 1  # the refused writes left no events behind
