"""A run's page: its facts, the operator actions, the budget meter, steps and events, live while it runs;
and an ``llm``/``agent`` step's reasoning chain."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Path, Query, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse

from app.auth.deps import require
from app.auth.permissions import allowed
from app.auth.web import templates
from app.budgets import service as budgets_service
from app.context import Ctx
from app.dashboard.common import SignedIn, page_router
from app.dashboard.live import change_stream
from app.db import INT32_MAX, Db
from app.errors import NotFound
from app.http import AppSettings
from app.pagination import page_size
from app.request_work import Work
from app.runs import service as runs_service
from app.runtime import AppRuntime

OPERATE = "runs:operate"
router = page_router()
Viewer = Annotated[Ctx, Depends(require("runs:read"))]
Operator = Annotated[Ctx, Depends(require(OPERATE))]


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
    return change_stream(request, notifier.watch(run_id))


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

