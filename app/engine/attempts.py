"""What workers and the reconciler do to step attempts: claim, record an outcome, expire, time out.

Each function is one transaction's worth of work on a locked run; the caller runs it through
:func:`app.engine.unit.in_tx`, which commits and then relays the jobs it produced.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from app.config import Settings
from app.engine.advance import (
    Advance,
    Claimed,
    Claimer,
    RunRow,
    StepRow,
    backoff_delay,
    load_definition,
    lock,
    max_attempts,
    queue_name,
    set_run_status,
)
from app.engine.sql import Conn
from app.engine.state_machine import RunStatus, StaleTransition, StepStatus, finish_attempt, transition_step
from app.engine.tx import Job, Tx, now

S = StepStatus
DISPATCHABLE = (RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.WAITING)


@dataclass(frozen=True)
class Outcome:
    ok: bool
    started_at: datetime
    finished_at: datetime
    output: Any = None
    error_class: str | None = None
    message: str | None = None
    transient: bool = False
    retry_after: float | None = None


_ATTEMPT_RUN = "SELECT run_id FROM step_attempt WHERE id = $1 AND status = 'queued'"
_CLAIMABLE = (
    "SELECT s.id, s.status, s.version, s.current_attempt_id, s.step_id, s.map_index, s.input, a.n "
    "FROM step_attempt a JOIN step_run s ON s.id = a.step_run_id WHERE a.id = $1 AND a.status = 'queued'"
)
_START_ATTEMPT = (
    "WITH gone AS (DELETE FROM outbox WHERE job_id = $5) "
    "UPDATE step_attempt SET status = 'running', worker = $2, job_id = $3, started_at = $4 WHERE id = $1"
)


async def claim_attempt(tx: Tx, settings: Settings, attempt_id: uuid.UUID, claimer: Claimer) -> Claimed | None:
    """Take the lease on a queued attempt; ``None`` when it is not ours to run (duplicate, paused, gone)."""
    run_id = await tx.conn.fetchval(_ATTEMPT_RUN, attempt_id)
    if run_id is None:
        return None  # delivered again after it ran, or cancelled
    run = await lock(tx, run_id)
    if run is None or run.status not in DISPATCHABLE:
        return None  # a paused run keeps the step queued; resume sends its job again
    step = await tx.conn.fetchrow(_CLAIMABLE, attempt_id)
    if step is None or step["status"] != S.QUEUED or step["current_attempt_id"] != attempt_id:
        return None
    t = now()
    version = await transition_step(
        tx.conn, step["id"], status=step["status"], version=step["version"], to=S.RUNNING,
        lease_owner=claimer.worker_id, lease_expires_at=t + timedelta(seconds=settings.lease_s), started_at=t,
    )
    await tx.conn.execute(_START_ATTEMPT, attempt_id, claimer.worker_id, claimer.job_id, t, str(attempt_id))
    tx.event(run.id, "step_started", step_id=step["step_id"], map_index=step["map_index"], attempt=step["n"],
             worker=claimer.worker_id)
    if run.status == RunStatus.QUEUED:
        await set_run_status(tx, run, RunStatus.RUNNING)
    return Claimed(
        run_id=run.id, tenant_id=run.tenant_id, workflow_version_id=run.workflow_version_id, priority=run.priority,
        step_run_id=step["id"], step_version=version, step_id=step["step_id"], map_index=step["map_index"],
        attempt_id=attempt_id, attempt_n=step["n"], args=step["input"], job_id=claimer.job_id,
        worker_id=claimer.worker_id,
    )


async def record_outcome(
    tx: Tx, settings: Settings, claimed: Claimed, outcome: Outcome, claimer: Claimer | None
) -> Claimed | None:
    """Record an attempt's outcome and advance the run; returns the next step claimed inline, if any.

    A step that changed under us (the run was cancelled, or our lease expired and another attempt
    began) keeps its newer state: the outcome is not applied.
    """
    run = await lock(tx, claimed.run_id)
    assert run is not None
    definition = await load_definition(tx.conn, run.workflow_version_id)
    attempt = {"status": "succeeded" if outcome.ok else "failed", "started_at": outcome.started_at,
               "finished_at": outcome.finished_at, "error_class": outcome.error_class,
               "error_message": outcome.message}
    retry = not outcome.ok and outcome.transient and claimed.attempt_n < max_attempts(
        definition.step(claimed.step_id), settings
    )
    if retry:
        return await _retry(tx, settings, run, claimed, outcome, attempt)
    error = None if outcome.ok else {"class": outcome.error_class, "message": outcome.message,
                                     "attempt": claimed.attempt_n}
    to = S.SUCCEEDED if outcome.ok else S.FAILED
    landed, version, rows = await finish_attempt(
        tx.conn, run_id=run.id, attempt_id=claimed.attempt_id, attempt=attempt, step_run_id=claimed.step_run_id,
        version=claimed.step_version, to=to, output=outcome.output if outcome.ok else None, error=error,
        started_at=outcome.started_at if outcome.ok else None,
    )
    if not landed or version is None:
        return None  # cancelled or expired meanwhile: that transaction recorded the attempt
    if outcome.ok:
        tx.event(run.id, "step_succeeded", step_id=claimed.step_id, map_index=claimed.map_index,
                 attempt=claimed.attempt_n)
    else:
        tx.event(run.id, "step_failed", step_id=claimed.step_id, map_index=claimed.map_index, error=error)
    # The rows were read by the statement that moved this step: patch its new state in.
    steps = {(r[1], r[2]): StepRow(*r) for r in rows}
    mine = steps[(claimed.step_id, claimed.map_index)]
    mine.status, mine.version = to.value, version
    if outcome.ok and claimed.map_index is None:
        mine.output = outcome.output
    return await Advance(tx, run, definition, settings, claimer, rows=steps).run_plan()


_FAIL_ATTEMPT = (
    "UPDATE step_attempt SET status = $2, started_at = $3, finished_at = $4, error_class = $5, error_message = $6 "
    "WHERE id = $1 AND status = 'running' RETURNING id"
)


async def _retry(
    tx: Tx, settings: Settings, run: RunRow, claimed: Claimed, outcome: Outcome, attempt: dict[str, Any]
) -> Claimed | None:
    landed = await tx.conn.fetchval(
        _FAIL_ATTEMPT, claimed.attempt_id, attempt["status"], attempt["started_at"], attempt["finished_at"],
        attempt["error_class"], attempt["error_message"],
    )
    if landed is None:
        return None
    try:
        await _schedule_retry(tx, settings, run, claimed, outcome)
    except StaleTransition:
        return None
    return None


async def _leave_running(conn: Conn, claimed: Claimed, to: StepStatus, **values: Any) -> None:
    """Move the step this attempt ran out of ``running``, giving up its lease."""
    await transition_step(conn, claimed.step_run_id, status=S.RUNNING.value, version=claimed.step_version, to=to,
                          lease_owner=None, lease_expires_at=None, **values)


async def _schedule_retry(tx: Tx, settings: Settings, run: RunRow, claimed: Claimed, outcome: Outcome) -> None:
    definition = await load_definition(tx.conn, run.workflow_version_id)
    delay = backoff_delay(
        definition.step(claimed.step_id), settings, claimed.attempt_n, outcome.retry_after, random.random()
    )
    not_before = now() + timedelta(seconds=delay)
    attempt_id = uuid.uuid4()
    n = claimed.attempt_n + 1
    await _leave_running(tx.conn, claimed, S.QUEUED, attempts=n, current_attempt_id=attempt_id)
    tx.add_attempt(id=attempt_id, tenant_id=run.tenant_id, run_id=run.id, step_run_id=claimed.step_run_id, n=n,
                   status="queued", job_id=str(attempt_id), not_before=not_before)
    tx.event(run.id, "step_retrying", step_id=claimed.step_id, map_index=claimed.map_index,
             attempt=claimed.attempt_n, error_class=outcome.error_class, message=outcome.message,
             delay_s=round(delay, 3))
    tx.enqueue(run.id, Job("step", str(attempt_id), queue_name(settings, run.priority), not_before=not_before))


async def renew_lease(conn: Conn, claimed: Claimed, lease_s: float) -> bool:
    """Push the lease of a step this worker still holds further out; False once it holds it no more."""
    landed = await conn.fetchval(
        "UPDATE step_run SET lease_expires_at = $4 WHERE id = $1 AND version = $2 AND lease_owner = $3 RETURNING id",
        claimed.step_run_id, claimed.step_version, claimed.worker_id, now() + timedelta(seconds=lease_s),
    )
    return landed is not None


_LEASED = (
    "SELECT s.status, s.version, s.lease_expires_at, s.current_attempt_id, s.step_id, s.map_index, s.input, "
    "s.lease_owner, s.attempts, a.started_at FROM step_run s JOIN step_attempt a ON a.id = s.current_attempt_id "
    "WHERE s.id = $1"
)


async def expire_lease(tx: Tx, settings: Settings, step_run_id: uuid.UUID) -> bool:
    """A running step whose lease ran out lost its worker: fail that attempt as transient."""
    run_id = await tx.conn.fetchval("SELECT run_id FROM step_run WHERE id = $1", step_run_id)
    run = await lock(tx, run_id) if run_id is not None else None
    if run is None:
        return False
    step = await tx.conn.fetchrow(_LEASED, step_run_id)
    if step is None or step["status"] != S.RUNNING or step["lease_expires_at"] > now():
        return False
    claimed = Claimed(
        run_id=run.id, tenant_id=run.tenant_id, workflow_version_id=run.workflow_version_id, priority=run.priority,
        step_run_id=step_run_id, step_version=step["version"], step_id=step["step_id"],
        map_index=step["map_index"], attempt_id=step["current_attempt_id"], attempt_n=step["attempts"],
        args=step["input"], job_id="", worker_id=step["lease_owner"] or "",
    )
    t = now()
    outcome = Outcome(ok=False, started_at=step["started_at"] or t, finished_at=t, error_class="worker_lost",
                      transient=True, message=f"lease of worker {step['lease_owner']} expired; presumed dead")
    await record_outcome(tx, settings, claimed, outcome, None)
    return True


async def fire_wait_timeout(tx: Tx, settings: Settings, step_run_id: uuid.UUID) -> bool:
    """Fail a waiting step whose deadline passed (the run then fails like for any failed step)."""
    run_id = await tx.conn.fetchval("SELECT run_id FROM step_run WHERE id = $1", step_run_id)
    run = await lock(tx, run_id) if run_id is not None else None
    if run is None:
        return False
    step = await tx.conn.fetchrow(
        "SELECT status, version, wait_deadline, step_id FROM step_run WHERE id = $1", step_run_id
    )
    if step["status"] != S.WAITING or step["wait_deadline"] is None or step["wait_deadline"] > now():
        return False
    error = {"class": "wait_timeout", "message": f"no signal before {step['wait_deadline'].isoformat()}"}
    await transition_step(tx.conn, step_run_id, status=step["status"], version=step["version"], to=S.FAILED,
                          error=error, finished_at=now())
    tx.event(run.id, "step_failed", step_id=step["step_id"], error=error)
    definition = await load_definition(tx.conn, run.workflow_version_id)
    await Advance(tx, run, definition, settings).run_plan()
    return True

