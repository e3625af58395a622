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
from app.approvals.schemas import (
    ApprovalPage,
    ApprovalRead,
    ArgsCheck,
    Decision,
    Inbox,
    InboxItem,
    ModelTurn,
    Status,
    TurnCall,
)
from app.auth.permissions import allowed
from app.budgets.service import usd_text
from app.canonical import digest
from app.config import Settings
from app.context import Ctx
from app.engine import actions
from app.engine.gates import ApprovalRow, ApprovalStatus
from app.engine.unit_of_work import UnitOfWork
from app.errors import Forbidden, Invalid
from app.pagination import keyset
from app.pg import Conn, driver
from app.tenants.policy import load_policy
from app.textdiff import diffable_json, line_diff
from app.tools import service as tools

PAGES = keyset("approvals", datetime, uuid.UUID)
DECIDE = "approvals:decide"

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
        raise await _already_decided(work.conn, ctx, approval_id)
    policy = load_policy(await work.conn.fetchval("SELECT policy FROM tenant WHERE id = $1", ctx.tenant_id))
    if policy.four_eyes and approval.requested_by is not None and approval.requested_by == ctx.principal:
        raise Forbidden("four-eyes: whoever started the run cannot approve its requests")
    approve = decision.decision == "approve"
    edited_args = decision.args if approve and approval.kind != "step" else None
    if edited_args is not None and digest(edited_args) == digest(approval.args):
        edited_args = None  # the proposed arguments, sent back unchanged: no edit
    if edited_args is not None:
        await _check_edited_args(work.conn, ctx, approval, edited_args)
    landed = await actions.decide_approval(work, settings, run, approval, approve=approve, edited_args=edited_args,
                                           actor=ctx, comment=decision.comment)
    if not landed:
        raise await _already_decided(work.conn, ctx, approval_id)
    return await get_approval(db, ctx, approval_id)


async def _already_decided(conn: Conn, ctx: Ctx, approval_id: uuid.UUID) -> AlreadyDecided:
    """The race lost, told as who decided first and when (an expiry or a cancellation has no decider)."""
    row = await conn.fetchrow("SELECT status, decided_by, decided_at, comment FROM approval WHERE id = $1",
                              approval_id)
    assert row is not None
    status, by, at = row["status"], row["decided_by"], row["decided_at"]
    name = (await principal_names(conn, ctx, [by])).get(by) if by else None
    detail = f"approval {approval_id} is already {status}"
    if by:
        detail += f" by {name or by}"
    if at is not None:
        detail += f" at {at.isoformat(timespec='seconds')}"
    return AlreadyDecided(detail, status_now=status, decided_by=by, decided_by_name=name,
                          decided_at=at.isoformat() if at is not None else None, comment=row["comment"])


async def principal_names(conn: Conn, ctx: Ctx, principals: list[str | None]) -> dict[str, str]:
    """What to call each principal on screen: a member's name (else email, else subject), ``API key <name>``.

    Only the tenant's own members and keys are named; anyone else keeps their bare principal."""
    ids: dict[str, list[uuid.UUID]] = {"user": [], "key": []}
    for principal in {p for p in principals if p}:
        kind, _, raw = principal.partition(":")
        try:
            ids[kind].append(uuid.UUID(raw))
        except (KeyError, ValueError):
            continue
    users, keys = ids["user"], ids["key"]
    if not users and not keys:
        return {}
    rows = await conn.fetch(
        "SELECT 'user:' || u.id AS principal, coalesce(u.name, u.email, u.subject) AS name "
        "FROM membership m JOIN app_user u ON u.id = m.user_id WHERE m.tenant_id = $1 AND m.user_id = ANY($2::uuid[]) "
        "UNION ALL SELECT 'key:' || k.id, 'API key ' || k.name FROM api_key k "
        "WHERE k.tenant_id = $1 AND k.id = ANY($3::uuid[])",
        ctx.tenant_id, users, keys,
    )
    return {row["principal"]: row["name"] for row in rows}


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


# --- the inbox --------------------------------------------------------------------------------------------

# Decidable requests first (for whoever asks), then those soonest to expire; requests that never expire
# after those that do, oldest first. ``rank``: 2 when four-eyes withholds it from the caller, +1 without expiry.
INBOX_PAGES = keyset("approvals-inbox", int, datetime, uuid.UUID)
LAST_TURN_CHARS = 2000
_RANK = "((a.requested_by = $2) IS TRUE)::int * 2 + (a.expires_at IS NULL)::int"
_DUE = "coalesce(a.expires_at, a.requested_at)"
_PAGE_COLUMNS = ", ".join("p." + column for column in _COLUMNS.split(", "))
_INBOX = (
    f"WITH p AS (SELECT a.*, {_RANK} AS rank, {_DUE} AS due FROM approval a "
    "WHERE a.tenant_id = $1 AND a.status = 'pending' "
    f"AND ($3::int IS NULL OR ({_RANK}, {_DUE}, a.id) > ($3, $4, $5)) ORDER BY rank, due, a.id LIMIT $6) "
    f"SELECT {_PAGE_COLUMNS}, p.rank, p.due, r.workflow_name, r.workflow_version, u.cost_usd, "
    "t.seq AS turn_seq, t.message AS turn_message, t.created_at AS turn_at "
    "FROM p JOIN run r ON r.id = p.run_id AND r.tenant_id = $1 "
    "LEFT JOIN run_usage u ON u.run_id = p.run_id AND u.tenant_id = $1 "
    "LEFT JOIN LATERAL (SELECT c.seq, c.data -> 'message' AS message, c.created_at FROM agent_checkpoint c "
    "  WHERE p.kind = 'agent' AND c.step_run_id = p.step_run_id AND c.kind = 'model' "
    "  ORDER BY c.seq DESC LIMIT 1) t ON true "
    "ORDER BY p.rank, p.due, p.id"
)


async def inbox(db: AsyncSession, ctx: Ctx, *, cursor: str | None, limit: int) -> Inbox:
    """The pending approvals this caller may decide first, then the rest, each group soonest to expire first;
    with each its run's workflow and cost so far, the agent's last model turn, and why the caller may not
    decide it (``blocked``). One query for the page and its extras, one to name the runs' starters."""
    conn = await driver(db)
    may_decide = allowed(ctx.roles, DECIDE)
    policy = load_policy(await conn.fetchval("SELECT policy FROM tenant WHERE id = $1", ctx.tenant_id))
    withheld_from = ctx.principal if may_decide and policy.four_eyes else None
    after = INBOX_PAGES.decode(cursor)
    rows = await conn.fetch(_INBOX, ctx.tenant_id, withheld_from, *(after or (None, None, None)), limit + 1)
    page, next_cursor = INBOX_PAGES.page(rows, limit, lambda row: (row["rank"], row["due"], row["id"]))
    names = await principal_names(conn, ctx, [row["requested_by"] for row in page])
    return Inbox(items=[_inbox_item(row, may_decide, names) for row in page], next_cursor=next_cursor)


def _inbox_item(row: asyncpg.Record, may_decide: bool, names: dict[str, str]) -> InboxItem:
    blocked = (f"needs the {DECIDE} permission" if not may_decide
               else "four-eyes: you started this run, so someone else decides" if row["rank"] >= 2 else None)
    return InboxItem(
        approval=_read(row), workflow=row["workflow_name"], workflow_version=row["workflow_version"],
        run_cost_usd=usd_text(row["cost_usd"]) if row["cost_usd"] is not None else None,
        last_turn=_turn(row), requested_by_name=names.get(row["requested_by"] or ""), blocked=blocked,
    )


def _turn(row: asyncpg.Record) -> ModelTurn | None:
    message = row["turn_message"]
    if row["turn_seq"] is None or not isinstance(message, dict):
        return None
    content = message.get("content")
    text = content if isinstance(content, str) else None
    # An agent's call id is "<turn>:<the model's call id>" (workers/agent.py), unique in the conversation.
    gated = (row["call_id"] or "").partition(":")[2]
    calls = [TurnCall(name=str((call.get("function") or {}).get("name") or call.get("name") or "?"),
                      this_request=bool(gated) and call.get("id") == gated)
             for call in message.get("tool_calls") or [] if isinstance(call, dict)]
    return ModelTurn(seq=row["turn_seq"], content=text[:LAST_TURN_CHARS] if text else text,
                     truncated=bool(text and len(text) > LAST_TURN_CHARS), tool_calls=calls,
                     created_at=row["turn_at"])


async def check_args(db: AsyncSession, ctx: Ctx, approval_id: uuid.UUID, args: Any) -> ArgsCheck:
    """Edited arguments checked as a decision would check them (the gated tool version's input schema),
    without deciding anything; with the diff against the proposed arguments. 422 for an approval whose
    arguments cannot be edited (an approval step's)."""
    approval = await get_approval(db, ctx, approval_id)
    if approval.kind == "step" or approval.tool is None:
        raise Invalid("an approval step has no arguments to edit",
                      errors=[{"pointer": "/form/args", "message": "nothing to edit"}])
    ref = await tools.resolve(await driver(db), ctx.tenant_id, approval.tool, approval.tool_version)
    errors = tools.validate_args(ref, args) if ref is not None else [
        {"pointer": "", "message": f"tool {approval.tool} v{approval.tool_version} no longer exists"}]
    return ArgsCheck(
        approval_id=approval_id, tool=approval.tool, tool_version=approval.tool_version, errors=errors,
        changed=digest(args) != digest(approval.args),
        diff=line_diff(diffable_json(approval.args), diffable_json(args)),
    )
