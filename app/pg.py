"""Database access on asyncpg: statements run on the transaction's own connection.

The engine's and the services' statements are fixed and many are on the hot path of every step, so
they are written as SQL and run on the asyncpg connection directly (prepared once per connection by
asyncpg's statement cache) rather than built through SQLAlchemy's expression layer on every call.
Inside an API request :func:`driver` gives the request session's connection, so those writes share
the request's transaction.

JSONB values go in as JSON text and come out decoded: the codec SQLAlchemy's asyncpg dialect installs,
which :func:`setup_connection` installs on the engine's own pool too.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import (
    Any,
    TypeAlias,
)

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession

Conn: TypeAlias = "asyncpg.Connection[asyncpg.Record]"

JSON_COLUMNS = frozenset({"input", "output", "error", "data"})


def asyncpg_dsn(url: str) -> str:
    """A SQLAlchemy ``postgresql+asyncpg://`` URL as the plain DSN asyncpg connects with."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


async def setup_connection(conn: Conn) -> None:
    await conn.set_type_codec(
        "jsonb", schema="pg_catalog", format="binary",
        encoder=lambda text: b"\x01" + text.encode(), decoder=lambda data: json.loads(data[1:].decode()),
    )


async def driver(db: AsyncSession) -> Conn:
    """The asyncpg connection under ``db``, inside the session's transaction (no extra round trip)."""
    connection = await db.connection()
    pooled = await connection.get_raw_connection()
    conn: Conn = pooled.driver_connection
    # The one reach into SQLAlchemy's internals (pinned in pyproject.toml): its asyncpg adapter opens the
    # session's transaction lazily, on the first statement it runs itself, and has no public way to open
    # it without running one (a round trip more on every request).
    adapted: Any = pooled.dbapi_connection
    if adapted._transaction is None and adapted.isolation_level != "autocommit":
        await adapted._start_transaction()
    return conn


@lru_cache(maxsize=256)
def versioned_update(table: str, columns: tuple[str, ...]) -> str:
    """``UPDATE table SET status, version, <columns> WHERE id AND version RETURNING version``."""
    sets = ", ".join(f"{c} = ${i}" for i, c in enumerate(("status", "version", *columns), start=1))
    n = len(columns) + 2
    return f"UPDATE {table} SET {sets} WHERE id = ${n + 1} AND version = ${n + 2} RETURNING version"


def encode(column: str, value: Any) -> Any:
    return dumps(value) if column in JSON_COLUMNS and value is not None else value


async def listen_until_closed(conn: Conn, channels: Sequence[str], callback: Callable[..., Any],
                              on_listening: Callable[[], None] | None = None) -> None:
    """LISTEN on ``channels`` and return when ``conn`` closes; a connection that died silently only shows
    when used, so it is pinged every 30 s. Reconnecting is the caller's loop."""
    closed = asyncio.Event()
    conn.add_termination_listener(lambda _conn: closed.set())
    for channel in channels:
        await conn.add_listener(channel, callback)
    if on_listening is not None:
        on_listening()
    while not closed.is_set():
        try:
            await asyncio.wait_for(closed.wait(), timeout=30)
        except TimeoutError:
            await conn.fetchval("SELECT 1", timeout=5)

