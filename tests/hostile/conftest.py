"""Fixtures for hostile-input tests: a tenant with one of everything, and an API in a child process.

The child process is for inputs that might hang a parser (recursive YAML aliases, costly CEL): a request
to it can time out and the process be killed, where an in-process call would hang the test run itself.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from app.config import Settings
from tests.conftest import MakeTenant, TenantKey

ROOT = Path(__file__).resolve().parents[2]
STARTUP_S = 60.0


@dataclass(frozen=True)
class World:
    """A tenant holding a workflow, a run of it, a tool, a provider and a secret, all named ``h*``."""

    tenant: TenantKey
    run_id: uuid.UUID


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def world(app: FastAPI, make_tenant: MakeTenant) -> World:
    tenant = await make_tenant()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=tenant.headers) as http:
        for method, url, body in (
            ("POST", "/api/v1/workflows", {"name": "hw", "definition": {"steps": [
                {"id": "a", "wait": {"signal": "go"}}]}}),
            ("POST", "/api/v1/tools", TOOL),
            ("PUT", "/api/v1/secrets/hs", {"value": "v"}),
            ("PUT", "/api/v1/providers/hp", PROVIDER),
        ):
            response = await http.request(method, url, json=body)
            assert response.status_code < 300, response.text
        response = await http.post("/api/v1/runs", json={"workflow": "hw"})
        assert response.status_code == 201, response.text
    return World(tenant, uuid.UUID(response.json()["id"]))


TOOL = {
    "name": "ht",
    "description": "a tool",
    "input_schema": {"type": "object"},
    "executor": {"kind": "http", "url": "https://example.com/x"},
    "effect": "read",
}
PROVIDER = {"base_url": "https://example.com/v1", "models": {"m": {"input_per_mtok": "1", "output_per_mtok": "2"}}}


class ApiProcess:
    """``steward api`` in a child process on a free loopback port; ``restart()`` after a request hung it."""

    def __init__(self, settings: Settings) -> None:
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("STEWARD_")},
            "DATABASE_URL": settings.database_url or "",
            "REDIS_URL": settings.redis_url or "",
            "STEWARD_SECRET_KEYS": settings.secret_keys or "",
            "STEWARD_QUEUE_PREFIX": settings.queue_prefix,
            "STEWARD_HTTP_ALLOW_PRIVATE_NETWORKS": "true",
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.base_url = ""

    def start(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "api", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "steward api exited during startup"
            try:
                if httpx.get(self.base_url + "/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)  # polling for the server to listen: there is no event to wait on
        pytest.fail("steward api did not answer /healthz in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="module")
def api_process(settings: Settings) -> Iterator[ApiProcess]:
    """For one module only: like a second API replica, it relays the outbox while it runs."""
    process = ApiProcess(settings)
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def remote(api_process: ApiProcess, world: World) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=api_process.base_url, headers=world.tenant.headers) as http:
        yield http
