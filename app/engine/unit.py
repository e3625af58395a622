"""Running engine work in a transaction, then relaying what it produced."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from app.engine.runtime import Runtime
from app.engine.state_machine import StaleTransition
from app.engine.tx import Tx

T = TypeVar("T")
log = logging.getLogger(__name__)

# Deadlock and serialization failures: Postgres rolled the transaction back; running it again is safe.
RETRYABLE_SQLSTATES = {"40P01", "40001"}


async def in_tx(runtime: Runtime, work: Callable[..., Awaitable[T]], *args: Any, attempts: int = 3) -> T:
    """Run ``work(tx, *args)`` in one transaction with a fresh :class:`Tx`; after commit, relay its jobs."""
    for attempt in range(1, attempts + 1):
        try:
            async with runtime.pg.acquire() as conn, conn.transaction():
                tx = Tx(conn)
                result = await work(tx, *args)
                await tx.flush()
            break
        except (asyncpg.PostgresError, StaleTransition) as exc:
            # A stale deferred move (see state_machine.defer_step_move) rolled back: run the unit again.
            reason = "stale" if isinstance(exc, StaleTransition) else exc.sqlstate
            if (reason != "stale" and reason not in RETRYABLE_SQLSTATES) or attempt == attempts:
                raise
            log.info("retrying engine transaction after %s", reason)
            await asyncio.sleep(0.01 * attempt)
    await runtime.after_commit(tx)
    return result
