"""The runs page: the tenant's runs, filtered by what the URL says, newest first, a keyset page at a time."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated
from urllib.parse import urlencode

from fastapi import Query, Request, Response
from fastapi.responses import RedirectResponse

from app.auth.web import templates
from app.dashboard.common import SignedIn, page_router
from app.dashboard.run import Viewer
from app.db import Db
from app.errors import Invalid
from app.http import AppSettings
from app.pagination import Cursor, Limit, page_size
from app.runs import service as runs_service
from app.runs.schemas import RunSummary

RUN_STATUSES = ("queued", "running", "waiting", "paused", "succeeded", "failed", "cancelled")
router = page_router()


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



def _duration(run: RunSummary) -> str:
    if run.started_at is None or run.finished_at is None:
        return ""
    seconds = (run.finished_at - run.started_at).total_seconds()
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"

