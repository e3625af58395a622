"""Registering tools through the REST API."""

from __future__ import annotations

from typing import Any

import httpx


async def register(client: httpx.AsyncClient, headers: dict[str, str], **spec: Any) -> dict[str, Any]:
    """``POST /api/v1/tools`` with a read tool's defaults overridden by ``spec``; the tool as returned."""
    body = {"description": "a test tool", "input_schema": {"type": "object"}, "effect": "read", **spec}
    r = await client.post("/api/v1/tools", json=body, headers=headers)
    assert r.status_code in (200, 201), r.text
    return dict(r.json())


def http_tool(url: str, **extra: Any) -> dict[str, Any]:
    """An ``http`` executor POSTing to ``url``."""
    return {"kind": "http", "method": "POST", "url": url, **extra}
