"""The engine's asyncpg statements inside an API request share the request session's transaction."""

from __future__ import annotations

import uuid

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.pg import driver


async def test_driver_statements_are_in_the_session_transaction(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    name = f"sql-{uuid.uuid4().hex[:8]}"
    async with sessionmaker() as db:
        conn = await driver(db)
        await conn.execute("INSERT INTO tenant (id, name) VALUES ($1, $2)", uuid.uuid4(), name)
        # The session sees the driver's write: same connection, same transaction ...
        assert (await db.execute(text("SELECT count(*) FROM tenant WHERE name = :n"), {"n": name})).scalar() == 1
        await db.rollback()
    async with sessionmaker() as db:
        # ... and its rollback undoes it.
        assert (await db.execute(text("SELECT count(*) FROM tenant WHERE name = :n"), {"n": name})).scalar() == 0


async def test_driver_after_a_session_statement_joins_the_same_transaction(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    async with sessionmaker() as db:
        await db.execute(text("SELECT 1"))
        conn = await driver(db)
        assert await conn.fetchval("SELECT txid_current_if_assigned() IS NULL")
        xid = await conn.fetchval("SELECT txid_current()")
        assert (await db.execute(text("SELECT txid_current()"))).scalar() == xid
        await db.rollback()
