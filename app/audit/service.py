"""Writing audit events (one row per action, in the transaction of the action it records; chained by a
sealer after commit) and browsing them. Exports are in app/audit/export.py, verification in app/audit/verify.py.

Engine code collects its events on the :class:`~app.engine.unit_of_work.UnitOfWork` (``tx.audit``), which appends them
just before commit; services outside the engine call :func:`record` on their connection.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from app.audit.chain import Entry, append
from app.audit.export import SELECT, Filters, export_record
from app.audit.verify import Verification, verify_chain
from app.config import Settings
from app.context import Ctx
from app.errors import AppError
from app.pagination import keyset
from app.pg import Conn, asyncpg_dsn, setup_connection

log = logging.getLogger(__name__)



# Exports and verifications running at once in this process (each holds a database connection).
MAX_STREAMS = 4
CONNECT_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 5.0
# A client that stops reading for this long loses its export (the snapshot would hold back vacuum).
IDLE_IN_TRANSACTION_MS = 300_000


# --- dedicated connections ------------------------------------------------------------------------------


class TooManyStreams(AppError):
    status = 429
    type = "too-many-audit-streams"
    title = "Too many requests"
    headers = {"Retry-After": "10"}


class Streams:
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


streams = Streams(MAX_STREAMS)
"""Shared by the API's export and verify routes and the dashboard's: one limit per process."""


# --- events ---------------------------------------------------------------------------------------------


def entry(actor: str | Ctx, action: str, target: str | None, *, outcome: str = "ok",
          data: dict[str, Any] | None = None) -> Entry:
    """An :class:`Entry` by ``actor``: a principal string, or a request's Ctx (adds its IP and user agent)."""
    if isinstance(actor, Ctx):
        return Entry(actor.principal, action, target, outcome, data or {}, actor.ip, actor.user_agent)
    return Entry(actor, action, target, outcome, data or {})


async def record(
    conn: Conn,
    tenant_id: uuid.UUID,
    actor: str | Ctx,
    action: str,
    target: str | None,
    *,
    outcome: str = "ok",
    data: dict[str, Any] | None = None,
) -> None:
    """Append an audit event. ``data`` should already be free of secrets; keys that look secret are
    redacted anyway."""
    await append(conn, tenant_id, [entry(actor, action, target, outcome=outcome, data=data)])


# The events list's cursors: newest first by (at, id), on the (tenant_id, at) index; not by seq, so that
# rows not sealed yet are listed too.
PAGES = keyset("audit-events", datetime, int)


async def list_events(
    conn: Conn, tenant_id: uuid.UUID, filters: Filters, *, before: tuple[datetime, int] | None, limit: int
) -> list[asyncpg.Record]:
    """The tenant's events matching ``filters``, newest first, before the (at, id) ``before`` (keyset pages)."""
    where, args = filters.sql(tenant_id)
    if before is not None:
        args += before
        where += f" AND (at, id) < (${len(args) - 1}, ${len(args)})"
    args.append(limit)
    rows: list[asyncpg.Record] = await conn.fetch(
        f"{SELECT} WHERE {where} ORDER BY at DESC, id DESC LIMIT ${len(args)}", *args)
    return rows


@dataclass(frozen=True)
class ChainCheck:
    """A verification, and the row where the chain breaks (as exported; None when ok or the row is missing)."""

    verification: Verification
    broken_row: dict[str, Any] | None


async def verify_tenant(settings: Settings, tenant_id: uuid.UUID) -> ChainCheck:
    """Verify the tenant's whole chain on a dedicated connection (429 past :data:`MAX_STREAMS`): what
    ``GET /api/v1/audit/verify`` and the dashboard report (``steward audit verify`` runs the same check)."""
    conn = await streams.connect(settings, tenant_id)
    try:
        result = await verify_chain(conn, tenant_id)
        row = None
        if result.broken is not None and result.broken.id is not None:
            found = await conn.fetchrow(f"{SELECT} WHERE tenant_id = $1 AND seq = $2", tenant_id, result.broken.seq)
            row = export_record(found) if found is not None else None
    finally:
        await streams.close(conn)
    return ChainCheck(result, row)
