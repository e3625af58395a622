"""Outage fixtures: a private PostgreSQL and a private Redis that tests stop and start, the API on them
in this process, real worker subprocesses whose logs are kept, and the tool server counting calls.

The machine's shared servers are never touched (tests/outages/servers.py). PostgreSQL's data lives
under ``.steward-test-outages/<xdist worker>/pg`` (gitignored) and is kept between sessions; each session
makes its own database there.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from app.config import Settings
from app.db import make_engine, make_sessionmaker, run_migrations
from app.tenants import service as tenants_service
from app.vault.crypto import new_key
from tests.conftest import ROOT, _worker_id
from tests.engine.conftest import WorkerProcess
from tests.fakes.tool_server import ToolServer
from tests.outages.servers import PrivatePostgres, PrivateRedis

# A log record of ours starts with its UTC time (app/logs.py); its traceback, if any, is indented below.
RECORD = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ")


@pytest.fixture(scope="session")
def private_pg() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres(ROOT / ".steward-test-outages" / _worker_id() / "pg")
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


@dataclass
class Api:
    app: FastAPI
    client: httpx.AsyncClient
    headers: dict[str, str]


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


class LoggedWorker:
    """A ``steward worker`` subprocess whose stderr is read as it comes (a full pipe would stall it)."""

    def __init__(self, settings: Settings, **overrides: Any) -> None:
        self.process = WorkerProcess(settings, **overrides)
        self.lines: list[str] = []
        stream = self.process.proc.stderr
        assert stream is not None
        self._reader = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    @property
    def alive(self) -> bool:
        return self.process.proc.poll() is None

    def records(self) -> list[str]:
        """The log records written so far (first lines only; continuation lines are tracebacks)."""
        return [line for line in self.lines if RECORD.match(line)]

    def said(self, text: str) -> int:
        return sum(1 for line in self.records() if text in line)

    def stop(self) -> None:
        self.process.stop()
        self._reader.join(timeout=10)


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


async def slow_tool_workflow(api: Api, tools: ToolServer, seconds: float, steps: int = 3) -> str:
    """A write tool taking ``seconds`` on the tool server, and a workflow of ``steps`` calls to it in a
    chain; returns the workflow's name. The server counts calls per Idempotency-Key."""
    tool = {"name": "slow_write", "description": "a write that takes a moment", "input_schema": {"type": "object"},
            "executor": {"kind": "http", "method": "POST", "url": f"{tools.url}/hang?seconds={seconds:g}"},
            "effect": "write"}
    r = await api.client.post("/api/v1/tools", json=tool, headers=api.headers)
    assert r.status_code in (200, 201), r.text
    chain = [{"id": f"s{i}", "tool": "slow_write", "args": {"n": i}, **({"needs": [f"s{i - 1}"]} if i else {})}
             for i in range(steps)]
    name = f"wf_{secrets.token_hex(4)}"
    r = await api.client.post("/api/v1/workflows", json={"name": name, "definition": {"steps": chain}},
                              headers=api.headers)
    assert r.status_code in (200, 201), r.text
    return name


async def until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Wait for ``condition`` (a safety bound only: outages are slow, but they do end)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if condition():
            return
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)


async def start_run(api: Api, workflow: str) -> str:
    r = await api.client.post("/api/v1/runs", json={"workflow": workflow, "input": {}}, headers=api.headers)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def finished(api: Api, run_id: str) -> dict[str, Any]:
    """The run once it is terminal (long polls until then)."""
    async with asyncio.timeout(120):
        while True:
            r = await api.client.get(f"/api/v1/runs/{run_id}", params={"wait": 30}, headers=api.headers)
            assert r.status_code == 200, r.text
            run: dict[str, Any] = r.json()
            if run["status"] in ("succeeded", "failed", "cancelled"):
                return run
