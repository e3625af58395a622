"""Outage helpers: the API on the private servers, worker subprocesses whose logs are kept, and waiting
for runs and conditions while servers come and go."""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

import httpx
from fastapi import FastAPI

from app.config import Settings
from tests.fakes.tool_server import ToolServer
from tests.support.workers import WorkerProcess

# A log record of ours starts with its UTC time (app/logs.py); its traceback, if any, is indented below.


@dataclass
class Api:
    app: FastAPI
    client: httpx.AsyncClient
    headers: dict[str, str]


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
        """The log records written so far (the worker writes one JSON object a line), each as
        ``time level logger: message``; lines that are no record (the command's own warnings) left out."""
        entries = [json.loads(line) for line in self.lines if line.startswith("{")]
        return [f"{e['time']} {e['level']} {e['logger']}: {e['message']}" for e in entries]

    def tracebacks(self) -> list[str]:
        """Lines that are no log record (a traceback printed outside logging) or a record carrying one."""
        return [line for line in self.lines if line.startswith("{") and "exception" in json.loads(line)
                or not line.startswith("{") and not line.startswith("steward worker: ")]

    def said(self, text: str) -> int:
        return sum(1 for line in self.records() if text in line)

    def stop(self) -> None:
        self.process.stop()
        self._reader.join(timeout=10)


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
