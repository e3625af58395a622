"""What workers and the reconciler do to step attempts: claim, record an outcome, expire, time out.

Each function is one transaction's worth of work on a locked run; the caller opens the transaction
(:func:`app.engine.unit.unit_of_work`) and relays its jobs after commit.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.engine.advance import (
    Advance,
    Claimed,
    Claimer,
    RunRow,
    backoff_delay,
    load_definition,
    lock,
    max_attempts,
    now,
    queue_name,
    set_run_status,
)
from app.engine.models import Outbox
from app.engine.state_machine import RunStatus, StaleTransition, StepStatus, transition_step
from app.engine.tx import Job, Tx
from app.runs.models import StepAttempt, StepRun

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


async def claim_attempt(tx: Tx, settings: Settings, attempt_id: uuid.UUID, claimer: Claimer) -> Claimed | None:
    """Take the lease on a queued attempt; ``None`` when it is not ours to run (duplicate, paused, gone)."""
    row = (
        await tx.db.execute(
            select(StepAttempt.run_id, StepAttempt.status, StepAttempt.n, StepAttempt.step_run_id).where(
                StepAttempt.id == attempt_id
            )
        )
    ).one_or_none()
    if row is None or row.status != "queued":
        return None
    run = await lock(tx, row.run_id)
    if run is None or run.status not in DISPATCHABLE:
        return None  # a paused run keeps the step queued; resume sends its job again
    step = (
        await tx.db.execute(
            select(
                StepRun.status,
                StepRun.version,
                StepRun.current_attempt_id,
                StepRun.step_id,
                StepRun.map_index,
                StepRun.input,
            ).where(StepRun.id == row.step_run_id)
        )
    ).one()
    if step.status != S.QUEUED or step.current_attempt_id != attempt_id:
        return None
    t = now()
    version = await transition_step(
        tx.db,
        row.step_run_id,
        status=step.status,
        version=step.version,
        to=S.RUNNING,
        lease_owner=claimer.worker_id,
        lease_expires_at=t + timedelta(seconds=settings.lease_s),
        started_at=t,
    )
    await tx.db.execute(
        update(StepAttempt)
        .where(StepAttempt.id == attempt_id)
        .values(status="running", worker=claimer.worker_id, job_id=claimer.job_id, started_at=t)
    )
    await tx.db.execute(delete(Outbox).where(Outbox.job_id == str(attempt_id)))
    tx.event(
        run.id,
        "step_started",
        step_id=step.step_id,
        map_index=step.map_index,
        attempt=row.n,
        worker=claimer.worker_id,
    )
    if run.status == RunStatus.QUEUED:
        await set_run_status(tx, run, RunStatus.RUNNING)
    return Claimed(
        run_id=run.id,
        tenant_id=run.tenant_id,
        workflow_version_id=run.workflow_version_id,
        priority=run.priority,
        step_run_id=row.step_run_id,
        step_version=version,
        step_id=step.step_id,
        map_index=step.map_index,
        attempt_id=attempt_id,
        attempt_n=row.n,
        args=step.input,
        job_id=claimer.job_id,
        worker_id=claimer.worker_id,
    )


async def record_outcome(
    tx: Tx, settings: Settings, claimed: Claimed, outcome: Outcome, claimer: Claimer | None
) -> Claimed | None:
    """Record an attempt's outcome and advance the run; returns the next step claimed inline, if any.

    A step that changed under us (the run was cancelled, or our lease expired and another attempt
    began) keeps its newer state: the outcome is noted on the attempt only.
    """
    run = await lock(tx, claimed.run_id)
    assert run is not None
    attempt_values: dict[str, Any] = {
        "status": "succeeded" if outcome.ok else "failed",
        "started_at": outcome.started_at,
        "finished_at": outcome.finished_at,
        "error_class": outcome.error_class,
        "error_message": outcome.message,
    }
    landed = await tx.db.execute(
        update(StepAttempt)
        .where(StepAttempt.id == claimed.attempt_id, StepAttempt.status == "running")
        .values(**attempt_values)
        .returning(StepAttempt.id)
    )
    if landed.scalar_one_or_none() is None:
        return None  # cancelled or expired meanwhile: that transaction already recorded the attempt
    definition = await load_definition(tx.db, run.workflow_version_id)
    step = definition.step(claimed.step_id)
    try:
        if outcome.ok:
            await _leave_running(
                tx,
                claimed,
                S.SUCCEEDED,
                output=outcome.output,
                finished_at=outcome.finished_at,
                started_at=outcome.started_at,
            )
            tx.event(
                run.id,
                "step_succeeded",
                step_id=claimed.step_id,
                map_index=claimed.map_index,
                attempt=claimed.attempt_n,
            )
        elif outcome.transient and claimed.attempt_n < max_attempts(step, settings):
            await _schedule_retry(tx, settings, run, claimed, outcome)
        else:
            error = {"class": outcome.error_class, "message": outcome.message, "attempt": claimed.attempt_n}
            await _leave_running(tx, claimed, S.FAILED, error=error, finished_at=outcome.finished_at)
            tx.event(run.id, "step_failed", step_id=claimed.step_id, map_index=claimed.map_index, error=error)
    except StaleTransition:
        return None
    return await Advance(tx, run, definition, settings, claimer).run_plan()


async def _leave_running(tx: Tx, claimed: Claimed, to: StepStatus, **values: Any) -> None:
    """Move the step this attempt ran out of ``running``, giving up its lease."""
    await transition_step(
        tx.db,
        claimed.step_run_id,
        status=S.RUNNING.value,
        version=claimed.step_version,
        to=to,
        lease_owner=None,
        lease_expires_at=None,
        **values,
    )


async def _schedule_retry(tx: Tx, settings: Settings, run: RunRow, claimed: Claimed, outcome: Outcome) -> None:
    definition = await load_definition(tx.db, run.workflow_version_id)
    delay = backoff_delay(
        definition.step(claimed.step_id), settings, claimed.attempt_n, outcome.retry_after, random.random()
    )
    not_before = now() + timedelta(seconds=delay)
    attempt_id = uuid.uuid4()
    n = claimed.attempt_n + 1
    await _leave_running(tx, claimed, S.QUEUED, attempts=n, current_attempt_id=attempt_id)
    tx.attempts.append(
        {
            "id": attempt_id,
            "tenant_id": run.tenant_id,
            "run_id": run.id,
            "step_run_id": claimed.step_run_id,
            "n": n,
            "status": "queued",
            "queued_at": now(),
            "job_id": str(attempt_id),
            "worker": None,
            "not_before": not_before,
            "started_at": None,
        }
    )
    tx.event(
        run.id,
        "step_retrying",
        step_id=claimed.step_id,
        map_index=claimed.map_index,
        attempt=claimed.attempt_n,
        error_class=outcome.error_class,
        message=outcome.message,
        delay_s=round(delay, 3),
    )
    tx.enqueue(run.id, Job("step", str(attempt_id), queue_name(settings, run.priority), not_before=not_before))


async def renew_lease(db: AsyncSession, claimed: Claimed, lease_s: float) -> bool:
    """Push the lease of a step this worker still holds further out; False once it holds it no more."""
    landed = await db.execute(
        update(StepRun)
        .where(
            StepRun.id == claimed.step_run_id,
            StepRun.version == claimed.step_version,
            StepRun.lease_owner == claimed.worker_id,
        )
        .values(lease_expires_at=now() + timedelta(seconds=lease_s))
        .returning(StepRun.id)
    )
    return landed.scalar_one_or_none() is not None


async def expire_lease(tx: Tx, settings: Settings, step_run_id: uuid.UUID) -> bool:
    """A running step whose lease ran out lost its worker: fail that attempt as transient."""
    run_id = (await tx.db.execute(select(StepRun.run_id).where(StepRun.id == step_run_id))).scalar_one_or_none()
    run = await lock(tx, run_id) if run_id is not None else None
    if run is None:
        return False
    step = (
        await tx.db.execute(
            select(
                StepRun.status,
                StepRun.version,
                StepRun.lease_expires_at,
                StepRun.current_attempt_id,
                StepRun.step_id,
                StepRun.map_index,
                StepRun.input,
                StepRun.lease_owner,
                StepRun.attempts,
                StepAttempt.started_at,
            )
            .join(StepAttempt, StepAttempt.id == StepRun.current_attempt_id)
            .where(StepRun.id == step_run_id)
        )
    ).one()
    if step.status != S.RUNNING or step.lease_expires_at is None or step.lease_expires_at > now():
        return False
    claimed = Claimed(
        run_id=run.id,
        tenant_id=run.tenant_id,
        workflow_version_id=run.workflow_version_id,
        priority=run.priority,
        step_run_id=step_run_id,
        step_version=step.version,
        step_id=step.step_id,
        map_index=step.map_index,
        attempt_id=step.current_attempt_id,
        attempt_n=step.attempts,
        args=step.input,
        job_id="",
        worker_id=step.lease_owner or "",
    )
    t = now()
    outcome = Outcome(
        ok=False,
        started_at=step.started_at or t,
        finished_at=t,
        error_class="worker_lost",
        transient=True,
        message=f"lease of worker {step.lease_owner} expired; presumed dead",
    )
    await record_outcome(tx, settings, claimed, outcome, None)
    return True


async def fire_wait_timeout(tx: Tx, settings: Settings, step_run_id: uuid.UUID) -> bool:
    """Fail a waiting step whose deadline passed (the run then fails like for any failed step)."""
    run_id = (await tx.db.execute(select(StepRun.run_id).where(StepRun.id == step_run_id))).scalar_one_or_none()
    run = await lock(tx, run_id) if run_id is not None else None
    if run is None:
        return False
    step = (
        await tx.db.execute(
            select(StepRun.status, StepRun.version, StepRun.wait_deadline, StepRun.step_id).where(
                StepRun.id == step_run_id
            )
        )
    ).one()
    if step.status != S.WAITING or step.wait_deadline is None or step.wait_deadline > now():
        return False
    error = {"class": "wait_timeout", "message": f"no signal before {step.wait_deadline.isoformat()}"}
    await transition_step(
        tx.db,
        step_run_id,
        status=step.status,
        version=step.version,
        to=S.FAILED,
        error=error,
        finished_at=now(),
    )
    tx.event(run.id, "step_failed", step_id=step.step_id, error=error)
    definition = await load_definition(tx.db, run.workflow_version_id)
    await Advance(tx, run, definition, settings).run_plan()
    return True
