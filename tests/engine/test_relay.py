"""The outbox relay against a real Redis server that goes away and comes back."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import httpx
import pytest
from arq.connections import RedisSettings, create_pool

from app.config import Settings
from app.engine.outbox import Relay
from app.engine.unit_of_work import Job
from tests.support.net import free_port
from tests.support.runs import create_workflow, name, start_run
from tests.support.tenants import MakeTenant

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")


class RedisServer:
    def __init__(self, port: int, workdir: str) -> None:
        self.port, self.workdir = port, workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.workdir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.1).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("redis-server exited") from None
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with tempfile.TemporaryDirectory() as workdir:
        server = RedisServer(free_port(), workdir)
        server.start()
        try:
            yield server
        finally:
            server.stop()


async def test_relay_keeps_jobs_while_redis_is_down_and_delivers_them_when_it_returns(
    redis_server: RedisServer,
) -> None:
    settings = RedisSettings(port=redis_server.port, conn_timeout=1, conn_retries=0)
    pool = await create_pool(settings)
    relay = Relay(pool, retry_s=0.1, queue_prefix="relaytest")
    relay.start()
    try:
        redis_server.stop()
        jobs = [Job("step", f"attempt-{i}", "relaytest:normal") for i in range(3)]
        await relay.send(jobs)
        assert relay.backlog == 3  # kept, not lost
        await asyncio.sleep(0.3)
        redis_server.start()
        for _ in range(100):
            if relay.backlog == 0:
                break
            await asyncio.sleep(0.05)
        assert relay.backlog == 0
        queued = await pool.zrange("relaytest:normal", 0, -1)
        assert sorted(q.decode() for q in queued) == ["attempt-0", "attempt-1", "attempt-2"]
        # Sending the same jobs again (the reconciler does) queues nothing twice.
        await relay.send(jobs)
        assert await pool.zcard("relaytest:normal") == 3
    finally:
        await relay.stop()
        await pool.aclose()


async def test_the_api_starts_and_takes_runs_while_redis_is_down(settings: Settings, make_tenant: MakeTenant) -> None:
    from app.main import create_app

    app = create_app(settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"}))
    tenant = await make_tenant()
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            ready = await client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["redis"] == "down"
            wf = name()
            await create_workflow(client, tenant.headers, wf, [{"id": "a", "tool": "echo"}])
            run = await start_run(client, tenant.headers, wf)
            assert run["status"] == "queued"
            # The job waits in the relay (and in the outbox, for the reconciler) until Redis is back.
            assert app.state.runtime.relay.backlog >= 1


async def test_steward_api_and_worker_start_without_redis(settings: Settings) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url or "",
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "STEWARD_QUEUE_PREFIX": settings.queue_prefix,
    }
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app.cli",
        "worker",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    # The worker says so once and waits for Redis, as through an outage, instead of exiting.
    assert worker.stderr is not None
    seen = rest = b""
    try:
        async with asyncio.timeout(60):
            while b"Redis unreachable" not in seen:
                line = await worker.stderr.readline()
                assert line, f"steward worker exited ({await worker.wait()}): {seen.decode()}"
                seen += line
        assert b"warning: cannot connect to Redis" in seen and worker.returncode is None
    finally:
        if worker.returncode is None:
            worker.terminate()
        try:
            _, rest = await asyncio.wait_for(worker.communicate(), timeout=20)
        except TimeoutError:
            worker.kill()
            raise
    assert worker.returncode == 0
    assert b"Traceback" not in seen + rest

    port = free_port()
    api = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app.cli",
        "api",
        "--port",
        str(port),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        ready = None
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(300):
                try:
                    ready = await client.get("/readyz")
                    break
                except httpx.TransportError:
                    assert api.returncode is None, "steward api exited"
                    await asyncio.sleep(0.1)
        assert ready is not None and ready.status_code == 503
        assert ready.json()["checks"] == {"database": "ok", "redis": "down"}
    finally:
        api.terminate()
        _, api_err = await asyncio.wait_for(api.communicate(), timeout=20)
    assert b"warning: cannot connect to Redis" in api_err
