"""Engine test helpers: workers in this process or as real subprocesses, and run helpers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest_asyncio

from app.config import Settings
from workers.main import run_worker

ROOT = Path(__file__).resolve().parents[2]

# Fast engine settings for tests: short backoffs, a reconciler every second, short leases.
FAST = {
    "retry_backoff_base_s": 0.05,
    "retry_backoff_max_s": 1.0,
    "reconcile_interval_s": 1.0,
    "outbox_stale_s": 1.0,
    "lease_s": 2.0,
    "worker_shutdown_grace_s": 2.0,
}


@pytest_asyncio.fixture(loop_scope="session")
async def worker(settings: Settings) -> AsyncIterator[Settings]:
    """An arq worker (all three priority queues) running in this process for the test."""
    fast = settings.model_copy(update=FAST)
    task = asyncio.create_task(run_worker(fast, concurrency=10))
    await asyncio.sleep(0.05)
    yield fast
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


class WorkerProcess:
    """``steward worker`` as a real subprocess, so a test can SIGKILL it."""

    def __init__(self, settings: Settings, **overrides: Any) -> None:
        env = {
            **os.environ,
            "DATABASE_URL": settings.database_url or "",
            "REDIS_URL": settings.redis_url or "",
            "STEWARD_QUEUE_PREFIX": settings.queue_prefix,
            "STEWARD_HTTP_ALLOW_PRIVATE_NETWORKS": "true",
            "STEWARD_SECRET_KEYS": settings.secret_keys or "",
        }
        for key, value in {**FAST, **overrides}.items():
            env[f"STEWARD_{key.upper()}"] = str(value)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker", "--concurrency", "5"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc.stderr:
            self.proc.stderr.close()


@pytest_asyncio.fixture(loop_scope="session")
async def worker_process(settings: Settings) -> AsyncIterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(**overrides: Any) -> WorkerProcess:
        proc = WorkerProcess(settings, **overrides)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


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


def name() -> str:
    """A workflow name of its own, so tests never see each other's workflows."""
    return f"wf_{uuid.uuid4().hex[:8]}"
