"""The audit page: the tenant's audit events searched by time window, actor, action and target (newest first,
keyset pages), the hash chain verified on request, and the API's own export for download."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import Depends, Query, Request, Response

from app.audit import service as audit_service
from app.audit.export import Filters, export_record, make_filters
from app.auth.deps import require
from app.auth.web import templates
from app.context import Ctx
from app.dashboard.common import SignedIn, error_page, page_router
from app.db import Db
from app.errors import Invalid
from app.http import AppSettings
from app.pagination import Cursor, Limit, page_size
from app.pg import driver

router = page_router()
Auditor = Annotated[Ctx, Depends(require("audit:read"))]
# The API's cursor kind: a page's cursor works in both.
PAGES = audit_service.PAGES
EXPORT = "/api/v1/audit/export"
FILTERS = ("since", "until", "actor", "action", "target")


def _when(value: str | None, field: str) -> datetime | None:
    if not value or not value.strip():
        return None
    try:
        return datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise Invalid(f"`{field}` is not a time", errors=[
            {"pointer": f"/query/{field}", "message": "a time like 2026-12-03T14:30 (UTC unless it has an offset)"},
        ]) from exc


def page_filters(
    since: Annotated[str | None, Query(max_length=40, description="at or after (ISO 8601; UTC)")] = None,
    until: Annotated[str | None, Query(max_length=40, description="before")] = None,
    actor: Annotated[str | None, Query(max_length=255)] = None,
    action: Annotated[str | None, Query(max_length=255)] = None,
    target: Annotated[str | None, Query(max_length=255)] = None,
) -> Filters:
    """The API's filters (``make_filters``), from a form that sends empty fields for those left blank."""
    return make_filters(_when(since, "since"), _when(until, "until"), (actor or "").strip() or None,
                        (action or "").strip() or None, (target or "").strip() or None)


PageFilters = Annotated[Filters, Depends(page_filters)]


def _query(filters: Filters) -> dict[str, str]:
    values: dict[str, Any] = {name: getattr(filters, name) for name in FILTERS}
    return {name: value.isoformat() if isinstance(value, datetime) else value
            for name, value in values.items() if value is not None}


def _form(filters: Filters) -> dict[str, str]:
    """What the search form shows: times as a datetime-local field takes them (UTC, to the second)."""
    shown = _query(filters)
    for name in ("since", "until"):
        value = getattr(filters, name)
        if value is not None:
            shown[name] = value.strftime("%Y-%m-%dT%H:%M:%S")
    return shown


@router.get("/audit")
async def audit_page(
    request: Request, ctx: Auditor, me: SignedIn, db: Db, settings: AppSettings, filters: PageFilters,
    cursor: Cursor = None, limit: Limit = None,
) -> Response:
    """Matching events, newest first, with the export of the same filters and the chain's verify button."""
    size = page_size(limit, settings)
    rows = await audit_service.list_events(
        await driver(db), ctx.tenant_id, filters, before=PAGES.decode(cursor), limit=size + 1
    )
    items, next_cursor = PAGES.page(rows, size, lambda r: (r["at"], r["id"]))
    query = _query(filters)
    return templates.TemplateResponse(request, "dashboard/audit.html", {
        "me": me, "events": [export_record(r) for r in items], "filters": _form(filters),
        "next_url": "/audit?" + urlencode({**query, "cursor": next_cursor}) if next_cursor else None,
        "downloads": {fmt: f"{EXPORT}?" + urlencode({"format": fmt, **query}) for fmt in ("jsonl", "csv")},
        "check": None,
    })


@router.post("/audit/verify")
async def verify_audit(request: Request, ctx: Auditor, me: SignedIn, settings: AppSettings) -> Response:
    """Verify the whole chain (the API's check): ok with the rows counted, or the first broken link and its row."""
    try:
        check = await audit_service.verify_tenant(settings, ctx.tenant_id)
    except audit_service.TooManyStreams as exc:
        return await error_page(request, exc)
    return templates.TemplateResponse(request, "dashboard/audit_verify.html", {"me": me, "check": check})

