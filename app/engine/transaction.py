"""Running engine work in a transaction, then relaying what it produced."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from app.engine.state_machine import StaleTransition
from app.engine.unit_of_work import UnitOfWork
from app.outage import DATABASE, Backoff, is_database_outage
from app.runtime import Runtime

T = TypeVar("T")
log = logging.getLogger(__name__)

# Deadlock and serialization failures: Postgres rolled the transaction back; running it again is safe.
RETRYABLE_SQLSTATES = {"40P01", "40001"}


class DatabaseUnavailable(Exception):
    """The database stayed unreachable until the caller's deadline; the work was not done."""


async def in_tx(
    runtime: Runtime, work: Callable[..., Awaitable[T]], *args: Any, attempts: int = 3, until: float | None = None
) -> T:
    """Run ``work(tx, *args)`` in one transaction with a fresh :class:`UnitOfWork`; after commit, relay its jobs.

    ``until`` (a ``time.monotonic()`` deadline): while the database is unreachable, try again with
    backoff until then, and raise :class:`DatabaseUnavailable` after. Without it an outage raises at
    once. ``work`` may run more than once, so it must decide from what is committed (a versioned
    transition does): a connection lost during COMMIT leaves unknown whether the first run landed.
    """
    backoff = Backoff()
    attempt = 0
    while True:
        attempt += 1
        try:
            async with runtime.pg.acquire() as conn, conn.transaction():
                tx = UnitOfWork(conn)
                result = await work(tx, *args)
                await tx.flush()
            break
        except (asyncpg.PostgresError, StaleTransition) as exc:
            if until is not None and is_database_outage(exc):
                await _wait_out(runtime, exc, backoff, until)
                continue
            # A stale deferred move (see state_machine.defer_step_move) rolled back: run the unit again.
            reason = "stale" if isinstance(exc, StaleTransition) else exc.sqlstate
            if (reason != "stale" and reason not in RETRYABLE_SQLSTATES) or attempt >= attempts:
                raise
            log.debug("retrying engine transaction after %s", reason)
            await asyncio.sleep(0.01 * attempt)
        except Exception as exc:
            if until is None or not is_database_outage(exc):
                raise
            await _wait_out(runtime, exc, backoff, until)
    await runtime.after_commit(tx)
    return result


async def _wait_out(runtime: Runtime, exc: BaseException, backoff: Backoff, until: float) -> None:
    DATABASE.down(exc)
    # Every pooled connection is as dead as this one: replace them all rather than fail on each in turn.
    await runtime.pg.expire_connections()
    delay = backoff.next()
    if time.monotonic() + delay > until:
        raise DatabaseUnavailable(f"the database stayed unreachable ({type(exc).__name__}: {exc})") from exc
    await asyncio.sleep(delay)
