"""Approval endpoints: the inbox of pending decisions, one approval, and the decision."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from app.approvals import service
from app.approvals.schemas import ApprovalPage, ApprovalRead, Decision, Status
from app.auth.deps import require
from app.context import Ctx
from app.db import Db
from app.http import AppSettings, JsonRoute, api_responses, problem_responses
from app.pagination import Cursor, Limit, page_size
from app.request_work import Work

router = APIRouter(
    prefix="/api/v1/approvals", tags=["approvals"], responses=api_responses(404), route_class=JsonRoute
)

Viewer = Annotated[Ctx, Depends(require("approvals:read"))]
Approver = Annotated[Ctx, Depends(require("approvals:decide"))]


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
    return await service.list_approvals(
        db, ctx, status=status, run_id=run, cursor=cursor, limit=page_size(limit, settings)
    )


@router.get("/{approval_id}", response_model=ApprovalRead, summary="One approval")
async def get_approval(approval_id: uuid.UUID, ctx: Viewer, db: Db) -> ApprovalRead:
    return await service.get_approval(db, ctx, approval_id)


@router.post(
    "/{approval_id}/decision",
    response_model=ApprovalRead,
    summary="Approve (optionally with edited arguments) or reject, with a comment",
    responses=problem_responses(409),
)
async def decide(
    approval_id: uuid.UUID, body: Decision, ctx: Approver, db: Db, work: Work, settings: AppSettings
) -> ApprovalRead:
    """Exactly one decision wins; a later or concurrent one gets 409. Four-eyes (a tenant setting,
    on by default): whoever started the run cannot approve its requests (403)."""
    return await service.decide_approval(db, work, ctx, settings, approval_id, body)
