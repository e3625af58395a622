"""The runs page: the tenant's runs, filtered by what the URL says, newest first, a keyset page at a time,
with each run's usage against its limits and pending approvals; its first page follows the tenant's runs
live; operators act on many runs at once."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode

from fastapi import Query, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse

from app.auth.permissions import allowed
from app.auth.web import templates
from app.dashboard.common import SignedIn, page_router
from app.dashboard.live import change_stream
from app.dashboard.run import OPERATE, Operator, Viewer
from app.db import Db
from app.errors import Invalid, NotFound
from app.http import AppSettings
from app.pagination import Cursor, Limit, page_size
from app.runs import service as runs_service
from app.runs.schemas import RunListItem
from app.runtime import AppRuntime

RUN_STATUSES = runs_service.RUN_STATUSES
# Status reasons are free text to the filter (a reason added later needs no release of this page), but
# short and plain: anything else is a 422, as is any other filter value of the wrong shape.
REASON = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
# The id of the list's live part: an htmx request for it gets the part alone.
LIVE_ID = "runs-live"
# A busy tenant's runs change many times a second: an open list fetches its page at most once a second.
LIST_COALESCE_S = 1.0
router = page_router()


@router.get("/")
async def home() -> Response:
    """The runs page (signed-out visitors are sent to sign in by the runs page itself)."""
    return RedirectResponse("/runs", status_code=303)


@dataclass(frozen=True)
class ListQuery:
    """The list's filters as the URL gives them, for the service, the form and the next page's link."""

    status: str | None
    workflow: str | None
    reason: str | None
    awaiting: bool
    since: date | None
    until: date | None

    def filters(self) -> runs_service.RunFilters:
        return runs_service.RunFilters(
            status=self.status, workflow=self.workflow, reason=self.reason, awaiting_approval=self.awaiting,
            created_after=datetime.combine(self.since, time.min, UTC) if self.since else None,
            created_before=datetime.combine(self.until + timedelta(days=1), time.min, UTC) if self.until else None,
        )

    def params(self) -> dict[str, str]:
        """The filters that are set, as URL parameters."""
        values = {"status": self.status, "workflow": self.workflow, "reason": self.reason,
                  "approval": "pending" if self.awaiting else None,
                  "since": self.since.isoformat() if self.since else None,
                  "until": self.until.isoformat() if self.until else None}
        return {key: value for key, value in values.items() if value}


def _query(
    status: str | None, workflow: str | None, reason: str | None, approval: str | None,
    since: date | None, until: date | None,
) -> ListQuery:
    if status and status not in RUN_STATUSES:
        raise Invalid(f"no run status {status!r}", errors=[
            {"pointer": "/query/status", "message": f"one of {', '.join(RUN_STATUSES)}"}])
    if approval and approval != "pending":
        raise Invalid("approval filters by pending approvals only", errors=[
            {"pointer": "/query/approval", "message": "pending, or leave it out"}])
    reason = (reason or "").strip()
    if reason and not REASON.fullmatch(reason):
        raise Invalid("not a status reason", errors=[
            {"pointer": "/query/reason", "message": "up to 64 letters, digits and _ . : -"}])
    if workflow is not None and len(workflow) > 128:
        raise Invalid("workflow names are at most 128 characters", errors=[
            {"pointer": "/query/workflow", "message": "at most 128 characters"}])
    if since and until and since > until:
        raise Invalid("the time window ends before it starts", errors=[
            {"pointer": "/query/until", "message": "on or after the From day"}])
    return ListQuery(status or None, (workflow or "").strip() or None, reason or None,
                  approval == "pending", since, until)


@router.get("/runs")
async def runs_page(
    request: Request,
    ctx: Viewer,
    me: SignedIn,
    db: Db,
    settings: AppSettings,
    status: Annotated[str | None, Query(max_length=20)] = None,
    workflow: Annotated[str | None, Query(max_length=128)] = None,
    reason: Annotated[str | None, Query(max_length=64, description="why paused or failed")] = None,
    approval: Annotated[str | None, Query(max_length=16, description="pending: runs waiting for approval")] = None,
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
    query = _query(status, workflow, reason, approval, since, until)
    f = query.filters()
    runs = await runs_service.list_runs(
        db, ctx, status=f.status, workflow=f.workflow, created_after=f.created_after,
        created_before=f.created_before, reason=f.reason, awaiting_approval=f.awaiting_approval,
        cursor=cursor, limit=page_size(limit, settings),
    )
    params = query.params()
    view = {
        "me": me, "runs": runs.items, "filters": params, "statuses": RUN_STATUSES,
        "reasons": runs_service.STATUS_REASONS, "actions": tuple(runs_service.OPERATIONS),
        "may_operate": allowed(ctx.roles, OPERATE), "bulk_max": runs_service.BULK_MAX,
        "duration": _duration, "usage": _usage,
        # Only the first page follows the tenant's runs: a later page would shift under the reader.
        "live_url": None if cursor else "/runs?" + urlencode({**params, **({"limit": str(limit)} if limit else {})}),
        "next_url": "/runs?" + urlencode({**params, "cursor": runs.next_cursor}) if runs.next_cursor else None,
    }
    live_only = request.headers.get("hx-request") == "true" and request.headers.get("hx-target") == LIVE_ID
    return templates.TemplateResponse(request, "dashboard/_runs_live.html" if live_only else "dashboard/runs.html",
                                      view)


@router.get("/runs/stream")
async def runs_stream(request: Request, ctx: Viewer, db: Db, runtime: AppRuntime) -> StreamingResponse:
    """Server-Sent Events: ``changed`` whenever one of the tenant's runs changes (one notification per
    tenant and transaction, fanned out by the process's one listening connection), coalesced; the page
    then fetches its first page again."""
    await db.close()  # the stream holds no database connection
    if runtime.notifier is None:
        raise NotFound("live updates are served by API processes")
    return change_stream(request, runtime.notifier.watch_tenant(ctx.tenant_id), LIST_COALESCE_S)


@router.post("/runs/bulk")
async def bulk_action(
    request: Request, ctx: Operator, me: SignedIn, db: Db, settings: AppSettings, runtime: AppRuntime
) -> Response:
    """Pause, resume, cancel or retry the selected runs, or every run matching the list's filters: each
    through the single-run service call (same audit event), each run answered on its own row."""
    try:
        fields = parse_qsl((await request.body()).decode("utf-8", errors="replace"), keep_blank_values=True,
                           max_num_fields=2 * runs_service.BULK_MAX)
    except ValueError as exc:
        raise Invalid("too many form fields", errors=[
            {"pointer": "/form/run", "message": f"at most {runs_service.BULK_MAX} runs"}]) from exc
    action = next((value for key, value in fields if key == "action"), "")
    scope = next((value for key, value in fields if key == "scope"), "selected")
    targets: list[uuid.UUID] | runs_service.RunFilters
    if scope == "matching":
        given = {key: value for key, value in fields if key in ("status", "workflow", "reason", "approval",
                                                                   "since", "until")}
        targets = _query(given.get("status"), given.get("workflow"), given.get("reason"), given.get("approval"),
                         _day(given, "since"), _day(given, "until")).filters()
    else:
        targets = _run_ids([value for key, value in fields if key == "run"])
    outcomes = await runs_service.act_on_runs(db, ctx, settings, action, targets, after_commit=runtime.after_commit)
    fragment = request.headers.get("hx-request") == "true"
    return templates.TemplateResponse(request, "dashboard/_runs_bulk.html" if fragment else "dashboard/runs_bulk.html",
                                      {"me": me, "action": action, "outcomes": outcomes})


def _run_ids(values: list[str]) -> list[uuid.UUID]:
    if not values:
        raise Invalid("no runs selected", errors=[{"pointer": "/form/run", "message": "select at least one run"}])
    if len(values) > runs_service.BULK_MAX:
        raise Invalid(f"{len(values)} runs selected: a bulk action takes at most {runs_service.BULK_MAX}",
                      errors=[{"pointer": "/form/run", "message": f"at most {runs_service.BULK_MAX} runs"}])
    try:
        return [uuid.UUID(value) for value in values]
    except ValueError as exc:
        raise Invalid("not a run id", errors=[{"pointer": "/form/run", "message": "a run id is a UUID"}]) from exc


def _day(fields: dict[str, str], key: str) -> date | None:
    if not fields.get(key):
        return None
    try:
        return date.fromisoformat(fields[key])
    except ValueError as exc:
        raise Invalid("not a day", errors=[{"pointer": f"/form/{key}", "message": "a day, YYYY-MM-DD"}]) from exc


def _duration(run: RunListItem) -> str:
    if run.started_at is None or run.finished_at is None:
        return ""
    seconds = (run.finished_at - run.started_at).total_seconds()
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


@dataclass(frozen=True)
class Usage:
    used: float
    limit: float | None  # None: no limit set
    text: str  # "1200 of 100000"


def _usage(run: RunListItem) -> dict[str, Usage]:
    """Tokens and cost against the run's limits (empty when the caller may not read budgets)."""
    if run.usage is None:
        return {}
    limits: dict[str, Any] = run.usage.limits
    out = {}
    for name, used, key, unit in (("tokens", float(run.usage.tokens), "max_tokens", ""),
                                  ("cost", float(run.usage.cost_usd), "max_cost_usd", "$")):
        limit = float(limits[key]) if limits.get(key) is not None else None
        shown = f"{unit}{used:g}" + (f" of {unit}{limit:g}" if limit is not None else "")
        out[name] = Usage(used, limit, shown)
    return out
