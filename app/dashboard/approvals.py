"""The approvals inbox: pending approvals with their proposed actions, and the decision forms."""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.responses import RedirectResponse
from pydantic import ValidationError

from app.approvals import service as approvals_service
from app.approvals.schemas import ApprovalRead, Decision
from app.auth.deps import require
from app.auth.permissions import allowed
from app.auth.sessions import form_fields
from app.auth.web import templates
from app.context import Ctx
from app.dashboard.common import SignedIn, page_router
from app.db import Db
from app.errors import Invalid
from app.http import AppSettings
from app.pagination import Cursor, Limit, page_size
from app.request_work import Work
from app.tenants import service as tenants_service

router = page_router()
APPROVALS_READ, DECIDE = "approvals:read", "approvals:decide"
ApprovalViewer = Annotated[Ctx, Depends(require(APPROVALS_READ))]
Approver = Annotated[Ctx, Depends(require(DECIDE))]


@router.get("/approvals")
async def approvals_page(
    request: Request, ctx: ApprovalViewer, me: SignedIn, db: Db, settings: AppSettings, cursor: Cursor = None,
    limit: Limit = None,
) -> Response:
    """The inbox: pending approvals, newest first, each with its proposed action and the decision forms."""
    approvals = await approvals_service.list_approvals(
        db, ctx, status="pending", run_id=None, cursor=cursor, limit=page_size(limit, settings)
    )
    policy = await tenants_service.get_policy(db, ctx)
    may_decide = allowed(ctx.roles, DECIDE)

    def why_not(approval: ApprovalRead) -> str | None:
        if not may_decide:
            return f"needs the {DECIDE} permission"
        if policy.four_eyes and approval.requested_by == ctx.principal:
            return "four-eyes: you started this run, so someone else decides"
        return None

    return templates.TemplateResponse(request, "dashboard/approvals.html", {
        "me": me, "approvals": approvals.items, "next_cursor": approvals.next_cursor, "why_not": why_not,
    })


@router.post("/approvals/{approval_id}")
async def decide_approval(
    request: Request, approval_id: uuid.UUID, ctx: Approver, work: Work, db: Db, settings: AppSettings
) -> Response:
    """Approve (with edited arguments when the JSON field holds any) or reject (a comment is required)."""
    form = await form_fields(request)
    decision = _decision(form.get("decision", ""), form.get("comment", "").strip(), form.get("args", "").strip())
    await approvals_service.decide_approval(db, work, ctx, settings, approval_id, decision)
    return RedirectResponse("/approvals", status_code=303)


def _decision(decision: str, comment: str, args: str) -> Decision:
    if decision == "reject" and not comment:
        raise Invalid("a rejection needs a comment", errors=[{"pointer": "/form/comment", "message": "required"}])
    edited: Any = None
    if args and decision == "approve":
        try:
            edited = json.loads(args)
        except ValueError as exc:
            raise Invalid("the edited arguments are not JSON",
                          errors=[{"pointer": "/form/args", "message": str(exc)}]) from exc
    try:
        return Decision(decision=decision, comment=comment or None, args=edited)
    except ValidationError as exc:
        raise Invalid("not a decision", errors=[
            {"pointer": "/form/" + "/".join(str(part) for part in error["loc"]), "message": error["msg"]}
            for error in exc.errors()
        ]) from exc

