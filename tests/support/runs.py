"""Workflows and runs through the REST API, as a client would drive them."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import httpx


def name() -> str:
    """A workflow name of its own, so tests never see each other's workflows."""
    return f"wf_{uuid.uuid4().hex[:8]}"


async def create_workflow(
    client: httpx.AsyncClient, headers: dict[str, str], name: str, steps: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    r = await client.post(
        "/api/v1/workflows", json={"name": name, "definition": {"steps": steps, **extra}}, headers=headers
    )
    assert r.status_code in (200, 201), r.text
    return dict(r.json())


async def start_run(
    client: httpx.AsyncClient, headers: dict[str, str], workflow: str, input: Any = None, **extra: Any
) -> dict[str, Any]:
    r = await client.post(
        "/api/v1/runs", json={"workflow": workflow, "input": input or {}, **extra}, headers=headers
    )
    assert r.status_code == 201, r.text
    return dict(r.json())


async def wait_run(
    client: httpx.AsyncClient, headers: dict[str, str], run_id: str, timeout: float = 20
) -> dict[str, Any]:
    """The run once it is terminal (a long poll of up to ``timeout`` seconds)."""
    r = await client.get(f"/api/v1/runs/{run_id}", params={"wait": timeout}, headers=headers)
    assert r.status_code == 200, r.text
    return dict(r.json())


async def wait_for(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    run_id: str,
    predicate: Callable[[dict[str, Any]], bool],
    timeout: float = 15,
) -> dict[str, Any]:
    """Poll the run until ``predicate`` holds (for states that are not terminal)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        r = await client.get(f"/api/v1/runs/{run_id}", headers=headers)
        run = dict(r.json())
        if predicate(run):
            return run
        assert asyncio.get_running_loop().time() < deadline, f"timed out; run is {run['status']}: {run}"
        await asyncio.sleep(0.05)


def step(run: dict[str, Any], step_id: str) -> dict[str, Any]:
    return next(s for s in run["steps"] if s["id"] == step_id)


async def run_events(client: httpx.AsyncClient, headers: dict[str, str], run_id: str) -> list[dict[str, Any]]:
    r = await client.get(f"/api/v1/runs/{run_id}/events", params={"limit": 500}, headers=headers)
    assert r.status_code == 200, r.text
    return list(r.json()["items"])
