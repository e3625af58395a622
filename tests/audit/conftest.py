"""Audit fixtures: a connection as the tables' owner (helpers: tests/support/audit.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from app.pg import Conn
from tests.support.db import connect


@pytest_asyncio.fixture(loop_scope="session")
async def owner(database_url: str) -> AsyncIterator[Conn]:
    """A connection as the tables' owner (a superuser here): no row-level security."""
    conn = await connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()
