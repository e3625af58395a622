"""Fixtures for model and agent steps: a scripted model server, a tool server, providers."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.engine.conftest import worker, worker_process  # noqa: F401  (fixtures)
from tests.fakes.model_server import ModelServer
from tests.tools.conftest import strict_worker, tool_server  # noqa: F401  (fixtures)

PRICE = {"input_per_mtok": "2.00", "output_per_mtok": "8.00"}


@pytest.fixture(scope="module")
def model_server() -> Iterator[ModelServer]:
    with ModelServer() as server:
        yield server


def model_name() -> str:
    """A model name of its own: scripts are per model, so tests sharing the server never mix."""
    return f"m-{uuid.uuid4().hex[:8]}"


async def add_provider(client: httpx.AsyncClient, headers: dict[str, str], server: ModelServer, *models: str,
                       name: str = "local", price: dict[str, Any] | None = None, **extra: Any) -> None:
    body = {"base_url": server.url, "models": {m: price or PRICE for m in models}, **extra}
    r = await client.put(f"/api/v1/providers/{name}", json=body, headers=headers)
    assert r.status_code in (200, 201), r.text


async def run_events(client: httpx.AsyncClient, headers: dict[str, str], run_id: str) -> list[dict[str, Any]]:
    r = await client.get(f"/api/v1/runs/{run_id}/events", params={"limit": 500}, headers=headers)
    assert r.status_code == 200, r.text
    return list(r.json()["items"])
