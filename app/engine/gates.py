"""Gates: a step or a call held for a person's decision, and the only writes of an approval's status.

An approval moves once, from ``pending`` to ``approved``, ``rejected``, ``expired`` or ``cancelled``
(:data:`APPROVAL_MOVES`). :func:`move_approval` and :func:`cancel_approvals` are that move:
``UPDATE … WHERE status = 'pending'``, bumping ``version`` and reporting whether it landed, so of a
decision, an expiry and a cancellation racing for one approval exactly one lands. Callers hold the
run's lock as for every engine write; the guard holds without it.

A request is bound to one exact action: ``action_hash`` is SHA-256 over the canonical JSON of the
tool, its version and the arguments. When an approver edits the arguments, the hash is over the
edited ones, and the step runs those; the executor recomputes the hash and refuses anything else.

What a decision or an expiry does to the gated step (run it, fail it) is :mod:`app.engine.actions`'
and :mod:`app.engine.attempts`' business; the rules of who may decide are the approvals domain's.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from app.audit.service import entry
from app.canonical import digest
from app.clock import now
from app.context import Ctx
from app.engine.state_machine import IllegalTransition, StepStatus, transition_step
from app.engine.unit_of_work import Job, UnitOfWork
from app.pg import Conn, dumps
from app.tenants.policy import load_policy

if TYPE_CHECKING:
    from app.engine.advance import RunRow, StepRow


class ApprovalStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


APPROVAL_MOVES: dict[ApprovalStatus, frozenset[ApprovalStatus]] = {
    ApprovalStatus.PENDING: frozenset(
        {ApprovalStatus.APPROVED, ApprovalStatus.REJECTED, ApprovalStatus.EXPIRED, ApprovalStatus.CANCELLED}
    ),
    ApprovalStatus.APPROVED: frozenset(),
    ApprovalStatus.REJECTED: frozenset(),
    ApprovalStatus.EXPIRED: frozenset(),
    ApprovalStatus.CANCELLED: frozenset(),
}


def action_hash(tool: str | None, version: int | None, args: Any) -> str:
    return digest({"tool": tool, "version": version, "args": args})


@dataclass(frozen=True, kw_only=True)
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


@dataclass(frozen=True)
class ApprovalRow:
    """What the engine and the approvals domain read of an approval to decide or expire it."""

    id: uuid.UUID
    run_id: uuid.UUID
    step_run_id: uuid.UUID
    step_id: str
    kind: str
    tool: str | None
    tool_version: int | None
    args: Any
    status: str
    requested_by: str | None
    requested_at: datetime
    expires_at: datetime | None
    on_expiry: str


_ROW = (
    "SELECT id, run_id, step_run_id, step_id, kind, tool, tool_version, args, status, requested_by, requested_at, "
    "expires_at, on_expiry FROM approval"
)
# A pending approval has no decision, comment or edited arguments yet: a move sets them (NULL when not
# given); its action hash changes only when the approver edited the arguments.
_MOVE = (
    "UPDATE approval SET status = $2, version = version + 1, decided_by = $3, decided_at = $4, comment = $5, "
    "approved_args = $6::jsonb, action_hash = coalesce($7, action_hash) "
    "WHERE id = $1 AND status = 'pending' RETURNING id"
)
_CANCEL = (
    "UPDATE approval SET status = 'cancelled', version = version + 1, decided_at = $2, superseded_at = $3 "
    "WHERE step_run_id = ANY($1::uuid[]) AND status = 'pending' RETURNING id"
)


def check_approval_move(current: str, to: ApprovalStatus) -> None:
    if to not in APPROVAL_MOVES[ApprovalStatus(current)]:
        raise IllegalTransition(f"a {current} approval cannot become {to}", status_now=current)


async def move_approval(
    conn: Conn,
    approval_id: uuid.UUID,
    *,
    to: ApprovalStatus,
    decided_by: str | None = None,
    decided_at: datetime | None = None,
    comment: str | None = None,
    approved_args: Any = None,
    action_digest: str | None = None,
) -> bool:
    """Move a pending approval to ``to``; False when it was no longer pending (nothing is written then).

    With :func:`cancel_approvals`, the only write of an approval's status: whoever moves it first wins,
    and the others learn they lost rather than overwrite the decision. ``approved_args``: arguments
    an approver edited; ``action_digest``: the action hash over them."""
    check_approval_move(ApprovalStatus.PENDING, to)
    landed = await conn.fetchval(
        _MOVE, approval_id, to.value, decided_by, decided_at, comment,
        dumps(approved_args) if approved_args is not None else None, action_digest,
    )
    return landed is not None


async def cancel_approvals(
    conn: Conn, step_run_ids: list[uuid.UUID], *, decided_at: datetime | None = None,
    superseded_at: datetime | None = None,
) -> int:
    """Cancel the pending approvals of these steps, guarded like :func:`move_approval`; returns how many."""
    check_approval_move(ApprovalStatus.PENDING, ApprovalStatus.CANCELLED)
    return len(await conn.fetch(_CANCEL, step_run_ids, decided_at, superseded_at))


async def find_approval(conn: Conn, approval_id: uuid.UUID, tenant_id: uuid.UUID | None = None) -> ApprovalRow | None:
    """The approval (of ``tenant_id``'s, when given), or None."""
    row = await conn.fetchrow(f"{_ROW} WHERE id = $1 AND ($2::uuid IS NULL OR tenant_id = $2)", approval_id, tenant_id)
    return ApprovalRow(**dict(row)) if row is not None else None


async def request_approval(tx: UnitOfWork, run: RunRow, step: StepRow, gate: Gate, *, queue: str) -> uuid.UUID:
    """Record the request and put the step to wait for it (the step must be running or pending).

    The step's deadline job goes to ``queue``; when it fires, :func:`expire_approval` runs."""
    requested_by, raw_policy = await tx.conn.fetchrow(
        "SELECT r.created_by, t.policy FROM run r JOIN tenant t ON t.id = r.tenant_id WHERE r.id = $1", run.id
    )
    policy = load_policy(raw_policy)
    timeout_s = gate.timeout_s or policy.approval_timeout_s
    on_expiry = gate.on_expiry or policy.approval_on_expiry
    expires = now() + timedelta(seconds=timeout_s)
    approval_id = uuid.uuid4()
    bound_to = action_hash(gate.tool, gate.tool_version, gate.args) if gate.kind != "step" else None
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
        bound_to,
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
        to=StepStatus.WAITING,
        wait_deadline=expires,
        lease_owner=None,
        lease_expires_at=None,
    )
    step.status = StepStatus.WAITING
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
    tx.enqueue(run.id, Job(kind="wait_timeout", job_id=f"wt:{step.id}:{step.version}", queue=queue,
                           not_before=expires))
    return approval_id


async def record_decision(
    tx: UnitOfWork,
    run: RunRow,
    approval: ApprovalRow,
    *,
    approve: bool,
    edited_args: Any,
    comment: str | None,
    actor: Ctx,
) -> bool:
    """Approve or reject a pending approval, with its run event and audit entry; False when it was no
    longer pending (nothing is written then). ``edited_args`` (not None): the approver's arguments,
    which the action hash then binds. ``actor``: the request deciding."""
    principal = actor.principal
    decided_at = now()
    edited = edited_args is not None
    final_args = edited_args if edited else approval.args
    to = ApprovalStatus.APPROVED if approve else ApprovalStatus.REJECTED
    bound_to = action_hash(approval.tool, approval.tool_version, final_args) if approval.kind != "step" else None
    if not await move_approval(tx.conn, approval.id, to=to, decided_by=principal, decided_at=decided_at,
                               comment=comment, approved_args=edited_args, action_digest=bound_to):
        return False
    tx.event(
        run.id,
        f"approval_{to.value}",
        step_id=approval.step_id,
        approval_id=str(approval.id),
        actor=principal,
        comment=comment,
        edited=edited,
        waited_s=round((decided_at - approval.requested_at).total_seconds(), 3),
    )
    tx.audit(run.tenant_id, entry(actor, f"approval.{'approve' if approve else 'reject'}", f"approval:{approval.id}",
                                  data={"run": str(run.id), "step": approval.step_id, "edited": edited,
                                        "comment": comment}))
    return True


@dataclass(frozen=True)
class Expiry:
    """What :func:`expire_approval` did: flagged the approval (the step waits on) or expired it; or, not
    ``landed``, nothing, because another transaction decided or cancelled it first."""

    approval: ApprovalRow
    flagged: bool
    landed: bool = True


async def expire_approval(tx: UnitOfWork, run: RunRow, step: StepRow) -> Expiry | None:
    """The step's approval ran out of time: expire it, or flag it and leave it pending (per its policy).

    None when the step has no pending approval. A flagged approval's step keeps waiting, with no
    deadline; an expired one's step is for the caller to move on."""
    row = await tx.conn.fetchrow(
        f"{_ROW} WHERE step_run_id = $1 AND status = 'pending' ORDER BY requested_at DESC LIMIT 1", step.id
    )
    if row is None:
        return None
    approval = ApprovalRow(**dict(row))
    if approval.on_expiry == "flag":
        flagged = await tx.conn.fetchval(
            "UPDATE approval SET flagged_at = $2, version = version + 1 WHERE id = $1 AND status = 'pending' "
            "RETURNING id",
            approval.id,
            now(),
        )
        if flagged is None:
            return Expiry(approval, flagged=True, landed=False)
        step.version = await transition_step(
            tx.conn, step.id, status=step.status, version=step.version, to=StepStatus.WAITING, wait_deadline=None
        )
        tx.event(run.id, "approval_flagged", step_id=step.step_id, approval_id=str(approval.id))
        tx.audit(run.tenant_id, entry("system", "approval.flag", f"approval:{approval.id}"))
        return Expiry(approval, flagged=True)
    if not await move_approval(tx.conn, approval.id, to=ApprovalStatus.EXPIRED, decided_at=now()):
        return Expiry(approval, flagged=False, landed=False)
    tx.event(run.id, "approval_expired", step_id=step.step_id, approval_id=str(approval.id),
             waited_s=round((now() - approval.requested_at).total_seconds(), 3))
    tx.audit(run.tenant_id, entry("system", "approval.expire", f"approval:{approval.id}"))
    return Expiry(approval, flagged=False)


async def supersede_approvals(tx: UnitOfWork, step_run_ids: list[uuid.UUID]) -> None:
    """A retried run's steps start over: their earlier approvals no longer apply (pending ones are cancelled)."""
    at = now()
    await cancel_approvals(tx.conn, step_run_ids, superseded_at=at)
    await tx.conn.execute(
        "UPDATE approval SET superseded_at = $2, version = version + 1 "
        "WHERE step_run_id = ANY($1::uuid[]) AND superseded_at IS NULL",
        step_run_ids,
        at,
    )


@dataclass(frozen=True, kw_only=True)
class Grant:
    """The approval a gated call asked for, as the call reads it back (any status)."""

    id: uuid.UUID
    status: str
    tool: str | None
    tool_version: int | None
    args: Any
    approved_args: Any  # the arguments an approver edited, or None
    action_hash: str | None
    decided_by: str | None
    comment: str | None


async def grant_for(conn: Conn, step_run_id: uuid.UUID, call_id: str) -> Grant | None:
    """The approval of a gated call (any status), or None."""
    row = await conn.fetchrow(
        "SELECT id, status, tool, tool_version, args, approved_args, action_hash, decided_by, comment "
        "FROM approval WHERE step_run_id = $1 AND call_id = $2 AND superseded_at IS NULL",
        step_run_id,
        call_id,
    )
    return Grant(**row) if row is not None else None
