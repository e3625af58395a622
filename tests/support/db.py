"""Direct connections to the test database, as the engine's own pool makes them."""

from __future__ import annotations

import asyncpg

from app.engine.notify import asyncpg_dsn
from app.pg import Conn, setup_connection


async def connect(database_url: str, **server_settings: str) -> Conn:
    """An asyncpg connection as the tables' owner (no row-level security), JSONB codec installed."""
    conn: Conn = await asyncpg.connect(asyncpg_dsn(database_url), server_settings=server_settings or None)
    await setup_connection(conn)
    return conn
