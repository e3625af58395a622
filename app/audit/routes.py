"""Audit endpoints: export the tenant's log (JSONL or CSV), verify its hash chain, browse its events.

Exports and verifications read the whole chain, which may hold millions of rows, so they stream through a
server-side cursor on a **dedicated connection** rather than the request's session: FastAPI may close
that session before a streamed body is sent, and a long read must not hold one of the engine's pooled
connections either. The dedicated connection logs in as the application role with ``steward.tenant_id``
fixed in its startup packet, so row-level security confines it to the caller's tenant for its whole life
(every query filters on ``tenant_id`` as well). Each process holds at most :data:`MAX_STREAMS` of them at
once; past that the API answers 429. The export runs in one REPEATABLE READ transaction: a consistent
snapshot, whose chain head is sent in the ``Steward-Audit-Head-Seq`` / ``-Hash`` response headers.

Export columns are those of the chain (docs/security.md, "Audit log"): ids as strings, ``at`` in the chain's
format, so every line can be re-hashed with :func:`app.audit.chain.row_hash`. The CLI (app/audit/cli.py)
writes the same bytes through :func:`open_export`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import AsyncGenerator, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.audit.chain import format_at
from app.audit.verify import Reason, verify_chain
from app.auth.deps import require
from app.config import Settings
from app.context import Ctx
from app.db import Db
from app.engine.notify import asyncpg_dsn
from app.errors import AppError, Invalid
from app.http import AppSettings, JsonRoute, api_responses, problem_responses
from app.pagination import Cursor, Limit, keyset, page_size
from app.pg import Conn, driver, setup_connection

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1/audit", tags=["audit"], responses=api_responses(), route_class=JsonRoute)
PAGES = keyset("audit", int)

Auditor = Annotated[Ctx, Depends(require("audit:read"))]
ExportFormat = Literal["jsonl", "csv"]

# Exports and verifications running at once in this process (each holds a database connection).
MAX_STREAMS = 4
# Rows per cursor fetch, and per chunk of a streamed export.
BATCH = 500
CONNECT_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 5.0
# A client that stops reading for this long loses its export (the snapshot would hold back vacuum).
IDLE_IN_TRANSACTION_MS = 300_000

COLUMNS = ("id", "tenant_id", "seq", "at", "actor", "ip", "user_agent", "action", "target", "outcome", "data",
           "prev_hash", "hash")
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM audit_event"
_HEAD = "SELECT seq, hash FROM audit_head WHERE tenant_id = $1"
_MEDIA_TYPES: dict[str, str] = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}


# --- filters --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Filters:
    """Which events: ``since <= at < until``, and exact ``actor`` / ``action`` / ``target``."""

    since: datetime | None = None
    until: datetime | None = None
    actor: str | None = None
    action: str | None = None
    target: str | None = None

    def sql(self, tenant_id: uuid.UUID) -> tuple[str, list[Any]]:
        """The WHERE clause (``$1`` is the tenant) and its arguments."""
        clauses = ["tenant_id = $1"]
        args: list[Any] = [tenant_id]
        for column, op, value in (("at", ">=", self.since), ("at", "<", self.until), ("actor", "=", self.actor),
                                  ("action", "=", self.action), ("target", "=", self.target)):
            if value is not None:
                args.append(value)
                clauses.append(f"{column} {op} ${len(args)}")
        return " AND ".join(clauses), args


def utc(at: datetime | None) -> datetime | None:
    """Times without an offset are taken as UTC."""
    return at.replace(tzinfo=UTC) if at is not None and at.tzinfo is None else at


def make_filters(since: datetime | None, until: datetime | None, actor: str | None = None,
                 action: str | None = None, target: str | None = None) -> Filters:
    since, until = utc(since), utc(until)
    if since is not None and until is not None and since > until:
        raise Invalid("`since` is after `until`",
                      errors=[{"pointer": "/query/since", "message": "must not be after `until`"}])
    return Filters(since, until, actor or None, action or None, target or None)


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


# --- export formats -------------------------------------------------------------------------------------


def export_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row as exported: every column, ids as strings, ``at`` in the chain's format."""
    return {
        "id": str(row["id"]), "tenant_id": str(row["tenant_id"]), "seq": row["seq"], "at": format_at(row["at"]),
        "actor": row["actor"], "ip": row["ip"], "user_agent": row["user_agent"], "action": row["action"],
        "target": row["target"], "outcome": row["outcome"], "data": row["data"], "prev_hash": row["prev_hash"],
        "hash": row["hash"],
    }


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def jsonl_line(row: Mapping[str, Any]) -> str:
    return _compact(export_record(row)) + "\n"


def csv_line(values: Iterable[str | None]) -> str:
    """RFC 4180, every value quoted; an empty unquoted field is a null (so null and "" stay apart)."""
    return ",".join("" if v is None else '"' + v.replace('"', '""') + '"' for v in values) + "\r\n"


def csv_row(row: Mapping[str, Any]) -> str:
    record = export_record(row)
    record["seq"] = str(record["seq"])
    record["data"] = _compact(record["data"])
    return csv_line(record[c] for c in COLUMNS)


class Export:
    """One export from an open cursor, as encoded chunks of :data:`BATCH` rows; ``rows`` counts those sent."""

    def __init__(self, cursor: Any, fmt: ExportFormat) -> None:
        self.cursor = cursor
        self.fmt = fmt
        self.rows = 0

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        if self.fmt == "csv":
            yield csv_line(COLUMNS).encode()
        line = jsonl_line if self.fmt == "jsonl" else csv_row
        while batch := await self.cursor.fetch(BATCH):
            self.rows += len(batch)
            yield "".join(map(line, batch)).encode()


async def open_export(conn: Conn, tenant_id: uuid.UUID, filters: Filters, fmt: ExportFormat) -> Export:
    """Open the export's cursor, in seq order; ``conn`` must be in a transaction (REPEATABLE READ for a
    snapshot consistent with the head)."""
    where, args = filters.sql(tenant_id)
    cursor = await conn.cursor(f"{_SELECT} WHERE {where} ORDER BY seq", *args)
    return Export(cursor, fmt)


def export_filename(tenant: str, fmt: ExportFormat, at: datetime) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", tenant).strip("-.") or "tenant"
    return f"audit-{safe}-{at.astimezone(UTC).strftime('%Y%m%dT%H%M%SZ')}.{fmt}"


# --- dedicated connections ------------------------------------------------------------------------------


class TooManyStreams(AppError):
    status = 429
    type = "too-many-audit-streams"
    title = "Too many requests"
    headers = {"Retry-After": "10"}


class _Streams:
    """The dedicated connections of running exports and verifications in this process (at most ``limit``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0

    async def connect(self, settings: Settings, tenant_id: uuid.UUID) -> Conn:
        """A connection confined to the tenant (application role, tenant set at login); 429 when full."""
        if self.open >= self.limit:
            raise TooManyStreams(f"{self.limit} audit exports or verifications are already running here; retry later")
        assert settings.database_url is not None
        server_settings = {"application_name": "steward-audit", "steward.tenant_id": str(tenant_id),
                           "idle_in_transaction_session_timeout": str(IDLE_IN_TRANSACTION_MS)}
        if settings.db_app_role:
            server_settings["role"] = settings.db_app_role
        self.open += 1
        try:
            conn: Conn = await asyncpg.connect(asyncpg_dsn(settings.database_url), timeout=CONNECT_TIMEOUT_S,
                                               server_settings=server_settings)
        except BaseException:
            self.open -= 1
            raise
        try:
            await setup_connection(conn)
        except BaseException:
            await self.close(conn)
            raise
        return conn

    async def close(self, conn: Conn) -> None:
        self.open -= 1
        try:
            await conn.close(timeout=CLOSE_TIMEOUT_S)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("audit: could not close a stream's connection cleanly (%r); terminating it", exc)
            conn.terminate()
        except asyncio.CancelledError:
            conn.terminate()
            raise


_streams = _Streams(MAX_STREAMS)


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
    seq: int
    at: str = Field(description="UTC, `YYYY-MM-DDTHH:MM:SS.ffffffZ` (the chain's format)")
    actor: str
    ip: str | None
    user_agent: str | None
    action: str
    target: str | None
    outcome: str
    data: Any
    prev_hash: str
    hash: str


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


class VerificationRead(BaseModel):
    ok: bool
    rows: int = Field(description="Rows checked: the whole chain, or up to the first broken link")
    first_seq: int | None
    last_seq: int | None
    anchored_at_seq: int | None = Field(
        description="The chain starts here because retention deleted the rows before it (null: starts at 1)"
    )
    head: HeadRead | None = Field(description="The chain's head (last seq and hash): keep it elsewhere to detect "
                                              "a rewritten history later")
    broken: BrokenRead | None = Field(description="The first broken link; null when `ok`")


@router.get(
    "/export",
    response_class=StreamingResponse,
    summary="Export the tenant's audit log (JSONL or CSV), in chain order",
    responses={
        200: {
            "description": "Every matching event, streamed; the head of the chain in the Steward-Audit-Head-* "
                           "headers",
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
    """One JSON object per line (JSONL) or a CSV with a header row; `data` is compact JSON text in CSV."""
    conn = await _streams.connect(settings, ctx.tenant_id)
    try:
        await conn.transaction(isolation="repeatable_read", readonly=True).start()
        name = await conn.fetchval("SELECT name FROM tenant WHERE id = $1", ctx.tenant_id)
        head = await conn.fetchrow(_HEAD, ctx.tenant_id)
        export = await open_export(conn, ctx.tenant_id, filters, fmt)
    except BaseException:
        await _streams.close(conn)
        raise
    filename = export_filename(name or str(ctx.tenant_id), fmt, datetime.now(UTC))
    headers = {
        "Content-Disposition": f'attachment; filename="{filename}"',
        "Cache-Control": "no-store",
        "Steward-Audit-Head-Seq": str(head["seq"] if head else 0),
        "Steward-Audit-Head-Hash": head["hash"] if head else "",
    }
    return _ExportResponse(export.chunks(), conn, headers=headers, media_type=_MEDIA_TYPES[fmt])


@router.get("/verify", response_model=VerificationRead, summary="Verify the tenant's audit hash chain",
            responses=problem_responses(429))
async def verify_audit(ctx: Auditor, settings: AppSettings) -> VerificationRead:
    """Recompute every hash and check every link, the sequence and the head. 200 either way: `ok` says."""
    conn = await _streams.connect(settings, ctx.tenant_id)
    try:
        result = await verify_chain(conn, ctx.tenant_id)
    finally:
        await _streams.close(conn)
    return VerificationRead.model_validate(result.as_dict())


@router.get("/events", response_model=AuditEventPage, summary="Audit events, newest first")
async def list_audit_events(
    ctx: Auditor, db: Db, settings: AppSettings, filters: Filtered, limit: Limit = None, cursor: Cursor = None
) -> AuditEventPage:
    """Keyset-paginated on `seq`: pass `next_cursor` back as `cursor` for the next (older) page."""
    size = page_size(limit, settings)
    where, args = filters.sql(ctx.tenant_id)
    if cursor:
        args.append(PAGES.after(cursor))
        where += f" AND seq < ${len(args)}"
    args.append(size + 1)
    conn = await driver(db)
    rows = await conn.fetch(f"{_SELECT} WHERE {where} ORDER BY seq DESC LIMIT ${len(args)}", *args)
    items, next_cursor = PAGES.page(rows, size, lambda r: (r["seq"],))
    return AuditEventPage(items=[AuditEventRead(**export_record(r)) for r in items], next_cursor=next_cursor)
