"""Writing audit events (one row per action, chained, in the transaction of the action it records) and
browsing them. Exports are in app/audit/export.py, verification in app/audit/verify.py.

Engine code collects its events on the :class:`~app.engine.unit_of_work.UnitOfWork` (``tx.audit``), which appends them
just before commit; services outside the engine call :func:`record` on their connection.
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from app.audit.chain import Entry, append
from app.audit.export import SELECT, Filters
from app.context import Ctx
from app.pg import Conn


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


async def list_events(
    conn: Conn, tenant_id: uuid.UUID, filters: Filters, *, before: int | None, limit: int
) -> list[asyncpg.Record]:
    """The tenant's events matching ``filters``, newest first, below seq ``before`` (keyset pages)."""
    where, args = filters.sql(tenant_id)
    if before is not None:
        args.append(before)
        where += f" AND seq < ${len(args)}"
    args.append(limit)
    rows: list[asyncpg.Record] = await conn.fetch(f"{SELECT} WHERE {where} ORDER BY seq DESC LIMIT ${len(args)}", *args)
    return rows
