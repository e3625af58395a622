"""Shared fixtures: a migrated database and a Redis database per test process, the app, clients, tenants,
workers and the tool server. Helpers (types, run and tool helpers...) live in tests/support/.

Real PostgreSQL and Redis (127.0.0.1:5432 / 6379, or TEST_DATABASE_URL / TEST_REDIS_URL); when nothing
answers there, embedded servers under ``.steward-test/<xdist worker>`` (see app/embedded.py).
Nothing starts until a test asks for it: pure unit tests never touch a server.

Every async fixture runs on the session event loop (``loop_scope="session"``), as do the tests
(``asyncio_default_test_loop_scope`` in pyproject.toml), so connections can be shared across tests.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import pytest_asyncio
from arq.connections import create_pool
from fastapi import FastAPI
from sqlalchemy import make_url, text, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from app.auth.local import hash_password
from app.config import Settings
from app.context import Ctx
from app.db import async_url, bind_tenant, make_engine, make_sessionmaker, run_migrations
from app.pg import Conn
from app.redis import redis_settings
from app.tenants import service as tenants_service
from app.tenants.models import ApiKey
from app.vault.crypto import new_key
from tests.fakes.tool_server import ToolServer
from tests.support.db import connect
from tests.support.env import ROOT, worker_id, worker_index
from tests.support.signin import SignIn, app_client, first_form
from tests.support.tenants import MakeApiKey, MakeTenant, TenantKey
from tests.support.workers import FAST, WorkerProcess
from workers.main import run_worker

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
# Redis has 16 databases by default; database 0 is left to people running Steward by hand.
REDIS_DATABASES = 15
# Two test sessions on one machine (say, two checkouts) pick different databases with this offset:
# each session flushes the databases it uses when it starts.
REDIS_DB_OFFSET = int(os.environ.get("TEST_REDIS_DB_OFFSET", "0"))


@dataclass(frozen=True)
class Servers:
    admin_database_url: str  # a database we may CREATE DATABASE from
    redis_url: str  # a Redis database of our own


# --- servers and the database ----------------------------------------------------------------------


def _answers(url: str, default_port: int) -> bool:
    """Something accepts TCP connections at the URL's host and port (URLs without a host: assume so)."""
    parsed = urlsplit(url)
    if not parsed.hostname:
        return True
    try:
        with socket.create_connection((parsed.hostname, parsed.port or default_port), timeout=1.0):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    """PostgreSQL and Redis to test against: real ones when they answer, else embedded ones."""
    worker = worker_id()
    admin_url = os.environ.get("TEST_DATABASE_URL", DEFAULT_ADMIN_URL)
    redis_url = os.environ.get(
        "TEST_REDIS_URL", f"redis://127.0.0.1:6379/{1 + (REDIS_DB_OFFSET + worker_index(worker)) % REDIS_DATABASES}"
    )
    pg_up = _answers(admin_url, 5432)
    redis_up = _answers(redis_url, 6379)
    with ExitStack() as stack:
        if not (pg_up and redis_up):
            from app.embedded import embedded_services  # heavy, and only needed without real servers

            # One data directory per xdist worker: embedded servers lock theirs.
            embedded = stack.enter_context(
                embedded_services(
                    ROOT / ".steward-test" / worker,
                    database_url=admin_url if pg_up else None,
                    redis_url=redis_url if redis_up else None,
                )
            )
            admin_url, redis_url = embedded.database_url, embedded.redis_url
        yield Servers(admin_database_url=admin_url, redis_url=redis_url)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def database_url(servers: Servers) -> AsyncIterator[str]:
    """A fresh database for this test process, migrated with ``alembic upgrade head``; dropped at the end."""
    name = f"steward_test_{worker_id()}_{secrets.token_hex(4)}"
    admin = create_async_engine(async_url(servers.admin_database_url), isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = make_url(async_url(servers.admin_database_url)).set(database=name)
        database_url = url.render_as_string(hide_password=False)
        # Alembic's env.py runs its own event loop: keep it off ours.
        await asyncio.to_thread(run_migrations, database_url)
        yield database_url
    finally:
        async with admin.connect() as conn:
            await conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"),
                {"name": name},
            )
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def settings(database_url: str, servers: Servers) -> Settings:
    """Settings for this test process: its own database, its own (flushed) Redis database and queue prefix."""
    client = await create_pool(redis_settings(servers.redis_url), retry=0)
    try:
        await client.flushdb()
    finally:
        await client.aclose()
    return Settings(
        database_url=database_url,
        redis_url=servers.redis_url,
        queue_prefix=f"stwtest-{secrets.token_hex(4)}",
        http_allow_private_networks=True,
        secret_keys=new_key(),
        db_pool_size=5,
        db_max_overflow=20,
    )


@pytest_asyncio.fixture(loop_scope="session")
async def owner(database_url: str) -> AsyncIterator[Conn]:
    """A connection as the tables' owner (a superuser here): no row-level security (to write and tamper
    with audit chains as an attacker holding the database could; helpers in tests/support/audit.py)."""
    conn = await connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def sessionmaker(settings: Settings) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """Sessions on the test database, independent of the app's pool; commit what others must see."""
    assert settings.database_url is not None
    engine = make_engine(settings.database_url, pool_size=5, max_overflow=10)
    try:
        yield make_sessionmaker(engine)
    finally:
        await engine.dispose()


@pytest_asyncio.fixture(loop_scope="session")
async def db(sessionmaker: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """A session inside a transaction that is rolled back after the test; ``commit()`` only releases a
    savepoint. Its writes are invisible to other connections (the app, workers): use ``sessionmaker``
    and real commits for those."""
    engine = sessionmaker.kw["bind"]
    async with engine.connect() as conn:
        outer = await conn.begin()
        session = AsyncSession(bind=conn, expire_on_commit=False, join_transaction_mode="create_savepoint")
        try:
            yield session
        finally:
            await session.close()
            await outer.rollback()


# --- the app ---------------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    """The API with its lifespan running (Runtime started: pool, arq pool, relay, notifier)."""
    from app.main import create_app

    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest_asyncio.fixture(loop_scope="session")
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client calling the app in-process (no auth headers: pass ``tenant.headers``)."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


# --- tenants and keys ------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def make_tenant(sessionmaker: async_sessionmaker[AsyncSession]) -> MakeTenant:
    """``await make_tenant(name=None, roles=("admin",))``: a committed tenant with a fresh API key."""

    async def make(name: str | None = None, roles: Sequence[str] = ("admin",)) -> TenantKey:
        name = name or f"test-{secrets.token_hex(6)}"
        async with sessionmaker() as session, session.begin():
            tenant, _ = await tenants_service.get_or_create_tenant(session, name)
            key = (await tenants_service.create_api_key(session, tenant.id, name="test", roles=roles)).key
        return TenantKey(tenant.id, key, {"Authorization": f"Bearer {key}"}, name)

    return make


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def make_api_key(sessionmaker: async_sessionmaker[AsyncSession]) -> MakeApiKey:
    """``await make_api_key(tenant_id, roles=("admin",), expires_at=None, revoked_at=None)`` -> the key."""

    async def make(
        tenant_id: uuid.UUID,
        roles: Sequence[str] = ("admin",),
        *,
        expires_at: datetime | None = None,
        revoked_at: datetime | None = None,
    ) -> str:
        async with sessionmaker() as session, session.begin():
            created = await tenants_service.create_api_key(
                session, tenant_id, name="test", roles=roles, expires_at=expires_at
            )
            if revoked_at is not None:
                await session.execute(update(ApiKey).where(ApiKey.id == created.id).values(revoked_at=revoked_at))
        return created.key

    return make


@pytest_asyncio.fixture(loop_scope="session")
async def tenant(make_tenant: MakeTenant) -> TenantKey:
    """A new tenant with an admin key, for this test only."""
    return await make_tenant()


@pytest_asyncio.fixture(loop_scope="session")
async def other_tenant(make_tenant: MakeTenant) -> TenantKey:
    """A second, unrelated tenant with an admin key: for isolation tests."""
    return await make_tenant()


# --- workers and the tool server -------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="session")
async def worker(settings: Settings) -> AsyncIterator[Settings]:
    """An arq worker (all three priority queues) running in this process for the test."""
    fast = settings.model_copy(update=FAST)
    task = asyncio.create_task(run_worker(fast, concurrency=10))
    await asyncio.sleep(0.05)
    yield fast
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest_asyncio.fixture(loop_scope="session")
async def strict_worker(settings: Settings) -> AsyncIterator[Settings]:
    """A worker that refuses private addresses unless the tenant allowlists them (the production default)."""
    strict = settings.model_copy(update={**FAST, "http_allow_private_networks": False})
    task = asyncio.create_task(run_worker(strict, concurrency=5))
    await asyncio.sleep(0.05)
    yield strict
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest_asyncio.fixture(loop_scope="session")
async def worker_process(settings: Settings) -> AsyncIterator[Callable[..., WorkerProcess]]:
    """``start(**setting_overrides)``: ``steward worker`` subprocesses, stopped after the test."""
    started: list[WorkerProcess] = []

    def start(**overrides: Any) -> WorkerProcess:
        proc = WorkerProcess(settings, **overrides)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(scope="module")
def tool_server() -> Iterator[ToolServer]:
    """The misbehaving tool server (tests/fakes/tool_server.py), one per module."""
    with ToolServer() as server:
        yield server


@pytest_asyncio.fixture(loop_scope="session")
async def sign_in(app: FastAPI, sessionmaker: async_sessionmaker[AsyncSession]) -> AsyncIterator[SignIn]:
    """``await sign_in(tenant, roles)``: a browser (cookies kept) signed in as a new local member."""
    browsers: list[httpx.AsyncClient] = []

    async def make(tenant: TenantKey, roles: tuple[str, ...] = ("viewer",)) -> httpx.AsyncClient:
        username, password = f"user-{secrets.token_hex(4)}", secrets.token_urlsafe(16)
        ctx = Ctx(tenant_id=tenant.tenant_id, principal="system", roles=frozenset({"admin"}))
        async with sessionmaker() as db:
            await bind_tenant(db, tenant.tenant_id)
            await tenants_service.add_member(db, app.state.runtime.pg, ctx, issuer="local", subject=username,
                                             roles=roles, name=username)
            await db.commit()
        await app.state.runtime.pg.execute(
            "UPDATE app_user SET password_hash = $1 WHERE issuer = 'local' AND subject = $2",
            hash_password(password), username,
        )
        browser = app_client(app)
        browsers.append(browser)
        page = await browser.get("/auth/login")
        fields = first_form(page.text).fields
        answer = await browser.post("/auth/local", data={**fields, "username": username, "password": password})
        assert answer.status_code == 303, answer.text
        return browser

    yield make
    for browser in browsers:
        await browser.aclose()
