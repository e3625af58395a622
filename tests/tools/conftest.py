"""Fixtures for tool tests: a real misbehaving tool server, workers (from the engine tests), helpers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.engine.conftest import worker, worker_process  # noqa: F401  (fixtures)
from tests.fakes.tool_server import ToolServer


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
