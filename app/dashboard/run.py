"""A run's page: its facts and operator actions above tabs (step graph, timeline, steps with paged map
items, filtered and paged events, reasoning, budget), live while it runs; and an ``llm``/``agent`` step's
reasoning chain. The forms (signal, start again, raise limits) are in :mod:`app.dashboard.run_forms`."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, Path, Query, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse

from app.auth.deps import require
from app.auth.permissions import allowed
from app.auth.web import templates
from app.budgets import service as budgets_service
from app.context import Ctx
from app.dashboard.common import SignedIn, page_router
from app.dashboard.graph import StepState, layout
from app.dashboard.live import change_stream
from app.dashboard.timeline import timeline
from app.db import INT32_MAX, INT64_MAX, Db
from app.errors import Invalid, NotFound
from app.http import AppSettings
from app.pagination import page_size
from app.request_work import Work
from app.runs import service as runs_service
from app.runtime import AppRuntime

OPERATE = "runs:operate"
START = "runs:start"
BUDGETS = "budgets:write"
router = page_router()
Viewer = Annotated[Ctx, Depends(require("runs:read"))]
Operator = Annotated[Ctx, Depends(require(OPERATE))]


TABS = {"graph": "Graph", "timeline": "Timeline", "steps": "Steps", "events": "Events",
        "reasoning": "Reasoning", "budget": "Budget"}
PAGE = 50  # map items and events a page
# Taken as text and checked here, so a bad value is the dashboard's 422 page rather than problem+json.
Text = Annotated[str | None, Query(max_length=1024)]


@dataclass(frozen=True)
class View:
    """What the page's query asks for: a tab, and that tab's page of events or map items."""

    tab: str = "graph"
    after: int | None = None  # events after this id
    type: str | None = None
    step: str | None = None
    items: str | None = None  # the map step whose items are paged
    items_after: int | None = None


def _view(tab: Text = None, after: Text = None, type: Text = None, step: Text = None, items: Text = None,
          items_after: Text = None) -> View:
    tab = tab or "graph"
    if tab not in TABS:
        raise Invalid("no such tab", errors=[{"pointer": "/query/tab", "message": f"one of {', '.join(TABS)}"}])
    for field, value in (("type", type), ("step", step), ("items", items)):
        if value is not None and len(value) > 128:
            raise Invalid(f"{field} is too long", errors=[{"pointer": f"/query/{field}", "message": "at most 128"}])
    return View(tab, _position(after, "after"), type or None, step or None, items or None,
                _position(items_after, "items_after"))


def _position(value: str | None, field: str) -> int | None:
    """A keyset position: an integer from -1 (before the first) to the largest id."""
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        number = -2
    if not -1 <= number <= INT64_MAX:
        raise Invalid(f"{field} is not a position", errors=[
            {"pointer": f"/query/{field}", "message": f"an integer from -1 to {INT64_MAX}"}])
    return number


Shown = Annotated[View, Depends(_view)]


@router.get("/runs/{run_id}")
async def run_page(
    request: Request, run_id: uuid.UUID, ctx: Viewer, me: SignedIn, db: Db, view: Shown, settings: AppSettings
) -> Response:
    return templates.TemplateResponse(request, "dashboard/run.html", {
        "me": me, "trace_url": settings.trace_url, **await _run_view(db, ctx, run_id, view),
    })


@router.get("/runs/{run_id}/live")
async def run_live(
    request: Request, run_id: uuid.UUID, ctx: Viewer, me: SignedIn, db: Db, view: Shown, settings: AppSettings
) -> Response:
    """The changing part of a run's page, which the page polls (htmx) until the run has ended."""
    return templates.TemplateResponse(request, "dashboard/_run_live.html", {
        "me": me, "trace_url": settings.trace_url, **await _run_view(db, ctx, run_id, view),
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


async def _run_view(db: Db, ctx: Ctx, run_id: uuid.UUID, view: View) -> dict[str, Any]:
    """What a run's page shows: the run, the controls the user has, and the tab asked for (the budget tab
    for those who may read budgets)."""
    events = runs_service.EventQuery(view.after, view.type, view.step) if view.tab == "events" else None
    detail = await runs_service.get_run_detail(db, ctx, run_id, limit=PAGE, items_step=view.items,
                                               items_after=view.items_after, events=events)
    run = detail.run
    meters: list[Meter] = []
    limits: dict[str, Any] = {}
    if view.tab == "budget" and allowed(ctx.roles, "budgets:read"):
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
    states = {
        step["id"]: StepState(step["status"], *(
            (sum(item["status"] == "succeeded" for item in step["items"]), len(step["items"]))
            if step["items"] is not None else (None, None)))
        for step in run["steps"]
    }
    return {
        "run": run, "view": view, "tabs": TABS, "detail": detail,
        "actions": _controls(run["status"], ctx.roles), "forms": _forms(run, detail.signals, ctx.roles),
        "meters": meters, "limits": limits,
        "graph": layout(detail.definition, states) if view.tab == "graph" else None,
        "timeline": timeline(run, datetime.now(UTC)) if view.tab == "timeline" else None,
    }


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


def _forms(run: dict[str, Any], signals: tuple[str, ...], roles: frozenset[str]) -> dict[str, Control]:
    """The run's forms (signal, start again, raise limits), each enabled or with why not."""
    status, reason = run["status"], run["status_reason"]
    may_start, may_budget = allowed(roles, START), allowed(roles, BUDGETS)
    return {
        "signal": Control("signal", f"needs the {START} permission" if not may_start
                          else None if signals else "the run waits for no signal"),
        "again": Control("again", None if may_start else f"needs the {START} permission"),
        "limits": Control("limits", f"needs the {BUDGETS} permission" if not may_budget
                          else f"the run is {status}, not paused" if status != "paused"
                          else None if reason in budgets_service.PAUSED_ON_BUDGET
                          else "the run was paused by an operator, not by a budget: resume it"),
    }


def _controls(status: str, roles: frozenset[str]) -> list[Control]:
    """Every operator action, enabled when the run's status and the user's roles allow it, else why not."""
    may_operate = allowed(roles, OPERATE)
    return [
        Control(action, None if may_operate and status in statuses
                else f"needs the {OPERATE} permission" if not may_operate else f"the run is {status}")
        for action, statuses in runs_service.ACTION_FROM.items()
    ]


@router.post("/runs/{run_id}/{action}")
async def act_on_run(
    run_id: uuid.UUID, action: str, ctx: Operator, work: Work, db: Db, settings: AppSettings
) -> Response:
    """A form's operator action: the same service call (and audit event) as the API's, then the run."""
    operation = runs_service.OPERATIONS.get(action)
    if operation is None:
        raise NotFound(f"no action {action!r}: one of {', '.join(runs_service.OPERATIONS)}")
    await operation(db, work, ctx, settings, run_id)
    return RedirectResponse(f"/runs/{run_id}", status_code=303)

