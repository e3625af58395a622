"""Telling "PostgreSQL or Redis cannot be reached" from a bug, and saying so once per outage.

An outage is not an error of the code that meets it: the API answers 503 ``unavailable`` with
``Retry-After`` instead of a 500 with a traceback, and workers, the reconciler and the relay wait and
try again. Each process logs one warning when it first meets an outage of a server and one line when
that server answers again (:data:`DATABASE`, :data:`REDIS`), whatever the number of requests, polls
and retries in between. What counts as an outage is decided here only (:func:`is_database_outage`,
:func:`is_redis_outage`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import socket
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.responses import Response

log = logging.getLogger(__name__)

# What a client is told to wait before trying again (seconds).
RETRY_AFTER_S = 5
# Admin shutdown, crash shutdown, "cannot connect now" (starting up, shutting down, in recovery), too
# many connections; and class 08, connection exceptions.
_DOWN_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300"})
_CONNECTION_ERRNOS = frozenset({
    errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT, errno.EHOSTUNREACH,
    errno.ENETUNREACH, errno.ENOENT,  # ENOENT: the Unix socket of a stopped server is gone
})
# Frames of these packages: an OSError raised there was met talking to PostgreSQL.
_DATABASE_MODULES = ("asyncpg", "sqlalchemy")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, SQLAlchemy's ``orig``, and their causes and contexts (each once)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [e for e in (getattr(current, "orig", None), current.__cause__, current.__context__)
                 if isinstance(e, BaseException)]


def _raised_in(exc: BaseException, packages: tuple[str, ...]) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        if module.split(".", 1)[0] in packages:
            return True
        tb = tb.tb_next
    return False


def _connection_oserror(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError | ConnectionError | socket.gaierror) or (
        isinstance(exc, OSError) and exc.errno in _CONNECTION_ERRNOS
    )


def is_database_outage(exc: BaseException) -> bool:
    """PostgreSQL could not be reached, or dropped the connection: worth waiting for, not a bug."""
    for e in _chain(exc):
        if isinstance(e, sa_exc.DBAPIError) and e.connection_invalidated:
            return True
        sqlstate = getattr(e, "sqlstate", None)
        if isinstance(sqlstate, str) and (sqlstate in _DOWN_SQLSTATES or sqlstate.startswith("08")):
            return True
        if isinstance(e, asyncpg.InterfaceError) and "closed" in str(e):
            return True  # "connection is closed", "... the underlying connection is closed"
        if isinstance(e, asyncpg.InternalClientError) and "in progress" in str(e):
            # A pooled connection the server terminated while it sat idle: asyncpg has read the
            # termination notice but not yet the end of the socket, and refuses the next query so.
            return True
        if _connection_oserror(e) and _raised_in(e, _DATABASE_MODULES):
            return True
    return False


def is_redis_outage(exc: BaseException) -> bool:
    """Redis could not be reached (refused, reset, timed out, still loading its data)."""
    return isinstance(exc, RedisConnectionError | RedisTimeoutError) or _connection_oserror(exc)


class Outage:
    """One server as this process sees it: down from the first failure until something succeeds again."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.since: float | None = None  # time.monotonic() of the first failure
        self.failures = 0

    @property
    def is_down(self) -> bool:
        return self.since is not None

    def down(self, exc: BaseException) -> None:
        """Count a failure; the first of an outage is logged (one line, no traceback)."""
        self.failures += 1
        if self.since is None:
            self.since = time.monotonic()
            log.warning("%s unreachable (%s: %s); waiting for it", self.name, type(exc).__name__,
                        str(exc).splitlines()[0] if str(exc) else "")

    def up(self) -> None:
        """It answered: log the end of the outage, if there was one."""
        if self.since is not None:
            log.warning("%s reachable again after %.1f s (%d failed attempts meanwhile)", self.name,
                        time.monotonic() - self.since, self.failures)
            self.since, self.failures = None, 0


DATABASE = Outage("PostgreSQL")
REDIS = Outage("Redis")


class Backoff:
    """Exponential delays with jitter: ``first``, doubling, at most ``cap`` seconds."""

    def __init__(self, first: float = 0.1, cap: float = 2.0) -> None:
        self.first, self.cap, self.n = first, cap, 0

    def next(self) -> float:
        delay: float = min(self.cap, self.first * 2.0**self.n)
        self.n += 1
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.n = 0

    async def sleep(self) -> None:
        await asyncio.sleep(self.next())


# --- the API ---------------------------------------------------------------------------------------------


async def unavailable_handler(request: Request, exc: Exception) -> Response:
    """503 ``unavailable`` with Retry-After for an outage; anything else is the usual 500."""
    from app.http import problem_response, unhandled_error_handler

    if not is_database_outage(exc):
        return await unhandled_error_handler(request, exc)
    DATABASE.down(exc)
    return problem_response(
        503, "unavailable", "Service unavailable", "the database cannot be reached right now; try again shortly",
        headers={"Retry-After": str(RETRY_AFTER_S)}, instance=request.url.path,
    )


def register_handlers(app: FastAPI) -> None:
    """Route the exceptions an outage raises to :func:`unavailable_handler` (more specific handlers, such
    as IntegrityError's 409, still win)."""
    # EmulatedDBAPIException: SQLAlchemy's adapter errors, raised bare by statements run on the driver's
    # connection (app/pg.py ``driver``) rather than through a SQLAlchemy Connection.
    for cls in (sa_exc.DBAPIError, sa_exc.EmulatedDBAPIException, asyncpg.PostgresError, asyncpg.InterfaceError,
                asyncpg.InternalClientError, OSError):
        app.add_exception_handler(cls, unavailable_handler)


def watch_engine(engine: AsyncEngine) -> None:
    """Hand out no pooled connection the server has closed, and note when connections open again.

    The engine's callers also run statements on the asyncpg connection directly (app/pg.py
    ``driver``), where SQLAlchemy never sees a disconnect and would keep a dead connection pooled for
    good; asyncpg knows, locally and without a round trip, whether its socket is closed.
    """

    def checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        raw = getattr(dbapi_connection, "driver_connection", None)  # AdaptedConnection: the asyncpg connection
        if raw is not None and raw.is_closed():
            raise sa_exc.DisconnectionError("connection closed by the server")  # the pool connects anew

    def connect(dbapi_connection: Any, record: Any) -> None:
        DATABASE.up()

    event.listen(engine.sync_engine, "checkout", checkout)
    event.listen(engine.sync_engine, "connect", connect)


@contextlib.contextmanager
def quiet_database_outage() -> Iterator[None]:
    """Swallow a database outage after noting it in :data:`DATABASE`; anything else goes on up."""
    try:
        yield
    except Exception as exc:
        if not is_database_outage(exc):
            raise
        DATABASE.down(exc)
