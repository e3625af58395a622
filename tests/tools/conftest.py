"""Fixtures for tool tests: a real misbehaving tool server, workers (from the engine tests), helpers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from app.config import Settings
from tests.engine.conftest import FAST, worker, worker_process  # noqa: F401  (fixtures)
from tests.fakes.tool_server import ToolServer
from workers.main import run_worker


@pytest.fixture(scope="module")
def tool_server() -> Iterator[ToolServer]:
    with ToolServer() as server:
        yield server


async def register(client: httpx.AsyncClient, headers: dict[str, str], **spec: Any) -> dict[str, Any]:
    body = {"description": "a test tool", "input_schema": {"type": "object"}, "effect": "read", **spec}
    r = await client.post("/api/v1/tools", json=body, headers=headers)
    assert r.status_code in (200, 201), r.text
    return dict(r.json())


def http_tool(url: str, **extra: Any) -> dict[str, Any]:
    return {"kind": "http", "method": "POST", "url": url, **extra}


@pytest_asyncio.fixture(loop_scope="session")
async def strict_worker(settings: Settings) -> AsyncIterator[Settings]:
    """A worker that refuses private addresses unless the tenant allowlists them (the production default)."""
    strict = settings.model_copy(update={**FAST, "http_allow_private_networks": False})
    task = asyncio.create_task(run_worker(strict, concurrency=5))
    await asyncio.sleep(0.05)
    yield strict
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
