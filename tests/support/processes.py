"""``steward api`` and ``steward worker`` as real processes on the test's database and Redis."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from app.config import Settings
from tests.support.env import ROOT
from tests.support.net import free_port, get_once_up


@asynccontextmanager
async def api_and_worker(settings: Settings, logs: Path, **env: str) -> AsyncIterator[str]:
    """Both processes, their stderr in ``logs``/api.log and worker.log, with ``env`` on top of the test's
    settings; yields the API's URL once it is ready, and stops both (their last lines written, their
    buffers flushed) on the way out."""
    port = free_port()
    environment = {
        **os.environ, "DATABASE_URL": settings.database_url or "", "REDIS_URL": settings.redis_url or "",
        "STEWARD_QUEUE_PREFIX": settings.queue_prefix, "STEWARD_SECRET_KEYS": settings.secret_keys or "",
        "STEWARD_HTTP_ALLOW_PRIVATE_NETWORKS": "true", "PYTHONUNBUFFERED": "1", **env,
    }
    processes = []
    try:
        for command, log in ((["api", "--port", str(port)], "api.log"), (["worker"], "worker.log")):
            with open(logs / log, "wb") as stderr:  # noqa: ASYNC230  # the child writes it, not us
                processes.append(await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "app.cli", *command, cwd=ROOT, env=environment,
                    stdout=asyncio.subprocess.DEVNULL, stderr=stderr))
        url = f"http://127.0.0.1:{port}"
        await get_once_up(f"{url}/readyz", ready=lambda answer: answer.status_code == 200)
        yield url
    finally:
        for process in processes:
            if process.returncode is None:
                process.terminate()
        for process in processes:
            await asyncio.wait_for(process.wait(), timeout=60)
