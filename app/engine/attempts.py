"""What workers and the reconciler do to step attempts: claim, record an outcome, expire, time out.

Each function is one transaction's worth of work on a locked run; the caller runs it through
:func:`app.engine.transaction.in_tx`, which commits and then relays the jobs it produced.
"""

from __future__ import annotations

import contextlib
import random
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from app import tracing
from app.audit.service import entry as audit_entry
from app.clock import now
from app.config import Settings
from app.engine.advance import (
    Advance,
    Claimed,
    Claimer,
    RunRow,
    StepRow,
    backoff_delay,
    fail_step,
    load_definition,
    lock_run,
    max_attempts,
    queue_name,
    set_run_status,
    step_row,
)
from app.engine.gates import Gate, expire_approval, request_approval
from app.engine.state_machine import (
    RUN_TERMINAL,
    RunStatus,
    StaleTransition,
    StepStatus,
    finish_attempts,
    transition_step,
    transition_steps,
)
from app.engine.unit_of_work import Job, UnitOfWork
from app.pg import Conn
from app.workflows.steps import RetryPolicy

DISPATCHABLE = (RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.WAITING)


@dataclass(frozen=True)
class AuditNote:
    actor: str
    action: str
    target: str | None
    outcome: str
    data: dict[str, Any]


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
    # Run events (type, data) and audit events the call produced, written with the outcome.
    events: tuple[tuple[str, dict[str, Any]], ...] = ()
    audits: tuple[AuditNote, ...] = ()
    # The call needs approval: the step waits for it instead of finishing.
    gate: Gate | None = None
    # A budget ran out and the tenant pauses runs for that: the step is queued again and the run paused.
    pause_reason: str | None = None
    # The tool's retry policy, used when the step has none of its own.
    retry: RetryPolicy | None = None


_ATTEMPT_RUN = "SELECT run_id FROM step_attempt WHERE id = $1 AND status = 'queued'"
# The job's own attempt first, then other queued, due attempts of the same run (map items, parallel
# branches) that this worker can take in the same transaction.
_CLAIMABLE = (
    "SELECT s.id, s.status, s.version, s.step_id, s.map_index, s.input, a.n, a.id AS attempt_id, a.job_id, "
    "a.trace_context "
    "FROM step_attempt a JOIN step_run s ON s.id = a.step_run_id "
    "WHERE a.run_id = $1 AND a.status = 'queued' AND s.status = 'queued' AND s.current_attempt_id = a.id "
    "AND (a.not_before IS NULL OR a.not_before <= $2) "
    "ORDER BY a.id = $3 DESC, s.map_index NULLS FIRST, a.queued_at LIMIT $4"
)
_START_ATTEMPTS = (
    "WITH gone AS (DELETE FROM outbox WHERE job_id = ANY($5::text[])) "
    "UPDATE step_attempt SET status = 'running', worker = $2, job_id = $3, started_at = $4 WHERE id = ANY($1::uuid[])"
)


async def claim_attempt(tx: UnitOfWork, settings: Settings, attempt_id: uuid.UUID, claimer: Claimer) -> list[Claimed]:
    """Take the lease on a queued attempt, and on up to ``claimer.capacity - 1`` more of the same run.

    Returns nothing when the attempt is not ours to run (a duplicate delivery, a paused or finished
    run). The other attempts' jobs become no-ops, and are taken out of Redis after commit.
    """
    run_id = await tx.conn.fetchval(_ATTEMPT_RUN, attempt_id)
    if run_id is None:
        return []  # delivered again after it ran, or cancelled
    run = await lock_run(tx, run_id)
    if run is None or run.status not in DISPATCHABLE:
        return []  # a paused run keeps the step queued; resume sends its job again
    started = now()
    rows = await tx.conn.fetch(_CLAIMABLE, run_id, started, attempt_id, max(1, claimer.capacity))
    if not rows or rows[0]["attempt_id"] != attempt_id:
        return []
    lease = {"lease_owner": claimer.worker_id, "lease_expires_at": started + timedelta(seconds=settings.lease_s),
             "started_at": started}
    steps = [
        StepRow(id=row["id"], step_id=row["step_id"], map_index=row["map_index"], kind="", status=row["status"],
                version=row["version"], attempts=row["n"], current_attempt_id=row["attempt_id"])
        for row in rows
    ]
    await transition_steps(tx.conn, [(step, lease) for step in steps], StepStatus.RUNNING)
    await tx.conn.execute(_START_ATTEMPTS, [row["attempt_id"] for row in rows], claimer.worker_id, claimer.job_id,
                          started, [row["job_id"] for row in rows])
    queue = queue_name(settings, run.priority)
    tx.dequeue.extend((queue, row["job_id"]) for row in rows[1:])
    for row in rows:
        # Claimed before its ``process`` span opens: the event is of the trace that span continues.
        with tracing.resumed(row["trace_context"]):
            tx.event(run.id, "step_started", step_id=row["step_id"], map_index=row["map_index"], attempt=row["n"],
                     worker=claimer.worker_id)
    if run.status == RunStatus.QUEUED:
        with tracing.resumed(rows[0]["trace_context"]):  # its event is of the trace its first step continues
            await set_run_status(tx, run, RunStatus.RUNNING)
    return [
        Claimed(
            run_id=run.id, tenant_id=run.tenant_id, workflow_version_id=run.workflow_version_id,
            priority=run.priority, step_run_id=step.id, step_version=step.version, step_id=step.step_id,
            map_index=step.map_index, attempt_id=row["attempt_id"], attempt_n=row["n"], args=row["input"],
            job_id=claimer.job_id, worker_id=claimer.worker_id, trace_context=row["trace_context"],
            run_trace_context=run.trace_context,
        )
        for step, row in zip(steps, rows, strict=True)
    ]


async def record_outcome(
    tx: UnitOfWork, settings: Settings, claimed: Claimed, outcome: Outcome, claimer: Claimer | None
) -> list[Claimed]:
    """:func:`record_outcomes` for one attempt."""
    return await record_outcomes(tx, settings, [(claimed, outcome)], claimer)


async def record_outcomes(
    tx: UnitOfWork, settings: Settings, results: list[tuple[Claimed, Outcome]], claimer: Claimer | None
) -> list[Claimed]:
    """Record attempts' outcomes (all of one run) and advance it once; returns the steps claimed inline.

    A step that changed under us (the run was cancelled, or our lease expired and another attempt
    began) keeps its newer state: that outcome is not applied.
    """
    run = await lock_run(tx, results[0][0].run_id)
    assert run is not None
    definition = await load_definition(tx.conn, run.workflow_version_id)
    finished: list[tuple[Claimed, Outcome, dict[str, Any]]] = []
    for claimed, outcome in results:
        await record_notes(tx, claimed, outcome.events, outcome.audits)
        attempt = {"attempt_id": claimed.attempt_id, "status": "succeeded" if outcome.ok else "failed",
                   "started_at": outcome.started_at, "finished_at": outcome.finished_at,
                   "error_class": outcome.error_class, "error_message": outcome.message}
        if outcome.gate is not None:
            await _gate(tx, settings, run, claimed, outcome)
        elif outcome.pause_reason is not None:
            await _pause(tx, settings, run, claimed, outcome, attempt)
        elif not outcome.ok and outcome.transient and claimed.attempt_n < max_attempts(
            definition.step(claimed.step_id), settings, outcome.retry
        ):
            await _retry(tx, settings, run, claimed, outcome, attempt)
        else:
            finished.append((claimed, outcome, attempt))
    steps = await _finish(tx, run, finished) if finished else None
    advance = Advance(tx=tx, run=run, definition=definition, settings=settings, claimer=claimer, rows=steps or {})
    return await advance.plan_and_apply()


async def _finish(
    tx: UnitOfWork, run: RunRow, finished: list[tuple[Claimed, Outcome, dict[str, Any]]]
) -> dict[tuple[str, int | None], StepRow]:
    """Close the attempts and their steps; returns the run's steps as they are now."""
    entries = []
    for claimed, outcome, attempt in finished:
        error = None if outcome.ok else {"class": outcome.error_class, "message": outcome.message,
                                         "attempt": claimed.attempt_n}
        entries.append({
            **attempt, "step_run_id": claimed.step_run_id, "version": claimed.step_version,
            "step_status": (StepStatus.SUCCEEDED if outcome.ok else StepStatus.FAILED).value,
            "output": outcome.output if outcome.ok else None, "error": error,
            "step_started_at": outcome.started_at if outcome.ok else None,
        })
    rows = await finish_attempts(tx.conn, run.id, entries)
    moved = {row[1]: row[0] for row in rows if row[0] is not None}
    # The rows were read by the statement that moved the steps: patch their new state in.
    steps = {(row[2], row[3]): step_row(row[1:]) for row in rows}
    for (claimed, outcome, _), entry in zip(finished, entries, strict=True):
        version = moved.get(claimed.step_run_id)
        if version is None:
            continue  # cancelled or expired meanwhile: that transaction recorded the attempt
        row = steps[(claimed.step_id, claimed.map_index)]
        row.status, row.version = entry["step_status"], version
        if outcome.ok and claimed.map_index is None:
            row.output = outcome.output
        if outcome.ok:
            tx.event(run.id, "step_succeeded", step_id=claimed.step_id, map_index=claimed.map_index,
                     attempt=claimed.attempt_n)
        else:
            tx.event(run.id, "step_failed", step_id=claimed.step_id, map_index=claimed.map_index,
                     error=entry["error"])
    return steps


async def record_notes(
    tx: UnitOfWork, claimed: Claimed, events: Iterable[tuple[str, dict[str, Any]]], audits: Iterable[AuditNote]
) -> None:
    """Write a step attempt's run events ``(type, data)`` and :class:`AuditNote` s in this transaction."""
    for type_, data in events:
        tx.event(claimed.run_id, type_, step_id=claimed.step_id, map_index=claimed.map_index, **data)
    for note in audits:
        tx.audit(claimed.tenant_id,
                 audit_entry(note.actor, note.action, note.target, outcome=note.outcome, data=note.data))


def _claimed_step(claimed: Claimed) -> StepRow:
    return StepRow(id=claimed.step_run_id, step_id=claimed.step_id, map_index=claimed.map_index, kind="",
                   status=StepStatus.RUNNING, version=claimed.step_version, attempts=claimed.attempt_n,
                   current_attempt_id=claimed.attempt_id)


async def _gate(tx: UnitOfWork, settings: Settings, run: RunRow, claimed: Claimed, outcome: Outcome) -> None:
    """The step's call needs approval: close the attempt and let the step wait for the decision."""
    landed = await tx.conn.fetchval(
        _FAIL_ATTEMPT, claimed.attempt_id, "gated", outcome.started_at, outcome.finished_at, "approval_required",
        outcome.gate.reason if outcome.gate else None,
    )
    if landed is None or outcome.gate is None:
        return
    with contextlib.suppress(StaleTransition):
        await request_approval(tx, run, _claimed_step(claimed), outcome.gate, queue=queue_name(settings, run.priority))


async def _pause(
    tx: UnitOfWork, settings: Settings, run: RunRow, claimed: Claimed, outcome: Outcome, attempt: dict[str, Any]
) -> None:
    """A budget ran out before the call: queue the step again (it runs on resume) and pause the run."""
    landed = await tx.conn.fetchval(
        _FAIL_ATTEMPT, claimed.attempt_id, "failed", attempt["started_at"], attempt["finished_at"],
        outcome.error_class, outcome.message,
    )
    if landed is None:
        return
    with contextlib.suppress(StaleTransition):
        await _schedule_retry(tx, settings, run, claimed, outcome, delay=0.0)
    if run.status not in (RunStatus.PAUSED, *RUN_TERMINAL):
        await set_run_status(tx, run, RunStatus.PAUSED, status_reason=outcome.pause_reason, error={
            "class": outcome.error_class, "message": outcome.message})


_FAIL_ATTEMPT = (
    "UPDATE step_attempt SET status = $2, started_at = $3, finished_at = $4, error_class = $5, error_message = $6 "
    "WHERE id = $1 AND status = 'running' RETURNING id"
)


async def _retry(
    tx: UnitOfWork, settings: Settings, run: RunRow, claimed: Claimed, outcome: Outcome, attempt: dict[str, Any]
) -> None:
    landed = await tx.conn.fetchval(
        _FAIL_ATTEMPT, claimed.attempt_id, attempt["status"], attempt["started_at"], attempt["finished_at"],
        attempt["error_class"], attempt["error_message"],
    )
    if landed is None:
        return
    with contextlib.suppress(StaleTransition):
        await _schedule_retry(tx, settings, run, claimed, outcome)


async def _leave_running(conn: Conn, claimed: Claimed, to: StepStatus, **values: Any) -> None:
    """Move the step this attempt ran out of ``running``, giving up its lease."""
    await transition_step(conn, claimed.step_run_id, status=StepStatus.RUNNING.value, version=claimed.step_version,
                          to=to, lease_owner=None, lease_expires_at=None, **values)


async def _schedule_retry(
    tx: UnitOfWork, settings: Settings, run: RunRow, claimed: Claimed, outcome: Outcome, delay: float | None = None
) -> None:
    if delay is None:
        definition = await load_definition(tx.conn, run.workflow_version_id)
        delay = backoff_delay(
            definition.step(claimed.step_id), settings, claimed.attempt_n, outcome.retry_after, random.random(),
            outcome.retry,
        )
    not_before = now() + timedelta(seconds=delay)
    attempt_id = uuid.uuid4()
    attempt_n = claimed.attempt_n + 1
    await _leave_running(tx.conn, claimed, StepStatus.QUEUED, attempts=attempt_n, current_attempt_id=attempt_id)
    tx.add_attempt(id=attempt_id, tenant_id=run.tenant_id, run_id=run.id, step_run_id=claimed.step_run_id,
                   n=attempt_n, status="queued", job_id=str(attempt_id), not_before=not_before)
    tx.event(run.id, "step_retrying", step_id=claimed.step_id, map_index=claimed.map_index,
             attempt=claimed.attempt_n, error_class=outcome.error_class, message=outcome.message,
             delay_s=round(delay, 3))
    tx.enqueue(run.id, Job(kind="step", job_id=str(attempt_id), queue=queue_name(settings, run.priority),
                           not_before=not_before))


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


async def expire_lease(tx: UnitOfWork, settings: Settings, step_run_id: uuid.UUID) -> bool:
    """A running step whose lease ran out lost its worker: fail that attempt as transient."""
    run_id = await tx.conn.fetchval("SELECT run_id FROM step_run WHERE id = $1", step_run_id)
    run = await lock_run(tx, run_id) if run_id is not None else None
    if run is None:
        return False
    step = await tx.conn.fetchrow(_LEASED, step_run_id)
    if step is None or step["status"] != StepStatus.RUNNING or step["lease_expires_at"] > now():
        return False
    claimed = Claimed(
        run_id=run.id, tenant_id=run.tenant_id, workflow_version_id=run.workflow_version_id, priority=run.priority,
        step_run_id=step_run_id, step_version=step["version"], step_id=step["step_id"],
        map_index=step["map_index"], attempt_id=step["current_attempt_id"], attempt_n=step["attempts"],
        args=step["input"], job_id="", worker_id=step["lease_owner"] or "",
    )
    expired_at = now()
    outcome = Outcome(ok=False, started_at=step["started_at"] or expired_at, finished_at=expired_at,
                      error_class="worker_lost",
                      transient=True, message=f"lease of worker {step['lease_owner']} expired; presumed dead")
    await record_outcome(tx, settings, claimed, outcome, None)
    return True


async def fire_wait_timeout(tx: UnitOfWork, settings: Settings, step_run_id: uuid.UUID) -> bool:
    """A waiting step's deadline passed: its approval expires (or is flagged), or the step fails (the run
    then fails like for any failed step)."""
    run_id = await tx.conn.fetchval("SELECT run_id FROM step_run WHERE id = $1", step_run_id)
    run = await lock_run(tx, run_id) if run_id is not None else None
    if run is None:
        return False
    step = await tx.conn.fetchrow(
        "SELECT status, version, wait_deadline, step_id FROM step_run WHERE id = $1", step_run_id
    )
    if step["status"] != StepStatus.WAITING or step["wait_deadline"] is None or step["wait_deadline"] > now():
        return False
    row = StepRow(id=step_run_id, step_id=step["step_id"], map_index=None, kind="", status=step["status"],
                  version=step["version"], attempts=0, current_attempt_id=None)
    definition = await load_definition(tx.conn, run.workflow_version_id)
    advance = Advance(tx=tx, run=run, definition=definition, settings=settings)
    expiry = await expire_approval(tx, run, row)
    if expiry is not None:
        if not expiry.landed:
            return False  # decided or cancelled meanwhile: that transaction moved the step on
        if expiry.flagged:
            return True  # the step waits on, with no deadline
        if expiry.approval.kind == "agent":
            # The agent hears of the expiry as its call's result, and carries on.
            await advance.dispatch([(row, None)], wait_deadline=None)
        else:
            expires_at = expiry.approval.expires_at
            deadline = expires_at.isoformat() if expires_at is not None else "its deadline"
            await fail_step(tx, run, row, "approval_expired", f"no decision before {deadline}")
    else:
        await fail_step(tx, run, row, "wait_timeout", f"no signal before {step['wait_deadline'].isoformat()}")
    await advance.plan_and_apply()
    return True
