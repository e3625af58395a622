"""Hostile-input helpers: the tenant under attack, and the API in a child process.

The child process is for inputs that might hang a parser (recursive YAML aliases, costly CEL): a request
to it can time out and the process be killed, where an in-process call would hang the test run itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import httpx
import pytest

from app.config import Settings
from tests.support.env import ROOT
from tests.support.net import free_port
from tests.support.tenants import TenantKey

STARTUP_S = 60.0


@dataclass(frozen=True)
class World:
    """A tenant holding a workflow, a run of it, a tool, a provider and a secret, all named ``h*``."""

    tenant: TenantKey
    run_id: uuid.UUID


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
        port = free_port()
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
