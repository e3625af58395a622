"""Approval requests and decisions, as engine transactions on the locked run.

A request is bound to one exact action: ``action_hash`` is SHA-256 over the canonical JSON of the
tool, its version and the arguments. When an approver edits the arguments, the hash is over the
edited ones, and the step runs those; the executor recomputes the hash and refuses anything else.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from app.audit.service import entry
from app.canonical import digest
from app.clock import now
from app.config import Settings
from app.context import Ctx
from app.engine.advance import Advance, RunRow, StepRow, load_definition, load_steps, lock, queue_name
from app.engine.state_machine import IllegalTransition, RunStatus, StepStatus, transition_step
from app.engine.unit_of_work import Job, UnitOfWork
from app.errors import Conflict, Forbidden, NotFound
from app.pg import dumps
from app.tenants.policy import TenantPolicy, load_policy

S = StepStatus


def action_hash(tool: str | None, version: int | None, args: Any) -> str:
    return digest({"tool": tool, "version": version, "args": args})


@dataclass(frozen=True)
class Gate:
    """A call that needs a person's approval before it runs."""

    kind: str  # "step" | "tool" | "agent"
    call_id: str
    tool: str | None
    tool_version: int | None
    args: Any
    reason: str
    timeout_s: float | None = None
    on_expiry: str | None = None


class ApprovalNotFound(NotFound):
    type = "approval-not-found"


class AlreadyDecided(Conflict):
    type = "approval-decided"
    title = "Already decided"


async def tenant_policy(tx: UnitOfWork, tenant_id: uuid.UUID) -> TenantPolicy:
    return load_policy(await tx.conn.fetchval("SELECT policy FROM tenant WHERE id = $1", tenant_id))


async def request_approval(tx: UnitOfWork, settings: Settings, run: RunRow, step: StepRow, gate: Gate) -> uuid.UUID:
    """Record the request and put the step to wait for it (the step must be running or pending)."""
    requested_by, raw_policy = await tx.conn.fetchrow(
        "SELECT r.created_by, t.policy FROM run r JOIN tenant t ON t.id = r.tenant_id WHERE r.id = $1", run.id
    )
    policy = load_policy(raw_policy)
    timeout_s = gate.timeout_s or policy.approval_timeout_s
    on_expiry = gate.on_expiry or policy.approval_on_expiry
    expires = now() + timedelta(seconds=timeout_s)
    approval_id = uuid.uuid4()
    digest = action_hash(gate.tool, gate.tool_version, gate.args) if gate.kind != "step" else None
    await tx.conn.execute(
        "INSERT INTO approval (id, tenant_id, run_id, step_run_id, step_id, kind, call_id, tool, tool_version, args, "
        "action_hash, reason, status, requested_by, expires_at, on_expiry) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb, $11, $12, 'pending', $13, $14, $15)",
        approval_id,
        run.tenant_id,
        run.id,
        step.id,
        step.step_id,
        gate.kind,
        gate.call_id,
        gate.tool,
        gate.tool_version,
        dumps(gate.args),
        digest,
        gate.reason,
        requested_by,
        expires,
        on_expiry,
    )
    step.version = await transition_step(
        tx.conn,
        step.id,
        status=step.status,
        version=step.version,
        to=S.WAITING,
        wait_deadline=expires,
        lease_owner=None,
        lease_expires_at=None,
    )
    step.status = S.WAITING
    tx.event(
        run.id,
        "approval_requested",
        step_id=step.step_id,
        map_index=step.map_index,
        approval_id=str(approval_id),
        tool=gate.tool,
        tool_version=gate.tool_version,
        reason=gate.reason,
        expires_at=expires.isoformat(),
    )
    tx.audit(run.tenant_id, entry("system", "approval.request", f"approval:{approval_id}",
                                  data={"run": str(run.id), "step": step.step_id, "tool": gate.tool,
                                        "reason": gate.reason}))
    tx.enqueue(run.id, Job("wait_timeout", f"wt:{step.id}:{step.version}", queue_name(settings, run.priority), expires))
    return approval_id


_LOCATE = "SELECT run_id FROM approval WHERE id = $1 AND tenant_id = $2"
_APPROVAL = "SELECT * FROM approval WHERE id = $1"


async def decide(
    tx: UnitOfWork,
    settings: Settings,
    tenant_id: uuid.UUID,
    approval_id: uuid.UUID,
    principal: str,
    *,
    approve: bool,
    args: Any = None,
    comment: str | None = None,
    validate: Any = None,
    actor: Ctx | None = None,
) -> dict[str, Any]:
    """Apply a decision; exactly one of concurrent decisions wins (the others get 409). ``actor``: the
    request deciding, for the audit log.

    ``validate(args)`` re-checks edited arguments against the tool's schema (raises on invalid ones).
    """
    run_id = await tx.conn.fetchval(_LOCATE, approval_id, tenant_id)
    if run_id is None:
        raise ApprovalNotFound(f"approval {approval_id} not found")
    run = await lock(tx, run_id, tenant_id)
    assert run is not None
    row = await tx.conn.fetchrow(_APPROVAL, approval_id)
    if row["status"] != "pending":
        raise AlreadyDecided(f"approval {approval_id} is already {row['status']}", status_now=row["status"])
    policy = await tenant_policy(tx, tenant_id)
    if policy.four_eyes and row["requested_by"] is not None and row["requested_by"] == principal:
        raise Forbidden("four-eyes: whoever started the run cannot approve its requests")
    edited = approve and args is not None and row["kind"] != "step"
    if edited and validate is not None:
        await validate(args)
    final_args = args if edited else row["args"]
    digest = action_hash(row["tool"], row["tool_version"], final_args) if row["kind"] != "step" else None
    status = "approved" if approve else "rejected"
    await tx.conn.execute(
        "UPDATE approval SET status = $2, version = version + 1, decided_by = $3, decided_at = $4, comment = $5, "
        "approved_args = $6::jsonb, action_hash = coalesce($7, action_hash) WHERE id = $1",
        approval_id,
        status,
        principal,
        now(),
        comment,
        dumps(final_args) if edited else None,
        digest,
    )
    tx.event(
        run.id,
        f"approval_{status}",
        step_id=row["step_id"],
        approval_id=str(approval_id),
        actor=principal,
        comment=comment,
        edited=edited,
    )
    tx.audit(tenant_id, entry(actor or principal, f"approval.{'approve' if approve else 'reject'}",
                              f"approval:{approval_id}",
                              data={"run": str(run.id), "step": row["step_id"], "edited": edited, "comment": comment}))
    await _resolve_step(tx, settings, run, row, approve=approve, args=final_args, principal=principal, comment=comment)
    return {**dict(row), "status": status}


async def _resolve_step(
    tx: UnitOfWork,
    settings: Settings,
    run: RunRow,
    approval: Any,
    *,
    approve: bool,
    args: Any,
    principal: str,
    comment: str | None,
) -> None:
    """Move the gated step on: an approval step completes; a gated call is dispatched again (or fails)."""
    rows = await load_steps(tx.conn, run.id)
    step = next((r for r in rows.values() if r.id == approval["step_run_id"]), None)
    if step is None or step.status != S.WAITING or RunStatus(run.status) in (RunStatus.CANCELLED,):
        return
    definition = await load_definition(tx.conn, run.workflow_version_id)
    advance = Advance(tx, run, definition, settings, rows=rows)
    if approval["kind"] == "step":
        if approve:
            output = {"approved": True, "by": principal, "comment": comment}
            await transition_step(
                tx.conn,
                step.id,
                status=step.status,
                version=step.version,
                to=S.SUCCEEDED,
                output=output,
                finished_at=now(),
                wait_deadline=None,
            )
            tx.event(run.id, "step_succeeded", step_id=step.step_id)
        else:
            await _fail(tx, run, step, "approval_rejected", f"rejected by {principal}" + _said(comment))
    elif approve or approval["kind"] == "agent":
        # An agent hears about a rejection as the tool call's result, and carries on.
        await advance.dispatch([(step, args if approval["kind"] == "tool" else None)], wait_deadline=None)
    else:
        await _fail(tx, run, step, "approval_rejected", f"rejected by {principal}" + _said(comment))
    advance.rows = {}
    await advance.run_plan()


def _said(comment: str | None) -> str:
    return f": {comment}" if comment else ""


async def _fail(tx: UnitOfWork, run: RunRow, step: StepRow, error_class: str, message: str) -> None:
    error = {"class": error_class, "message": message}
    await transition_step(
        tx.conn,
        step.id,
        status=step.status,
        version=step.version,
        to=S.FAILED,
        error=error,
        finished_at=now(),
        wait_deadline=None,
    )
    tx.event(run.id, "step_failed", step_id=step.step_id, map_index=step.map_index, error=error)


async def expire(tx: UnitOfWork, settings: Settings, run: RunRow, step: StepRow) -> bool:
    """The step's approval ran out of time: reject it, or flag it and leave it pending (per its policy)."""
    row = await tx.conn.fetchrow(
        "SELECT * FROM approval WHERE step_run_id = $1 AND status = 'pending' ORDER BY requested_at DESC LIMIT 1",
        step.id,
    )
    if row is None:
        return False
    if row["on_expiry"] == "flag":
        await tx.conn.execute(
            "UPDATE approval SET flagged_at = $2, version = version + 1 WHERE id = $1", row["id"], now()
        )
        step.version = await transition_step(
            tx.conn, step.id, status=step.status, version=step.version, to=S.WAITING, wait_deadline=None
        )
        tx.event(run.id, "approval_flagged", step_id=step.step_id, approval_id=str(row["id"]))
        tx.audit(run.tenant_id, entry("system", "approval.flag", f"approval:{row['id']}"))
        return True
    await tx.conn.execute(
        "UPDATE approval SET status = 'expired', version = version + 1, decided_at = $2 WHERE id = $1", row["id"], now()
    )
    tx.event(run.id, "approval_expired", step_id=step.step_id, approval_id=str(row["id"]))
    tx.audit(run.tenant_id, entry("system", "approval.expire", f"approval:{row['id']}"))
    advance = Advance(tx, run, await load_definition(tx.conn, run.workflow_version_id), settings)
    if row["kind"] == "agent":
        await advance.dispatch([(step, None)], wait_deadline=None)
    else:
        await _fail(tx, run, step, "approval_expired", f"no decision before {row['expires_at'].isoformat()}")
    await advance.run_plan()
    return True


async def supersede(tx: UnitOfWork, step_run_ids: list[uuid.UUID]) -> None:
    """A retried run's steps start over: their earlier approvals no longer apply (pending ones are cancelled)."""
    await tx.conn.execute(
        "UPDATE approval SET superseded_at = $2, version = version + 1, "
        "status = CASE WHEN status = 'pending' THEN 'cancelled' ELSE status END "
        "WHERE step_run_id = ANY($1::uuid[]) AND superseded_at IS NULL",
        step_run_ids,
        now(),
    )


async def grant_for(conn: Any, step_run_id: uuid.UUID, call_id: str) -> Any:
    """The approval of a gated call (any status), or None."""
    return await conn.fetchrow(
        "SELECT id, status, tool, tool_version, args, approved_args, action_hash, decided_by, comment "
        "FROM approval WHERE step_run_id = $1 AND call_id = $2 AND superseded_at IS NULL",
        step_run_id,
        call_id,
    )


__all__ = [
    "AlreadyDecided",
    "ApprovalNotFound",
    "Gate",
    "IllegalTransition",
    "action_hash",
    "decide",
    "expire",
    "grant_for",
    "request_approval",
    "supersede",
]
