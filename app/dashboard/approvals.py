"""The approvals inbox: pending approvals with their proposed actions and context, the decision forms, the
edited-arguments check, and the page that tells a decision it lost the race."""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.responses import RedirectResponse
from pydantic import ValidationError

from app.approvals import service as approvals_service
from app.approvals.errors import AlreadyDecided
from app.approvals.schemas import Decision
from app.auth.deps import require
from app.auth.sessions import form_fields
from app.auth.web import templates
from app.context import Ctx
from app.dashboard.common import SignedIn, page_router
from app.db import Db
from app.errors import Invalid
from app.http import AppSettings
from app.pagination import Cursor, Limit, page_size
from app.request_work import Work
from app.textdiff import diffable_json

router = page_router()
APPROVALS_READ, DECIDE = "approvals:read", approvals_service.DECIDE
ApprovalViewer = Annotated[Ctx, Depends(require(APPROVALS_READ))]
Approver = Annotated[Ctx, Depends(require(DECIDE))]
# The editor's limit (the request body limit is larger): a tool's arguments are small documents.
ARGS_MAX_CHARS = 65536
COMMENT_MAX_CHARS = 2000


@router.get("/approvals")
async def approvals_page(
    request: Request, ctx: ApprovalViewer, me: SignedIn, db: Db, settings: AppSettings, cursor: Cursor = None,
    limit: Limit = None,
) -> Response:
    """The inbox: pending approvals the user may decide first, each group soonest to expire first."""
    inbox = await approvals_service.inbox(db, ctx, cursor=cursor, limit=page_size(limit, settings))
    return templates.TemplateResponse(request, "dashboard/approvals.html", {
        "me": me, "items": inbox.items, "next_cursor": inbox.next_cursor, "as_json": diffable_json,
        "args_max": ARGS_MAX_CHARS, "comment_max": COMMENT_MAX_CHARS, "limit": limit,
    })


@router.post("/approvals/{approval_id}")
async def decide_approval(
    request: Request, approval_id: uuid.UUID, ctx: Approver, me: SignedIn, work: Work, db: Db,
    settings: AppSettings,
) -> Response:
    """Approve (the arguments in the editor: edited, or as proposed) or reject (a comment is required).
    A decision that lost the race is a 409 page naming who decided first, and when."""
    form = await form_fields(request)
    decision = _decision(form.get("decision", ""), form.get("comment", "").strip(), form.get("args", "").strip())
    try:
        await approvals_service.decide_approval(db, work, ctx, settings, approval_id, decision)
    except AlreadyDecided as lost:
        return templates.TemplateResponse(request, "dashboard/approval_conflict.html", {
            "me": me, "error": lost, "approval_id": approval_id, **lost.extra,
        }, status_code=lost.status)
    return RedirectResponse("/approvals", status_code=303)


@router.post("/approvals/{approval_id}/check")
async def check_arguments(request: Request, approval_id: uuid.UUID, ctx: Approver, db: Db) -> Response:
    """The editor's check, before anything is submitted (htmx): the edited arguments against the tool
    version's input schema, errors at their JSON pointers, and the diff against the proposed arguments."""
    text = (await form_fields(request)).get("args", "")
    context: dict[str, Any] = {"approval_id": approval_id, "check": None, "not_json": None}
    try:
        args = _arguments(text)
    except Invalid as exc:
        context["not_json"] = exc.errors[0]["message"] if exc.errors else exc.detail
    else:
        context["check"] = await approvals_service.check_args(db, ctx, approval_id, args)
    return templates.TemplateResponse(request, "dashboard/_args_check.html", context)


def _arguments(text: str) -> Any:
    if len(text) > ARGS_MAX_CHARS:
        raise Invalid("the edited arguments are too long", errors=[
            {"pointer": "/form/args", "message": f"at most {ARGS_MAX_CHARS} characters"}])
    try:
        return json.loads(text)
    except ValueError as exc:
        raise Invalid("the edited arguments are not JSON",
                      errors=[{"pointer": "/form/args", "message": f"not JSON: {exc}"}]) from exc


def _decision(decision: str, comment: str, args: str) -> Decision:
    if decision == "reject" and not comment:
        raise Invalid("a rejection needs a comment", errors=[{"pointer": "/form/comment", "message": "required"}])
    if len(comment) > COMMENT_MAX_CHARS:
        raise Invalid("the comment is too long", errors=[
            {"pointer": "/form/comment", "message": f"at most {COMMENT_MAX_CHARS} characters"}])
    edited = _arguments(args) if args and decision == "approve" else None
    try:
        return Decision(decision=decision, comment=comment or None, args=edited)
    except ValidationError as exc:
        raise Invalid("not a decision", errors=[
            {"pointer": "/form/" + "/".join(str(part) for part in error["loc"]), "message": error["msg"]}
            for error in exc.errors()
        ]) from exc
