"""Audit endpoints: export the tenant's log (JSONL or CSV), verify its hash chain, browse its events.

Exports and verifications read the whole chain, which may hold millions of rows, so they stream through a
server-side cursor on a **dedicated connection** rather than the request's session: FastAPI may close
that session before a streamed body is sent, and a long read must not hold one of the engine's pooled
connections either. The dedicated connection logs in as the application role with ``steward.tenant_id``
fixed in its startup packet, so row-level security confines it to the caller's tenant for its whole life
(every query filters on ``tenant_id`` as well). Each process holds at most ``MAX_STREAMS`` of them at once
(app/audit/service.py, shared with the dashboard); past that the API answers 429. The export runs in one
REPEATABLE READ transaction: a consistent snapshot, whose chain head is sent in the
``Steward-Audit-Head-Seq`` / ``-Hash`` response headers, and its rows not sealed yet (they come last,
with null ``seq``/``prev_hash``/``hash``) in ``Steward-Audit-Unsealed-Rows``,
``-Oldest-Unsealed-At`` and ``-Oldest-Unsealed-Age-S``.

The filters, the export formats and the snapshot are in app/audit/export.py (shared with the CLI).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.audit import service as audit_service
from app.audit.chain import format_at
from app.audit.export import (
    MEDIA_TYPES,
    ExportFormat,
    Filters,
    export_filename,
    export_record,
    make_filters,
    open_snapshot,
)
from app.audit.verify import Reason
from app.auth.deps import require
from app.context import Ctx
from app.db import Db
from app.http import AppSettings, JsonRoute, api_responses, problem_responses
from app.pagination import Cursor, Limit, page_size
from app.pg import Conn, driver

# The dedicated connections of exports and verifications, shared with the dashboard (app/audit/service.py).
_streams = audit_service.streams
PAGES = audit_service.PAGES

router = APIRouter(prefix="/api/v1/audit", tags=["audit"], responses=api_responses(), route_class=JsonRoute)

Auditor = Annotated[Ctx, Depends(require("audit:read"))]

# --- filters --------------------------------------------------------------------------------------------


def audit_filters(
    since: Annotated[datetime | None, Query(description="Events at or after this time (ISO 8601; UTC if no offset)")]
    = None,
    until: Annotated[datetime | None, Query(description="Events before this time")] = None,
    actor: Annotated[str | None, Query(max_length=255, description="Exact actor, e.g. `key:<id>`")] = None,
    action: Annotated[str | None, Query(max_length=255, description="Exact action, e.g. `run.start`")] = None,
    target: Annotated[str | None, Query(max_length=255, description="Exact target, e.g. `run:<id>`")] = None,
) -> Filters:
    return make_filters(since, until, actor, action, target)


Filtered = Annotated[Filters, Depends(audit_filters)]


class _ExportResponse(StreamingResponse):
    """Streams an export, then closes its connection however the response ends (a client that
    disconnects early included: Starlette does not close the body iterator itself)."""

    def __init__(self, chunks: AsyncGenerator[bytes, None], conn: Conn, **kwargs: Any) -> None:
        super().__init__(chunks, **kwargs)
        self._chunks, self._conn = chunks, conn

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._chunks.aclose()
            finally:
                await _streams.close(self._conn)


# --- routes ---------------------------------------------------------------------------------------------


class AuditEventRead(BaseModel):
    id: str
    tenant_id: str
    seq: int | None = Field(description="Position in the chain; null until the row is sealed")
    at: str = Field(description="UTC, `YYYY-MM-DDTHH:MM:SS.ffffffZ` (the chain's format)")
    actor: str
    ip: str | None
    user_agent: str | None
    action: str
    target: str | None
    outcome: str
    data: Any
    prev_hash: str | None
    hash: str | None


class AuditEventPage(BaseModel):
    items: list[AuditEventRead]
    next_cursor: str | None


class HeadRead(BaseModel):
    seq: int
    hash: str


class BrokenRead(BaseModel):
    seq: int = Field(description="Where the chain breaks (the first missing seq for missing rows)")
    id: str | None = Field(description="The row at `seq`; null when that row is missing")
    reason: Reason
    detail: str


class UnsealedRead(BaseModel):
    rows: int = Field(description="Rows committed but not sealed (chained) yet: nothing to check in them yet")
    oldest_at: str | None = Field(description="`at` of the oldest of them")
    oldest_age_s: float | None = Field(description="Seconds since then, at the verification")


class VerificationRead(BaseModel):
    ok: bool
    rows: int = Field(description="Sealed rows checked: the whole chain, or up to the first broken link")
    first_seq: int | None
    last_seq: int | None
    anchored_at_seq: int | None = Field(
        description="The chain starts here because retention deleted the rows before it (null: starts at 1)"
    )
    head: HeadRead | None = Field(description="The chain's head (last seq and hash): keep it elsewhere to detect "
                                              "a rewritten history later")
    broken: BrokenRead | None = Field(description="The first broken link; null when `ok`")
    unsealed: UnsealedRead = Field(description="Rows not sealed yet (sealed by the workers within a bound: "
                                               "docs/security.md)")


@router.get(
    "/export",
    response_class=StreamingResponse,
    summary="Export the tenant's audit log (JSONL or CSV), in chain order",
    responses={
        200: {
            "description": "Every matching event, streamed (sealed rows in chain order, then unsealed ones); "
                           "the head of the chain in the Steward-Audit-Head-* headers, the unsealed rows in "
                           "Steward-Audit-Unsealed-Rows, -Oldest-Unsealed-At and -Oldest-Unsealed-Age-S",
            "content": {"application/x-ndjson": {"schema": {"type": "string"}},
                        "text/csv": {"schema": {"type": "string"}}},
        },
        **problem_responses(429),
    },
)
async def export_audit(
    ctx: Auditor,
    settings: AppSettings,
    filters: Filtered,
    fmt: Annotated[ExportFormat, Query(alias="format", description="`jsonl` (default) or `csv`")] = "jsonl",
) -> StreamingResponse:
    """One JSON object per line (JSONL) or a CSV with a header row; `data` is compact JSON text in CSV.
    Sealed rows come first, in `seq` order; rows not sealed yet follow, with null `seq`/`prev_hash`/`hash`."""
    conn = await _streams.connect(settings, ctx.tenant_id)
    try:
        snapshot = await open_snapshot(conn, ctx.tenant_id, filters, fmt)
    except BaseException:
        await _streams.close(conn)
        raise
    filename = export_filename(snapshot.tenant_name or str(ctx.tenant_id), fmt, datetime.now(UTC))
    headers = {
        "Content-Disposition": f'attachment; filename="{filename}"',
        "Cache-Control": "no-store",
        "Steward-Audit-Head-Seq": str(snapshot.head_seq),
        "Steward-Audit-Head-Hash": snapshot.head_hash,
        "Steward-Audit-Unsealed-Rows": str(snapshot.unsealed.rows),
    }
    if snapshot.unsealed.oldest_at is not None:
        headers["Steward-Audit-Oldest-Unsealed-At"] = format_at(snapshot.unsealed.oldest_at)
        headers["Steward-Audit-Oldest-Unsealed-Age-S"] = f"{snapshot.unsealed.oldest_age_s or 0:.3f}"
    return _ExportResponse(snapshot.export.chunks(), conn, headers=headers, media_type=MEDIA_TYPES[fmt])


@router.get("/verify", response_model=VerificationRead, summary="Verify the tenant's audit hash chain",
            responses=problem_responses(429))
async def verify_audit(ctx: Auditor, settings: AppSettings) -> VerificationRead:
    """Recompute every hash and check every link, the sequence and the head. 200 either way: `ok` says."""
    check = await audit_service.verify_tenant(settings, ctx.tenant_id)
    return VerificationRead.model_validate(check.verification.as_dict())


@router.get("/events", response_model=AuditEventPage, summary="Audit events, newest first")
async def list_audit_events(
    ctx: Auditor, db: Db, settings: AppSettings, filters: Filtered, limit: Limit = None, cursor: Cursor = None
) -> AuditEventPage:
    """Newest first (by `at`, then `id`: rows not sealed yet have no `seq`), keyset-paginated: pass
    `next_cursor` back as `cursor` for the next (older) page."""
    size = page_size(limit, settings)
    rows = await audit_service.list_events(
        await driver(db), ctx.tenant_id, filters, before=PAGES.decode(cursor), limit=size + 1
    )
    items, next_cursor = PAGES.page(rows, size, lambda r: (r["at"], r["id"]))
    return AuditEventPage(items=[AuditEventRead(**export_record(r)) for r in items], next_cursor=next_cursor)
