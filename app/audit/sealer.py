"""The workers' audit sealer: chains the audit rows actions committed unsealed (app/audit/chain.py).

Every worker process runs one loop beside its queues. A pass seals every tenant's committed unsealed rows
(:func:`app.audit.chain.seal_pending`); passes run every ``audit_seal_interval_s`` and sooner when a
transaction that appended rows commits (its ``NOTIFY`` on :data:`app.audit.chain.CHANNEL` wakes the loop),
but at most every :data:`MIN_GAP_S`, so a busy system seals in batches rather than once per action.
Sealers of several processes share the work: each tenant's head lock admits one at a time, the others
skip that tenant. The notification is only a hint: a lost one costs at most one interval.

While a worker runs, a committed row is sealed within :func:`bound_s` (docs/security.md, "Audit log").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import asyncpg

from app.audit.chain import CHANNEL, seal_pending
from app.outage import quiet_database_outage
from app.pg import asyncpg_dsn, listen_until_closed

if TYPE_CHECKING:
    from app.config import Settings
    from app.runtime import Runtime

log = logging.getLogger(__name__)

# Passes woken by notifications are at least this far apart.
MIN_GAP_S = 0.25
# Allowed for one pass to seal a backlog (and the time to see a row committed), in the bound below.
PASS_ALLOWANCE_S = 5.0
# The listening connection is re-opened this long after it was lost.
RECONNECT_S = 1.0


def bound_s(settings: Settings) -> float:
    """How long a committed row may stay unsealed while a worker runs: one interval and one pass."""
    return settings.audit_seal_interval_s + PASS_ALLOWANCE_S


async def seal_loop(runtime: Runtime) -> None:
    """Seal committed audit rows until cancelled: on every wake-up, and at least every interval."""
    interval = runtime.settings.audit_seal_interval_s
    wake = asyncio.Event()
    assert runtime.settings.database_url is not None
    listener = asyncio.create_task(_listen(asyncpg_dsn(runtime.settings.database_url), wake),
                                   name="audit-seal-listener")
    try:
        while True:
            wake.clear()
            try:
                with quiet_database_outage():  # the next pass seals what this one could not
                    async with runtime.pg.acquire() as conn:
                        await seal_pending(conn)
            except Exception:  # never the worker's end: the next pass tries again
                log.exception("audit sealer: the pass failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), interval)
            await asyncio.sleep(MIN_GAP_S)  # what commits meanwhile joins the next pass
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)


async def _listen(dsn: str, wake: asyncio.Event) -> None:
    """Set ``wake`` on every notification (and on reconnecting: some may have been missed)."""

    def notified(*_: Any) -> None:
        wake.set()

    while True:
        conn = None
        try:
            conn = await asyncpg.connect(dsn, server_settings={"application_name": "steward-audit-sealer"})
            await listen_until_closed(conn, (CHANNEL,), notified, on_listening=wake.set)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.debug("audit sealer: listening connection lost (%r); the interval still applies", exc)
        finally:
            if conn is not None and not conn.is_closed():
                await conn.close()
        await asyncio.sleep(RECONNECT_S)
