"""Model providers through the REST API, pointing at the scripted model server (tests/fakes)."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from tests.fakes.model_server import ModelServer

PRICE = {"input_per_mtok": "2.00", "output_per_mtok": "8.00"}


def model_name() -> str:
    """A model name of its own: scripts are per model, so tests sharing the server never mix."""
    return f"m-{uuid.uuid4().hex[:8]}"


async def add_provider(client: httpx.AsyncClient, headers: dict[str, str], server: ModelServer, *models: str,
                       name: str = "local", price: dict[str, Any] | None = None, **extra: Any) -> None:
    body = {"base_url": server.url, "models": {m: price or PRICE for m in models}, **extra}
    r = await client.put(f"/api/v1/providers/{name}", json=body, headers=headers)
    assert r.status_code in (200, 201), r.text
