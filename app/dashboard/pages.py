"""The dashboard's pages: server-rendered HTML over the same services and permissions as the REST API.

A page handler checks the caller like its API twin (the same ``require(permission)`` dependency, so the
browser and the API share one permission table), makes one service call and renders a template. Errors
render as pages, not problem+json: a signed-out visitor is sent to sign in and comes back, a missing
permission is a 403 page naming it, another tenant's run is the same 404 page as a run that never was.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse, StreamingResponse
from pydantic import ValidationError

from app.approvals import service as approvals_service
from app.approvals.schemas import ApprovalRead, Decision
from app.auth.deps import require
from app.auth.permissions import allowed
from app.auth.sessions import form_fields
from app.auth.web import Me, signed_in_user, templates
from app.budgets import service as budgets_service
from app.context import Ctx
from app.db import INT32_MAX, Db
from app.errors import AppError, Conflict, Forbidden, Invalid, NotFound, Unauthorized
from app.http import AppSettings, JsonRoute
from app.pagination import Cursor, Limit, keyset, page_size
from app.request_work import Work
from app.runs import service as runs_service
from app.runs.schemas import RunSummary
from app.runtime import AppRuntime
from app.tenants import service as tenants_service
from app.workflows import service as workflows_service

RUN_STATUSES = ("queued", "running", "waiting", "paused", "succeeded", "failed", "cancelled")
OPERATE = "runs:operate"
# Live updates: a comment line keeps idle streams open through proxies; changes closer together than
# COALESCE_S are sent as one.
KEEPALIVE_S = 15.0
COALESCE_S = 0.2


class PageRoute(JsonRoute):
    """Errors of a page render as pages (the input guard and size limits still answer first)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def page_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except Unauthorized:
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(f"/auth/login?next={quote(target, safe='')}", status_code=303)
            except (Forbidden, NotFound, Conflict, Invalid) as exc:
                return await error_page(request, exc)

        return page_handler


async def error_page(request: Request, exc: AppError) -> Response:
    return templates.TemplateResponse(
        request, "dashboard/error.html", {"me": await signed_in_user(request), "error": exc}, status_code=exc.status
    )


router = APIRouter(include_in_schema=False, route_class=PageRoute, default_response_class=HTMLResponse)
Viewer = Annotated[Ctx, Depends(require("runs:read"))]
Operator = Annotated[Ctx, Depends(require(OPERATE))]


async def _me(request: Request) -> Me:
    me = await signed_in_user(request)
    if me is None:  # a bearer token got past require(): pages are for browsers with a session
        raise Unauthorized("sign in to use the dashboard")
    return me


SignedIn = Annotated[Me, Depends(_me)]


@router.get("/")
async def home() -> Response:
    """The runs page (signed-out visitors are sent to sign in by the runs page itself)."""
    return RedirectResponse("/runs", status_code=303)


@router.get("/runs")
async def runs_page(
    request: Request,
    ctx: Viewer,
    me: SignedIn,
    db: Db,
    settings: AppSettings,
    status: Annotated[str | None, Query(max_length=20)] = None,
    workflow: Annotated[str | None, Query(max_length=200)] = None,
    since: Annotated[date | None, Query(description="created on or after this day (UTC)")] = None,
    until: Annotated[date | None, Query(description="created on or before this day (UTC)")] = None,
    run: Annotated[str | None, Query(max_length=64, description="go to this run")] = None,
    limit: Limit = None,
    cursor: Cursor = None,
) -> Response:
    if run:
        try:
            return RedirectResponse(f"/runs/{uuid.UUID(run.strip())}", status_code=303)
        except ValueError as exc:
            raise Invalid("not a run id", errors=[{"pointer": "/query/run", "message": "a run id is a UUID"}]) from exc
    status = status if status in RUN_STATUSES else None
    runs = await runs_service.list_runs(
        db, ctx, status=status, workflow=workflow or None,
        created_after=datetime.combine(since, time.min, UTC) if since else None,
        created_before=datetime.combine(until + timedelta(days=1), time.min, UTC) if until else None,
        cursor=cursor, limit=page_size(limit, settings),
    )
    filters = {"status": status or "", "workflow": workflow or "", "since": since.isoformat() if since else "",
               "until": until.isoformat() if until else ""}
    return templates.TemplateResponse(request, "dashboard/runs.html", {
        "me": me, "runs": runs.items, "next_cursor": runs.next_cursor, "filters": filters,
        "statuses": RUN_STATUSES, "duration": _duration,
        "next_url": "/runs?" + urlencode({**{k: v for k, v in filters.items() if v}, "cursor": runs.next_cursor})
        if runs.next_cursor else None,
    })


@router.get("/runs/{run_id}")
async def run_page(request: Request, run_id: uuid.UUID, ctx: Viewer, me: SignedIn, db: Db) -> Response:
    return templates.TemplateResponse(request, "dashboard/run.html", {"me": me, **await _run_view(db, ctx, run_id)})


@router.get("/runs/{run_id}/live")
async def run_live(request: Request, run_id: uuid.UUID, ctx: Viewer, me: SignedIn, db: Db) -> Response:
    """The changing part of a run's page, which the page polls (htmx) until the run has ended."""
    return templates.TemplateResponse(request, "dashboard/_run_live.html", {
        "me": me, **await _run_view(db, ctx, run_id),
    })


@router.get("/runs/{run_id}/stream")
async def run_stream(
    request: Request, run_id: uuid.UUID, ctx: Viewer, db: Db, runtime: AppRuntime
) -> StreamingResponse:
    """Server-Sent Events: ``changed`` whenever the run changes (Postgres NOTIFY, one listening connection
    per API process), coalesced; the page then fetches its live part. A reconnect carrying
    ``Last-Event-ID`` gets a ``changed`` at once, for whatever it missed meanwhile."""
    await runs_service.run_status(db, ctx, run_id)  # 404 for another tenant's run
    await db.close()  # the stream holds no database connection
    notifier = runtime.notifier
    if notifier is None:
        raise NotFound("live updates are served by API processes")
    resumed = request.headers.get("last-event-id") is not None

    async def events() -> AsyncIterator[str]:
        sequence = 0
        yield "retry: 2000\n\n"
        with notifier.watch(run_id) as changed:
            if resumed:
                changed.set()
            while True:
                try:
                    await asyncio.wait_for(changed.wait(), timeout=KEEPALIVE_S)
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                changed.clear()
                sequence += 1
                yield f"id: {sequence}\nevent: changed\ndata: {{}}\n\n"
                await asyncio.sleep(COALESCE_S)  # a burst of changes is one refresh

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


async def _run_view(db: Db, ctx: Ctx, run_id: uuid.UUID) -> dict[str, Any]:
    """What a run's page shows: the run, the controls the user has, and its budget meter (for those who
    may read budgets)."""
    run = await runs_service.get_run(db, ctx, run_id)
    meters: list[Meter] = []
    if allowed(ctx.roles, "budgets:read"):
        usage = (await budgets_service.usage(db, ctx, run=run_id))["run"]
        limits = usage["limits"] or {}
        meters = [
            Meter(label, float(used), float(limits[key]) if limits.get(key) is not None else None, unit)
            for label, key, used, unit in (
                ("Agent steps", "max_steps", usage["tool_calls"], ""),
                ("Tokens", "max_tokens", usage["tokens"], ""),
                ("Cost", "max_cost_usd", usage["cost_usd"], "USD"),
            )
        ]
    return {"run": run, "actions": _controls(run["status"], ctx.roles), "meters": meters}


@dataclass(frozen=True)
class Meter:
    label: str
    used: float
    limit: float | None  # None: no limit set
    unit: str


@router.get("/runs/{run_id}/steps/{step_id}/conversation")
async def conversation_page(
    request: Request,
    run_id: uuid.UUID,
    step_id: Annotated[str, Path(max_length=128)],
    ctx: Viewer,
    me: SignedIn,
    db: Db,
    settings: AppSettings,
    after: Annotated[int | None, Query(ge=-1, le=INT32_MAX)] = None,
) -> Response:
    """An ``llm``/``agent`` step's reasoning chain: every model turn (tokens, cost, latency) and tool result."""
    chain = await runs_service.list_conversation(
        db, ctx, run_id, step_id, after=after, limit=page_size(None, settings)
    )
    return templates.TemplateResponse(request, "dashboard/conversation.html", {
        "me": me, "run_id": run_id, "step_id": step_id, "entries": chain.items, "next_cursor": chain.next_cursor,
    })


@dataclass(frozen=True)
class Control:
    action: str
    why_not: str | None  # shown next to a disabled control


def _controls(status: str, roles: frozenset[str]) -> list[Control]:
    """Every operator action, enabled when the run's status and the user's roles allow it, else why not."""
    may_operate = allowed(roles, OPERATE)
    return [
        Control(action, None if may_operate and status in statuses
                else f"needs the {OPERATE} permission" if not may_operate else f"the run is {status}")
        for action, statuses in runs_service.ACTION_FROM.items()
    ]


_OPERATIONS = {
    "pause": runs_service.pause_run, "resume": runs_service.resume_run,
    "cancel": runs_service.cancel_run, "retry": runs_service.retry_run,
}


@router.post("/runs/{run_id}/{action}")
async def act_on_run(
    run_id: uuid.UUID, action: str, ctx: Operator, work: Work, db: Db, settings: AppSettings
) -> Response:
    """A form's operator action: the same service call (and audit event) as the API's, then the run."""
    operation = _OPERATIONS.get(action)
    if operation is None:
        raise NotFound(f"no action {action!r}: one of {', '.join(_OPERATIONS)}")
    await operation(db, work, ctx, settings, run_id)
    return RedirectResponse(f"/runs/{run_id}", status_code=303)


def _duration(run: RunSummary) -> str:
    if run.started_at is None or run.finished_at is None:
        return ""
    seconds = (run.finished_at - run.started_at).total_seconds()
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


# --- approvals ---------------------------------------------------------------------------------------

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


# --- workflows ---------------------------------------------------------------------------------------

WorkflowViewer = Annotated[Ctx, Depends(require("workflows:read"))]
WORKFLOW_PAGES = keyset("workflows", str)
VERSION_PAGES = keyset("workflow-versions", int)


@router.get("/workflows")
async def workflows_page(
    request: Request, ctx: WorkflowViewer, me: SignedIn, db: Db, settings: AppSettings, cursor: Cursor = None,
) -> Response:
    """The tenant's workflows by name, with their latest version."""
    rows, more = await workflows_service.list_workflows(
        db, ctx, limit=page_size(None, settings), after=WORKFLOW_PAGES.after(cursor)
    )
    next_cursor = WORKFLOW_PAGES.encode(rows[-1].name) if more and rows else None
    return templates.TemplateResponse(request, "dashboard/workflows.html", {
        "me": me, "workflows": rows, "next_cursor": next_cursor,
    })


@router.get("/workflows/{name}")
async def workflow_page(
    request: Request,
    name: Annotated[str, Path(max_length=200)],
    ctx: WorkflowViewer,
    me: SignedIn,
    db: Db,
    settings: AppSettings,
    version: Annotated[int | None, Query(ge=1, le=INT32_MAX)] = None,
) -> Response:
    """One version of a workflow (the latest by default): its definition, and the other versions."""
    shown = await workflows_service.get_workflow_version(db, ctx, name, version)
    versions, _ = await workflows_service.list_workflow_versions(db, ctx, name, limit=page_size(None, settings))
    return templates.TemplateResponse(request, "dashboard/workflow.html", {
        "me": me, "name": name, "shown": shown, "versions": versions,
    })
