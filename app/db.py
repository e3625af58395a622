"""Database engine, session factory, declarative base and migrations."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends
from sqlalchemy import Connection, MetaData, event, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Session, SessionTransaction
from starlette.requests import Request

ROOT = Path(__file__).resolve().parent.parent
# What `integer` and `bigint` columns hold: every integer accepted must fit the column it goes to.
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def async_url(url: str) -> str:
    """Accept plain ``postgresql://`` URLs and point SQLAlchemy at asyncpg."""
    for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    raise ValueError(f"unsupported database URL scheme: {url.split(':', 1)[0]}")


def make_engine(
    url: str, *, pool_size: int = 10, max_overflow: int = 10, role: str | None = None, **kw: Any
) -> AsyncEngine:
    """An engine whose connections run as ``role`` when given (``SET ROLE`` in the startup packet:
    ``RESET ROLE`` and ``RESET ALL`` return to it, not to the login user)."""
    server_settings = {"application_name": "steward"}
    if role:
        server_settings["role"] = role
    return create_async_engine(
        async_url(url),
        pool_size=pool_size,
        max_overflow=max_overflow,
        # No pre-ping: it costs a round trip per checkout on the hot path. A connection that died is
        # invalidated by SQLAlchemy on the error, and the engine's callers retry what failed.
        pool_recycle=3600,
        connect_args={"server_settings": server_settings},
        **kw,
    )


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


_SET_TENANT = text("SELECT set_config('steward.tenant_id', :tenant, true)")


async def bind_tenant(db: AsyncSession, tenant_id: uuid.UUID) -> None:
    """Scope ``db`` to a tenant for row-level security: now, and again in every later transaction."""
    db.sync_session.info["tenant_id"] = tenant_id
    await db.execute(_SET_TENANT, {"tenant": str(tenant_id)})


@event.listens_for(Session, "after_begin")
def _rebind_tenant(session: Session, transaction: SessionTransaction, connection: Connection) -> None:
    # ``steward.tenant_id`` is transaction-local (SET LOCAL): a request that commits and reads on
    # sets it again for the next transaction.
    tenant_id = session.info.get("tenant_id")
    if tenant_id is not None:
        connection.execute(_SET_TENANT, {"tenant": str(tenant_id)})


async def get_db(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request; the route commits, anything left over is rolled back."""
    sessionmaker: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    async with sessionmaker() as session:
        yield session


# The request's session, for route signatures.
Db = Annotated[AsyncSession, Depends(get_db)]


def run_migrations(database_url: str, app_role: str | None = None) -> None:
    """``alembic upgrade head`` against ``database_url`` (synchronous; call it from a thread in async code).

    ``app_role``: the database role API requests run as (default: the ``db_app_role`` setting)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.attributes["database_url"] = database_url
    if app_role is None:
        from app.config import get_settings

        app_role = get_settings().db_app_role
    cfg.attributes["app_role"] = app_role
    command.upgrade(cfg, "head")
