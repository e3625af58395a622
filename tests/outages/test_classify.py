"""What counts as an outage (app/outage.py), decided on errors that real servers raise."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from app.config import Settings
from app.db import make_engine
from app.engine.notify import asyncpg_dsn
from app.outage import Outage, is_database_outage, is_redis_outage
from tests.support.net import free_port


async def _raised(action: Callable[[], Awaitable[Any]]) -> BaseException:
    try:
        await action()
    except Exception as exc:
        return exc
    raise AssertionError("no error was raised")


async def test_a_server_that_is_not_there_is_an_outage() -> None:
    port = free_port()  # nothing listens there
    exc = await _raised(lambda: asyncpg.connect(host="127.0.0.1", port=port, user="postgres", timeout=5))
    assert isinstance(exc, OSError) and is_database_outage(exc)
    engine = make_engine(f"postgresql://postgres@127.0.0.1:{port}/x", pool_size=1, max_overflow=0)
    try:
        exc = await _raised(lambda: engine.connect().__aenter__())
        assert is_database_outage(exc)
    finally:
        await engine.dispose()


async def test_a_connection_the_server_terminated_is_an_outage(settings: Settings) -> None:
    assert settings.database_url is not None
    dsn = asyncpg_dsn(settings.database_url)
    admin = await asyncpg.connect(dsn)
    victim = await asyncpg.connect(dsn)
    engine = make_engine(settings.database_url, pool_size=1, max_overflow=0)
    try:
        await admin.fetchval("SELECT pg_terminate_backend($1)", victim.get_server_pid())  # SQLSTATE 57P01
        assert is_database_outage(await _raised(lambda: victim.fetchval("SELECT 1")))
        async with engine.connect() as conn:
            pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
            exc = await _raised(lambda: conn.execute(text("SELECT 1")))
        assert is_database_outage(exc)
    finally:
        await admin.close()
        await victim.close()
        await engine.dispose()


async def test_errors_of_a_working_database_are_not_outages(settings: Settings) -> None:
    assert settings.database_url is not None
    conn = await asyncpg.connect(asyncpg_dsn(settings.database_url))
    engine = make_engine(settings.database_url, pool_size=1, max_overflow=0)
    try:
        await conn.execute("CREATE TEMP TABLE t (id int PRIMARY KEY)")
        await conn.execute("INSERT INTO t VALUES (1)")
        for sql in ("INSERT INTO t VALUES (1)", "SELEC 1", "SELECT * FROM no_such_table",
                    "SET statement_timeout = 1; SELECT pg_sleep(1)"):  # 23505, 42601, 42P01, 57014
            exc = await _raised(lambda sql=sql: conn.execute(sql))
            assert not is_database_outage(exc), exc
        async with engine.connect() as sa:
            await sa.execute(text("CREATE TEMP TABLE t (id int PRIMARY KEY)"))
            await sa.execute(text("INSERT INTO t VALUES (1)"))
            exc = await _raised(lambda: sa.execute(text("INSERT INTO t VALUES (1)")))
        assert isinstance(exc, IntegrityError) and not is_database_outage(exc)
    finally:
        await conn.close()
        await engine.dispose()
    # An OSError that did not come from talking to the database is a bug, not an outage.
    assert not is_database_outage(FileNotFoundError(2, "No such file or directory"))
    assert not is_database_outage(ValueError("bad"))


async def test_redis_outages(settings: Settings) -> None:
    gone = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=2)
    there = aioredis.Redis.from_url(settings.redis_url or "")
    try:
        exc = await _raised(gone.ping)
        assert isinstance(exc, RedisError) and is_redis_outage(exc)
        exc = await _raised(lambda: there.execute_command("NO-SUCH-COMMAND"))
        assert isinstance(exc, RedisError) and not is_redis_outage(exc)
    finally:
        await gone.aclose()
        await there.aclose()


def test_an_outage_is_logged_when_it_starts_and_when_it_ends(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="app.outage")
    server = Outage("Server")
    server.up()  # nothing to end
    for _ in range(100):
        server.down(ConnectionRefusedError(111, "Connection refused"))
    assert server.is_down
    server.up()
    server.up()
    assert not server.is_down
    messages = [r.getMessage() for r in caplog.records if r.name == "app.outage"]
    assert len(messages) == 2, messages
    assert messages[0].startswith("Server unreachable (ConnectionRefusedError")
    assert messages[1].startswith("Server reachable again after") and "100 failed attempts" in messages[1]
