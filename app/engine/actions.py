"""Operator actions, signals and approval decisions: each locks the run, checks the move, applies it, advances.

An action from the wrong state raises :class:`IllegalTransition` (409) naming the current state.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from app.audit.service import entry
from app.clock import now
from app.config import Settings
from app.context import Ctx
from app.engine.advance import (
    Advance,
    RunRow,
    StepRow,
    fail_step,
    load_definition,
    load_steps,
    lock_run,
    set_run_status,
    stop_steps,
)
from app.engine.checkpoints import restart_conversations
from app.engine.gates import ApprovalRow, find_approval, record_decision, supersede_approvals
from app.engine.state_machine import (
    RUN_MOVES,
    RUN_TERMINAL,
    IllegalTransition,
    RunStatus,
    StepStatus,
    check_run_move,
    transition_step,
)
from app.engine.unit_of_work import Job, UnitOfWork
from app.errors import NotFound
from app.workflows.steps import WaitStep

# Statuses whose clock runs; a paused run is held by an operator and is not timed out while paused.
RUN_CLOCK = (RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.WAITING)
UNFINISHED = (StepStatus.PENDING, StepStatus.QUEUED, StepStatus.RUNNING, StepStatus.WAITING)
# The status_reason of a run failed for running past its timeout_s.
RUN_TIMEOUT = "run_timeout"


class RunNotFound(NotFound):
    type = "run-not-found"


async def _locked(tx: UnitOfWork, run_id: uuid.UUID, tenant_id: uuid.UUID) -> RunRow:
    run = await lock_run(tx, run_id, tenant_id)
    if run is None:
        raise RunNotFound(f"run {run_id} not found")
    return run


# The run statuses each operator action applies to; the actions below refuse the rest (409). Pages offer
# only these, so the browser and the engine cannot disagree.
ACTION_FROM: dict[str, frozenset[RunStatus]] = {
    "pause": frozenset(RunStatus) - {RunStatus.PAUSED, *RUN_TERMINAL},
    "resume": frozenset({RunStatus.PAUSED}),
    "cancel": frozenset(status for status in RunStatus if RunStatus.CANCELLED in RUN_MOVES[status]),
    "retry": frozenset({RunStatus.FAILED}),
}


async def pause_run(
    tx: UnitOfWork, settings: Settings, run_id: uuid.UUID, tenant_id: uuid.UUID, actor: str
) -> RunRow:
    """Stop new dispatch; steps already running finish and are recorded."""
    run = await _locked(tx, run_id, tenant_id)
    if run.status not in ACTION_FROM["pause"]:
        raise IllegalTransition(f"a {run.status} run cannot be paused", status_now=run.status)
    await set_run_status(tx, run, RunStatus.PAUSED, actor=actor)
    return run


async def resume_run(
    tx: UnitOfWork, settings: Settings, run_id: uuid.UUID, tenant_id: uuid.UUID, actor: str
) -> RunRow:
    """Continue a paused run: re-send its queued steps' jobs and dispatch what became ready."""
    run = await _locked(tx, run_id, tenant_id)
    if run.status not in ACTION_FROM["resume"]:
        raise IllegalTransition(
            f"only a paused run can be resumed; this one is {run.status}", status_now=run.status
        )
    await set_run_status(tx, run, RunStatus.RUNNING, actor=actor, status_reason=None)
    # Jobs of steps queued before the pause were refused by the workers and are still in the outbox.
    rows = await tx.conn.fetch("SELECT kind, job_id, queue, not_before FROM outbox WHERE run_id = $1", run.id)
    tx.jobs.extend(
        Job(kind=row["kind"], job_id=row["job_id"], queue=row["queue"], not_before=row["not_before"]) for row in rows
    )
    await _advance(tx, settings, run)
    return run


async def cancel_run(
    tx: UnitOfWork, settings: Settings, run_id: uuid.UUID, tenant_id: uuid.UUID, actor: str
) -> RunRow:
    """Cancel every unfinished step: queued jobs are dropped, running ones aborted."""
    run = await _locked(tx, run_id, tenant_id)
    check_run_move(run.status, RunStatus.CANCELLED)
    rows = (await load_steps(tx.conn, run.id)).values()
    await stop_steps(tx, run, rows, UNFINISHED, f"cancelled by {actor}")
    await set_run_status(tx, run, RunStatus.CANCELLED, actor=actor)
    return run


async def retry_run(
    tx: UnitOfWork, settings: Settings, run_id: uuid.UUID, tenant_id: uuid.UUID, actor: str
) -> RunRow:
    """Resume a failed run from its failed steps; steps that succeeded are never run again."""
    run = await _locked(tx, run_id, tenant_id)
    if run.status not in ACTION_FROM["retry"]:
        raise IllegalTransition(
            f"only a failed run can be retried; this one is {run.status}", status_now=run.status
        )
    rows = (await load_steps(tx.conn, run.id)).values()
    reset = [row for row in rows if row.status in (StepStatus.FAILED, StepStatus.CANCELLED)]
    for row in reset:
        await transition_step(
            tx.conn, row.id, status=row.status, version=row.version, to=StepStatus.PENDING, error=None, finished_at=None
        )
    # The retried steps start over: earlier decisions do not approve their new calls, and agents
    # begin a new conversation (the old one stays in the checkpoints and events).
    await supersede_approvals(tx, [row.id for row in reset])
    await restart_conversations(tx, [row.id for row in reset if row.kind in ("llm", "agent")])
    tx.event(run.id, "run_retried", actor=actor, steps=sorted({row.step_id for row in reset}))
    await set_run_status(tx, run, RunStatus.RUNNING, error=None, finished_at=None, status_reason=None)
    await _advance(tx, settings, run)
    return run


async def signal_run(
    tx: UnitOfWork, settings: Settings, run_id: uuid.UUID, tenant_id: uuid.UUID, actor: str, *, name: str,
    payload: Any,
) -> list[str]:
    """Complete the steps waiting for signal ``name`` with ``payload`` as their output."""
    run = await _locked(tx, run_id, tenant_id)
    if run.status in RUN_TERMINAL:
        raise IllegalTransition(f"a {run.status} run takes no signals", status_now=run.status)
    definition = await load_definition(tx.conn, run.workflow_version_id)
    rows = await load_steps(tx.conn, run.id)
    waiting = [
        row
        for (sid, idx), row in rows.items()
        if idx is None
        and row.status == StepStatus.WAITING
        and isinstance(step := definition.step(sid), WaitStep)
        and step.wait.signal == name
    ]
    if not waiting:
        raise IllegalTransition(f"no step of this run is waiting for signal {name!r}", status_now=run.status)
    for row in waiting:
        await _succeed_waiting(tx, row, output=payload)
        tx.event(run.id, "signal_received", step_id=row.step_id, signal=name, actor=actor)
    await Advance(tx=tx, run=run, definition=definition, settings=settings).plan_and_apply()
    return [row.step_id for row in waiting]


async def _succeed_waiting(tx: UnitOfWork, step: StepRow, *, output: Any) -> None:
    """A waiting step's wait is over (its signal came, its gate was approved): it succeeds with ``output``."""
    await transition_step(
        tx.conn,
        step.id,
        status=step.status,
        version=step.version,
        to=StepStatus.SUCCEEDED,
        output=output,
        finished_at=now(),
        wait_deadline=None,
    )


async def time_out_run(tx: UnitOfWork, settings: Settings, run_id: uuid.UUID) -> bool:
    """Fail a run past its ``timeout_s`` limit: queued and waiting steps are cancelled, running ones aborted.

    Status and deadline are checked again under the run lock, so concurrent reconcilers fail it once;
    returns whether this call did."""
    run = await lock_run(tx, run_id)
    if run is None or run.status not in RUN_CLOCK:
        return False
    limit = await _time_limit(tx, run)
    if limit is None or limit[1] > now():
        return False
    timeout_s, deadline = limit
    error = {"class": "run_timeout", "message": f"the run exceeded its limit of {timeout_s:g} s"}
    rows = (await load_steps(tx.conn, run.id)).values()
    await stop_steps(tx, run, rows, (StepStatus.QUEUED, StepStatus.RUNNING, StepStatus.WAITING), "run timed out")
    status_was = run.status
    await set_run_status(tx, run, RunStatus.FAILED, error=error, status_reason=RUN_TIMEOUT)
    tx.audit(run.tenant_id, entry("system", "run.timeout", f"run:{run.id}", outcome="failed",
                data={"timeout_s": timeout_s, "deadline": deadline.isoformat(), "status_was": status_was}))
    return True


async def _time_limit(tx: UnitOfWork, run: RunRow) -> tuple[float, datetime] | None:
    """The run's ``timeout_s`` and the deadline it sets (from its start, or creation if never started)."""
    row = await tx.conn.fetchrow(
        "SELECT u.limits -> 'timeout_s', r.created_at FROM run r JOIN run_usage u ON u.run_id = r.id WHERE r.id = $1",
        run.id,
    )
    if row is None or row[0] is None:
        return None
    timeout_s = float(row[0])
    return timeout_s, (run.started_at or row[1]) + timedelta(seconds=timeout_s)


async def _advance(tx: UnitOfWork, settings: Settings, run: RunRow) -> None:
    definition = await load_definition(tx.conn, run.workflow_version_id)
    await Advance(tx=tx, run=run, definition=definition, settings=settings).plan_and_apply()


async def lock_approval(
    tx: UnitOfWork, approval_id: uuid.UUID, tenant_id: uuid.UUID
) -> tuple[RunRow, ApprovalRow] | None:
    """The approval and its run, the run locked and the approval read again under the lock; None when
    the tenant has no such approval."""
    found = await find_approval(tx.conn, approval_id, tenant_id)
    if found is None:
        return None
    run = await lock_run(tx, found.run_id, tenant_id)
    approval = await find_approval(tx.conn, approval_id)
    if run is None or approval is None:
        return None
    return run, approval


async def decide_approval(
    tx: UnitOfWork,
    settings: Settings,
    run: RunRow,
    approval: ApprovalRow,
    *,
    approve: bool,
    edited_args: Any,
    actor: Ctx,
    comment: str | None,
) -> bool:
    """Record a decision on the locked run's approval and move its step on; False (nothing written)
    when the approval was no longer pending. ``edited_args``: arguments the approver edited (tool
    calls only), already checked against the tool's schema."""
    if approval.kind == "step" or not approve:
        edited_args = None  # only the arguments of an approved call can be edited
    landed = await record_decision(tx, run, approval, approve=approve, edited_args=edited_args, comment=comment,
                                   actor=actor)
    if landed:
        args = edited_args if edited_args is not None else approval.args
        await _resolve_gated_step(tx, settings, run, approval, approve=approve, args=args,
                                  principal=actor.principal, comment=comment)
    return landed


async def _resolve_gated_step(
    tx: UnitOfWork,
    settings: Settings,
    run: RunRow,
    approval: ApprovalRow,
    *,
    approve: bool,
    args: Any,
    principal: str,
    comment: str | None,
) -> None:
    """Move the gated step on: an approval step completes; a gated call is dispatched again (or fails)."""
    rows = await load_steps(tx.conn, run.id)
    step = next((row for row in rows.values() if row.id == approval.step_run_id), None)
    if step is None or step.status != StepStatus.WAITING or RunStatus(run.status) == RunStatus.CANCELLED:
        return
    definition = await load_definition(tx.conn, run.workflow_version_id)
    advance = Advance(tx=tx, run=run, definition=definition, settings=settings, rows=rows)
    rejected = f"rejected by {principal}" + (f": {comment}" if comment else "")
    if approval.kind == "step":
        if approve:
            output = {"approved": True, "by": principal, "comment": comment}
            await _succeed_waiting(tx, step, output=output)
            tx.event(run.id, "step_succeeded", step_id=step.step_id)
        else:
            await fail_step(tx, run, step, "approval_rejected", rejected)
    elif approve or approval.kind == "agent":
        # An agent hears about a rejection as the tool call's result, and carries on.
        await advance.dispatch([(step, args if approval.kind == "tool" else None)], wait_deadline=None)
    else:
        await fail_step(tx, run, step, "approval_rejected", rejected)
    advance.rows = {}
    await advance.plan_and_apply()
