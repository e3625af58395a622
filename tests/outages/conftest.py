"""Outage fixtures: a private PostgreSQL and a private Redis that tests stop and start, the API on them
in this process, real worker subprocesses whose logs are kept, and the tool server counting calls.

The machine's shared servers are never touched (tests/support/servers.py). PostgreSQL's data lives
under ``.steward-test-outages/<xdist worker>/pg`` (gitignored) and is kept between sessions; each session
makes its own database there. Helpers: tests/support/outages.py.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio

from app.config import Settings
from app.db import make_engine, make_sessionmaker, run_migrations
from app.tenants import service as tenants_service
from app.vault.crypto import new_key
from tests.fakes.tool_server import ToolServer
from tests.support.env import ROOT, worker_id
from tests.support.outages import Api, LoggedWorker
from tests.support.servers import PrivatePostgres, PrivateRedis


@pytest.fixture(scope="session")
def private_pg() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres(ROOT / ".steward-test-outages" / worker_id() / "pg")
    pg.start()
    try:
        yield pg
    finally:
        pg.close()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def private_database(private_pg: PrivatePostgres) -> AsyncIterator[str]:
    """A migrated database of this session on the private server (its URL)."""
    name = f"outage_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(host=private_pg.socket_dir, port=private_pg.port, user="postgres",
                                  database="postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = private_pg.admin_url(name)
        await asyncio.to_thread(run_migrations, url)
        yield url
    finally:
        if private_pg.server is not None and not admin.is_closed():
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    redis = PrivateRedis()
    redis.start()
    try:
        yield redis
    finally:
        redis.stop()


@pytest.fixture
def tools() -> Iterator[ToolServer]:
    with ToolServer() as server:
        yield server


@pytest.fixture
def outage_settings(private_database: str, private_redis: PrivateRedis) -> Settings:
    return Settings(
        database_url=private_database,
        redis_url=private_redis.url,
        queue_prefix=f"outage-{secrets.token_hex(4)}",
        http_allow_private_networks=True,
        secret_keys=new_key(),
        db_pool_size=5,
        db_max_overflow=10,
        rate_limit_principal_rps=0,
        rate_limit_tenant_rps=0,
    )


@pytest_asyncio.fixture(loop_scope="session")
async def api(outage_settings: Settings) -> AsyncIterator[Api]:
    """The API (lifespan running) on the private servers, and an admin key of a new tenant."""
    from app.main import create_app

    assert outage_settings.database_url is not None
    engine = make_engine(outage_settings.database_url, pool_size=1, max_overflow=0)
    try:
        async with make_sessionmaker(engine)() as db, db.begin():
            tenant, _ = await tenants_service.get_or_create_tenant(db, f"outage-{secrets.token_hex(4)}")
            key = (await tenants_service.create_api_key(db, tenant.id, name="test", roles=("admin",))).key
    finally:
        await engine.dispose()
    app = create_app(outage_settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            yield Api(app, client, {"Authorization": f"Bearer {key}"})


@pytest.fixture
def workers(outage_settings: Settings) -> Iterator[Callable[..., LoggedWorker]]:
    started: list[LoggedWorker] = []

    def start(**overrides: Any) -> LoggedWorker:
        worker = LoggedWorker(outage_settings, **overrides)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()
