"""Approvals: the inbox, one approval, and deciding one, with the rules of who may decide and what.

The engine owns an approval's state (:mod:`app.engine.gates`: requests, expiry, the one guarded
status move); this module owns the policy around it: four-eyes, edited arguments checked again
against the tool's schema, and what a tenant may list and read.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession

from app.approvals.errors import AlreadyDecided, ApprovalNotFound
from app.approvals.schemas import ApprovalPage, ApprovalRead, Decision, Status
from app.config import Settings
from app.context import Ctx
from app.engine import actions
from app.engine.gates import ApprovalRow, ApprovalStatus
from app.engine.unit_of_work import UnitOfWork
from app.errors import Forbidden, Invalid
from app.pagination import keyset
from app.pg import Conn, driver
from app.tenants.policy import load_policy
from app.tools import service as tools

PAGES = keyset("approvals", datetime, uuid.UUID)

_COLUMNS = (
    "id, run_id, step_id, kind, call_id, tool, tool_version, args, approved_args, reason, status, requested_by, "
    "requested_at, expires_at, on_expiry, flagged_at, decided_by, decided_at, comment"
)


def _read(row: asyncpg.Record) -> ApprovalRead:
    data = dict(row)
    data["flagged"] = data.pop("flagged_at") is not None
    data["call_id"] = data["call_id"] or None
    return ApprovalRead(**data)


async def list_approvals(
    db: AsyncSession,
    ctx: Ctx,
    *,
    status: Status | None,
    run_id: uuid.UUID | None,
    cursor: str | None,
    limit: int,
) -> ApprovalPage:
    """The tenant's approvals, newest first (``status="pending"``: the inbox), keyset-paginated."""
    after = PAGES.decode(cursor)
    rows = await (await driver(db)).fetch(
        f"SELECT {_COLUMNS} FROM approval WHERE tenant_id = $1 AND ($2::text IS NULL OR status = $2) "
        "AND ($3::uuid IS NULL OR run_id = $3) AND ($4::timestamptz IS NULL OR (requested_at, id) < ($4, $5)) "
        "ORDER BY requested_at DESC, id DESC LIMIT $6",
        ctx.tenant_id,
        status,
        run_id,
        after[0] if after else None,
        after[1] if after else None,
        limit + 1,
    )
    items, next_cursor = PAGES.page(rows, limit, lambda row: (row["requested_at"], row["id"]))
    return ApprovalPage(items=[_read(row) for row in items], next_cursor=next_cursor)


async def get_approval(db: AsyncSession, ctx: Ctx, approval_id: uuid.UUID) -> ApprovalRead:
    """One of the tenant's approvals; another tenant's is :class:`ApprovalNotFound`."""
    row = await (await driver(db)).fetchrow(
        f"SELECT {_COLUMNS} FROM approval WHERE id = $1 AND tenant_id = $2", approval_id, ctx.tenant_id
    )
    if row is None:
        raise ApprovalNotFound(f"approval {approval_id} not found")
    return _read(row)


async def decide_approval(
    db: AsyncSession, work: UnitOfWork, ctx: Ctx, settings: Settings, approval_id: uuid.UUID, decision: Decision
) -> ApprovalRead:
    """Approve (possibly with edited arguments) or reject; the gated step moves on in ``work``.

    Exactly one of concurrent decisions, an expiry and a cancellation lands; the others get
    :class:`AlreadyDecided` (409). Four-eyes (a tenant setting): whoever started the run cannot
    decide its approvals (403). Edited arguments must match the tool's schema (422)."""
    locked = await actions.lock_approval(work, approval_id, ctx.tenant_id)
    if locked is None:
        raise ApprovalNotFound(f"approval {approval_id} not found")
    run, approval = locked
    if approval.status != ApprovalStatus.PENDING:
        raise _already_decided(approval_id, approval.status)
    policy = load_policy(await work.conn.fetchval("SELECT policy FROM tenant WHERE id = $1", ctx.tenant_id))
    if policy.four_eyes and approval.requested_by is not None and approval.requested_by == ctx.principal:
        raise Forbidden("four-eyes: whoever started the run cannot approve its requests")
    approve = decision.decision == "approve"
    edited_args = decision.args if approve and approval.kind != "step" else None
    if edited_args is not None:
        await _check_edited_args(work.conn, ctx, approval, edited_args)
    landed = await actions.decide_approval(work, settings, run, approval, approve=approve, edited_args=edited_args,
                                           actor=ctx, comment=decision.comment)
    if not landed:
        status_now = await work.conn.fetchval("SELECT status FROM approval WHERE id = $1", approval_id)
        raise _already_decided(approval_id, status_now)
    return await get_approval(db, ctx, approval_id)


def _already_decided(approval_id: uuid.UUID, status: str) -> AlreadyDecided:
    return AlreadyDecided(f"approval {approval_id} is already {status}", status_now=status)


async def _check_edited_args(conn: Conn, ctx: Ctx, approval: ApprovalRow, args: Any) -> None:
    """The approver's arguments must match the schema of the tool version the call was gated on."""
    if approval.tool is None:
        return
    ref = await tools.resolve(conn, ctx.tenant_id, approval.tool, approval.tool_version)
    errors = tools.validate_args(ref, args) if ref is not None else []
    if errors:
        raise Invalid(
            "the edited arguments do not match the tool's schema",
            errors=[{"pointer": "/body/args" + e["pointer"], "message": e["message"]} for e in errors],
        )
