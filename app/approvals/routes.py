"""Approval endpoints: the inbox of pending decisions, one approval, and the decision."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from app.approvals import engine
from app.auth.deps import require
from app.context import Ctx
from app.db import Db
from app.engine.runtime import Runtime
from app.engine.unit_of_work import UnitOfWork
from app.errors import Invalid
from app.http import AppSettings, JsonRoute, api_responses, problem_responses
from app.pagination import Cursor, Limit, keyset, page_size
from app.pg import driver
from app.tools import service as tools

router = APIRouter(
    prefix="/api/v1/approvals", tags=["approvals"], responses=api_responses(404), route_class=JsonRoute
)
PAGES = keyset("approvals", datetime, uuid.UUID)

Viewer = Annotated[Ctx, Depends(require("approvals:read"))]
Approver = Annotated[Ctx, Depends(require("approvals:decide"))]
Status = Literal["pending", "approved", "rejected", "expired", "cancelled"]


class ApprovalRead(BaseModel):
    id: uuid.UUID
    run_id: uuid.UUID
    step_id: str
    kind: str = Field(description="step (an approval step), tool (a gated tool step) or agent (an agent's call)")
    call_id: str | None
    tool: str | None
    tool_version: int | None
    args: Any = Field(description="The proposed arguments")
    approved_args: Any = Field(default=None, description="The arguments approved, when an approver edited them")
    reason: str | None
    status: Status
    requested_by: str | None
    requested_at: datetime
    expires_at: datetime | None
    on_expiry: str
    flagged: bool = Field(description="It expired under the 'flag' policy and still awaits a decision")
    decided_by: str | None
    decided_at: datetime | None
    comment: str | None


class ApprovalPage(BaseModel):
    items: list[ApprovalRead]
    next_cursor: str | None


class Decision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decision: Literal["approve", "reject"]
    args: dict[str, Any] | None = Field(
        default=None, description="Approve these arguments instead (checked against the tool's schema)"
    )
    comment: str | None = Field(default=None, max_length=2000)


_COLUMNS = (
    "id, run_id, step_id, kind, call_id, tool, tool_version, args, approved_args, reason, status, requested_by, "
    "requested_at, expires_at, on_expiry, flagged_at, decided_by, decided_at, comment"
)


def _read(row: Any) -> ApprovalRead:
    data = dict(row)
    data["flagged"] = data.pop("flagged_at") is not None
    data["call_id"] = data["call_id"] or None
    return ApprovalRead(**data)


@router.get("", response_model=ApprovalPage, summary="Approvals, newest first (the inbox: status=pending)")
async def list_approvals(
    ctx: Viewer,
    db: Db,
    settings: AppSettings,
    status: Annotated[Status | None, Query()] = None,
    run: Annotated[uuid.UUID | None, Query(description="only this run's approvals")] = None,
    limit: Limit = None,
    cursor: Cursor = None,
) -> ApprovalPage:
    size = page_size(limit, settings)
    after = PAGES.decode(cursor)
    rows = await (await driver(db)).fetch(
        f"SELECT {_COLUMNS} FROM approval WHERE tenant_id = $1 AND ($2::text IS NULL OR status = $2) "
        "AND ($3::uuid IS NULL OR run_id = $3) AND ($4::timestamptz IS NULL OR (requested_at, id) < ($4, $5)) "
        "ORDER BY requested_at DESC, id DESC LIMIT $6",
        ctx.tenant_id,
        status,
        run,
        after[0] if after else None,
        after[1] if after else None,
        size + 1,
    )
    more = len(rows) > size
    rows = rows[:size]
    last = rows[-1] if rows else None
    return ApprovalPage(
        items=[_read(r) for r in rows],
        next_cursor=PAGES.encode(last["requested_at"], last["id"]) if more and last else None,
    )


@router.get("/{approval_id}", response_model=ApprovalRead, summary="One approval")
async def get_approval(approval_id: uuid.UUID, ctx: Viewer, db: Db) -> ApprovalRead:
    row = await (await driver(db)).fetchrow(
        f"SELECT {_COLUMNS} FROM approval WHERE id = $1 AND tenant_id = $2", approval_id, ctx.tenant_id
    )
    if row is None:
        raise engine.ApprovalNotFound(f"approval {approval_id} not found")
    return _read(row)


@router.post(
    "/{approval_id}/decision",
    response_model=ApprovalRead,
    summary="Approve (optionally with edited arguments) or reject, with a comment",
    responses=problem_responses(409),
)
async def decide(
    approval_id: uuid.UUID, body: Decision, request: Request, ctx: Approver, db: Db, settings: AppSettings
) -> ApprovalRead:
    """Exactly one decision wins; a later or concurrent one gets 409. Four-eyes (a tenant setting,
    on by default): whoever started the run cannot approve its requests (403)."""
    conn = await driver(db)
    tx = UnitOfWork(conn, ctx.tenant_id)

    async def check_args(args: Any) -> None:
        row = await conn.fetchrow("SELECT tool, tool_version FROM approval WHERE id = $1", approval_id)
        ref = await tools.resolve(conn, ctx.tenant_id, row["tool"], row["tool_version"])
        errors = tools.validate_args(ref, args) if ref is not None else []
        if errors:
            raise Invalid(
                "the edited arguments do not match the tool's schema",
                errors=[{"pointer": "/body/args" + e["pointer"], "message": e["message"]} for e in errors],
            )

    await engine.decide(
        tx,
        settings,
        ctx.tenant_id,
        approval_id,
        ctx.principal,
        approve=body.decision == "approve",
        args=body.args,
        comment=body.comment,
        validate=check_args,
        actor=ctx,
    )
    await tx.flush()
    await db.commit()
    runtime: Runtime = request.app.state.runtime
    await runtime.after_commit(tx)
    return await get_approval(approval_id, ctx, db)
