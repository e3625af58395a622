"""Process-wide resources, built once per process (API or worker): the database engine and sessions, the
asyncpg pool, the arq pool, the vault keys, the outbox relay and the run notifier."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Annotated

import asyncpg
from arq.connections import ArqRedis
from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app import metrics, tracing
from app.config import Settings
from app.db import make_engine, make_sessionmaker
from app.engine.notify import RunNotifier
from app.engine.outbox import Relay
from app.engine.unit_of_work import UnitOfWork
from app.outage import DATABASE, watch_engine
from app.pg import asyncpg_dsn, setup_connection
from app.redis import connect as connect_redis
from app.vault.crypto import Vault, load_keys
from app.workflows.cel import evaluation

log = logging.getLogger(__name__)


async def _no_reset(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Skip asyncpg's reset query on release (a round trip per transaction): the engine's connections
    never LISTEN, take session advisory locks (budget reservations take transaction ones), open cursors
    or SET session state, and asyncpg rolls back any transaction left open before calling this."""


async def _init_connection(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    await setup_connection(conn)
    DATABASE.up()  # a new connection: if the database was away, it is back


@dataclass
class Runtime:
    settings: Settings
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    redis: ArqRedis
    relay: Relay
    # The engine's own connections (workers, reconciler); API requests use their session's connection.
    pg: asyncpg.Pool[asyncpg.Record]
    notifier: RunNotifier | None = None
    owns_redis: bool = field(default=True)
    _vault: Vault | None = field(default=None, repr=False)

    @property
    def vault(self) -> Vault:
        """Seals and opens secrets; its keys are read on first use."""
        if self._vault is None:
            self._vault = Vault(load_keys(self.settings.secret_keys, self.settings.data_dir))
        return self._vault

    @classmethod
    async def start(cls, settings: Settings, *, role: str = "api", redis: ArqRedis | None = None) -> Runtime:
        """Connect to Postgres and Redis; ``role="api"`` also listens for finished runs."""
        if not settings.database_url or not settings.redis_url:
            raise RuntimeError("DATABASE_URL and REDIS_URL must be set")
        # API requests run as the application role, which row-level security applies to; the engine's
        # own pool (workers, reconciler, relay) runs as the login user, the tables' owner.
        engine = make_engine(
            settings.database_url, pool_size=settings.db_pool_size, max_overflow=settings.db_max_overflow,
            role=settings.db_app_role if role == "api" else None,
        )
        watch_engine(engine)
        # The expression evaluators (started on first use) follow this process's settings, not the environment's.
        evaluation.configure(settings.expression_processes, settings.expression_memory_mb)
        metrics.configure(settings)
        tracing.configure(f"steward-{role}", db=settings.trace_db)
        # min_size=0: connections open on demand, so asyncpg keeps no "connection floor" it would retry
        # (with a traceback each time) through a database outage.
        pg = await asyncpg.create_pool(
            asyncpg_dsn(settings.database_url), min_size=0, max_size=settings.db_pool_size + settings.db_max_overflow,
            init=_init_connection, reset=_no_reset, server_settings={"application_name": f"steward-{role}"},
        )
        owns = redis is None
        if redis is None:
            redis = connect_redis(settings.redis_url)
        relay = Relay(redis, settings.relay_retry_s, settings.queue_prefix)
        relay.start()
        notifier = None
        if role == "api":
            notifier = RunNotifier(settings.database_url)
            notifier.start()
        return cls(settings=settings, engine=engine, sessionmaker=make_sessionmaker(engine), redis=redis, relay=relay,
                   pg=pg, notifier=notifier, owns_redis=owns)

    async def after_commit(self, tx: UnitOfWork) -> None:
        if tx.jobs or tx.aborts:
            await self.relay.send(tx.jobs, tx.aborts)
        if tx.dequeue:
            await self.relay.drop(tx.dequeue)
        metrics.observe_events(tx.written)
        if tx.ended:
            try:
                async with self.pg.acquire() as conn:
                    await metrics.observe_ended(conn, tx.ended)
            except Exception as exc:  # committed already: only the metrics of these runs are lost
                log.warning("metrics of %d ended runs not recorded: %r", len(tx.ended), exc)

    async def stop(self) -> None:
        tracing.shutdown()
        await self.relay.stop()
        if self.notifier is not None:
            await self.notifier.stop()
        if self.owns_redis:
            await self.redis.aclose()
        await self.pg.close()
        await self.engine.dispose()


async def get_runtime(request: Request) -> Runtime:
    """A coroutine, so FastAPI calls it inline (a plain ``def`` dependency goes through its thread pool)."""
    runtime: Runtime = request.app.state.runtime
    return runtime


# The process's resources, for route signatures.
AppRuntime = Annotated[Runtime, Depends(get_runtime)]
