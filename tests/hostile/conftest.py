"""Fixtures for hostile-input tests: a tenant with one of everything, and an API in a child process
(helpers: tests/support/hostile.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from app.config import Settings
from tests.support.hostile import PROVIDER, TOOL, ApiProcess, World
from tests.support.tenants import MakeTenant


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
