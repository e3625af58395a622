"""Wakes long polls when a run ends (``steward_run_done``), open dashboard pages when a run changes
(``steward_run_changed``) and open runs lists when one of their tenant's runs changes
(``steward_tenant_runs_changed``): Postgres LISTEN/NOTIFY, on one connection per API process.

Notifications are a shortcut, not the truth: waiters re-read the run when woken and also on a
timer, so a notification lost while the listening connection reconnects costs latency only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg

from app.outage import DATABASE
from app.pg import asyncpg_dsn, listen_until_closed

log = logging.getLogger(__name__)
RUN_DONE = "steward_run_done"
# Sent by every engine transaction that wrote run events, once per run (app/engine/unit_of_work.py).
RUN_CHANGED = "steward_run_changed"
# Sent by the same transactions, once per tenant whose runs they changed (the payload is the tenant id).
TENANT_CHANGED = "steward_tenant_runs_changed"


class RunNotifier:
    def __init__(self, database_url: str) -> None:
        self.dsn = asyncpg_dsn(database_url)
        self._waiters: dict[uuid.UUID, set[asyncio.Event]] = {}
        self._watchers: dict[uuid.UUID, set[asyncio.Event]] = {}
        self._tenants: dict[uuid.UUID, set[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="run-notifier")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def subscribe(self, run_id: uuid.UUID) -> contextlib.AbstractContextManager[asyncio.Event]:
        """An event set when the run ends (and whenever the listening connection was lost)."""
        return _subscription(self._waiters, run_id)

    def watch(self, run_id: uuid.UUID) -> contextlib.AbstractContextManager[asyncio.Event]:
        """An event set whenever the run changes (and whenever the listening connection was lost)."""
        return _subscription(self._watchers, run_id)

    def watch_tenant(self, tenant_id: uuid.UUID) -> contextlib.AbstractContextManager[asyncio.Event]:
        """An event set whenever one of the tenant's runs changes (and whenever the listening connection
        was lost): a tenant's open runs lists share one notification, however many runs it has."""
        return _subscription(self._tenants, tenant_id)

    def _on_notify(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        subscribers = {RUN_DONE: self._waiters, TENANT_CHANGED: self._tenants}.get(channel, self._watchers)
        with contextlib.suppress(ValueError):
            for event in subscribers.get(uuid.UUID(payload), ()):
                event.set()

    def _listening(self) -> None:
        self.connected.set()
        DATABASE.up()

    async def _listen(self) -> None:
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(self.dsn)
                await listen_until_closed(conn, (RUN_DONE, RUN_CHANGED, TENANT_CHANGED), self._on_notify,
                                          on_listening=self._listening)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # Reconnecting every second while the database is away: the outage is logged once.
                DATABASE.down(exc)
            finally:
                self.connected.clear()
                if conn is not None and not conn.is_closed():
                    await conn.close()
                # Anyone waiting may have missed a notification: let them re-check.
                for subscribers in (*self._waiters.values(), *self._watchers.values(), *self._tenants.values()):
                    for event in subscribers:
                        event.set()
            await asyncio.sleep(1)


@contextlib.contextmanager
def _subscription(subscribers: dict[uuid.UUID, set[asyncio.Event]], key: uuid.UUID) -> Iterator[asyncio.Event]:
    event = asyncio.Event()
    subscribers.setdefault(key, set()).add(event)
    try:
        yield event
    finally:
        events = subscribers.get(key)
        if events is not None:
            events.discard(event)
            if not events:
                del subscribers[key]
