#!/usr/bin/env python3
"""Audit export and verification at a million rows, through a real API server.

Creates a scratch database, migrates it, makes a tenant with an admin key and fills its audit chain
with N rows (default 1,000,000): the chain is computed in Python with app.audit.chain.row_hash, exactly
as the product would have, and loaded with COPY, so every row verifies. Then starts ``steward api``
(uvicorn) as a child process and, per run, streams ``GET /api/v1/audit/export`` as JSONL and as CSV
(wall time, rows/s, bytes, the server's peak RSS over the transfer) and calls ``GET /api/v1/audit/verify``
(time, and that it says ok). At the end it applies retention to about half the chain and verifies again
(the chain must still verify, anchored). The client checks what it received: row counts, and that the last JSONL
line's hash is the chain head the server announced. Prints a markdown table with every run and the
medians, then stops the server and drops the database.

    .venv/bin/python bench/audit_export.py [--rows 1000000] [--runs 3] [--pg postgresql://...] [--redis redis://...]

Peak RSS: the server's VmHWM, reset before each measurement through /proc/<pid>/clear_refs where the
kernel allows it, else sampled from VmRSS every 20 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import httpx  # noqa: E402

from app.audit.chain import ChainRow, row_hash  # noqa: E402
from app.db import run_migrations  # noqa: E402
from app.pg import setup_connection  # noqa: E402
from tests.support.net import free_port  # noqa: E402

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379/12"
COPY_BATCH = 50_000
COLUMNS = ("tenant_id", "seq", "at", "actor", "ip", "user_agent", "action", "target", "outcome", "data",
           "prev_hash", "hash")
ACTIONS = ("run.start", "run.cancel", "approval.decide", "tool.call", "workflow.create", "secret.put")


# --- the fill ------------------------------------------------------------------------------------------


def chain_rows(tenant_id: uuid.UUID, start_seq: int, prev: str, n: int) -> Iterator[tuple[Any, ...]]:
    """``n`` plausible events chained after ``(start_seq - 1, prev)``, an hour of history per 3,600 rows."""
    t0 = datetime.now(UTC) - timedelta(seconds=n)
    keys = [f"key:{uuid.uuid4()}" for _ in range(20)]
    for i in range(n):
        seq = start_seq + i
        action = ACTIONS[i % len(ACTIONS)]
        data = {"workflow": f"invoice-triage-{i % 7}", "version": 1 + i % 5, "step": f"step-{i % 12}",
                "idempotency_key": None if i % 3 else f"req-{i}", "args": {"amount": i % 1000, "currency": "EUR"}}
        row = ChainRow(tenant_id, seq, t0 + timedelta(seconds=i), keys[i % 20], f"10.0.{i % 256}.{i % 200}",
                       "steward-sdk/1.4 python/3.12", action, f"run:{uuid.UUID(int=i)}", "ok", data, prev)
        prev = row_hash(row)
        yield (tenant_id, seq, row.at, row.actor, row.ip, row.user_agent, action, row.target, "ok",
               json.dumps(data, separators=(",", ":")), row.prev_hash, prev)


async def fill(database_url: str, n: int) -> tuple[str, str, int]:
    """A tenant with an admin key and ``n`` more chained audit rows: (tenant name, key, rows in chain)."""
    from bench.engine import bootstrap

    boot = await bootstrap(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        await setup_connection(conn)
        await conn.execute("SET synchronous_commit = off")
        async with conn.transaction():
            head = await conn.fetchrow("SELECT seq, hash FROM audit_head WHERE tenant_id = $1 FOR UPDATE",
                                       boot.tenant_id)
            seq, prev = (int(head["seq"]), str(head["hash"])) if head else (0, "0" * 64)
            rows = chain_rows(boot.tenant_id, seq + 1, prev, n)
            last: tuple[Any, ...] | None = None
            while batch := [r for _, r in zip(range(COPY_BATCH), rows, strict=False)]:
                await conn.copy_records_to_table("audit_event", records=batch, columns=COLUMNS)
                last = batch[-1]
            assert last is not None
            await conn.execute(
                "INSERT INTO audit_head (tenant_id, seq, hash) VALUES ($1, $2, $3) "
                "ON CONFLICT (tenant_id) DO UPDATE SET seq = EXCLUDED.seq, hash = EXCLUDED.hash",
                boot.tenant_id, last[1], last[11],
            )
        await conn.execute("VACUUM ANALYZE audit_event")
        total = await conn.fetchval("SELECT count(*) FROM audit_event WHERE tenant_id = $1", boot.tenant_id)
    finally:
        await conn.close()
    return "bench", boot.api_key, int(total)


# --- the server ----------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    if sys.platform == "linux":
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_api(database_url: str, redis_url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    steward = ROOT / ".venv" / "bin" / "steward"
    cmd = [str(steward)] if steward.exists() else [sys.executable, "-m", "app.cli"]
    env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1",
           "STEWARD_QUEUE_PREFIX": f"stwbench-{secrets.token_hex(4)}"}
    with open(log, "wb") as err:
        proc = subprocess.Popen([*cmd, "api", "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True,
                                preexec_fn=_die_with_parent)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"steward api exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        time.sleep(0.2)
    raise RuntimeError(f"steward api not ready after 60 s: {log.read_text()[-2000:]}")


class PeakRss:
    """The server's peak resident memory over a measurement (MiB)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.resettable = self._reset()
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _status(self, field: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])  # kB
        raise KeyError(field)

    def _reset(self) -> bool:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            return False
        return True

    def rss(self) -> float:
        return self._status("VmRSS") / 1024

    def __enter__(self) -> PeakRss:
        if not self._reset():
            self._peak = self._status("VmRSS")

            def sample() -> None:
                while not self._stop.wait(0.02):
                    self._peak = max(self._peak, self._status("VmRSS"))

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        else:
            self._peak = self._status("VmHWM")

    @property
    def peak(self) -> float:
        return self._peak / 1024


# --- the measurements ----------------------------------------------------------------------------------


class Probe:
    """``GET /healthz`` every 50 ms on its own connection while a measurement runs: is the server's event
    loop still answering others?"""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=30) as client:
            while not self._stop.wait(0.05):
                started = time.perf_counter()
                client.get("/healthz").raise_for_status()
                self.samples.append((time.perf_counter() - started) * 1000)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> str:
        if not self.samples:
            return "n/a"
        ordered = sorted(self.samples)
        return f"{statistics.median(ordered):.0f} / {ordered[int(len(ordered) * 0.99)]:.0f} / {ordered[-1]:.0f}"


@dataclass
class Measure:
    run: int
    what: str
    rows: int
    bytes: int
    seconds: float
    rss_before: float
    rss_peak: float
    rss_after: float
    healthz: str
    note: str = ""


def export(client: httpx.Client, pid: int, run: int, fmt: str, expect: int) -> Measure:
    rss_before = PeakRss(pid).rss()
    lines = size = 0
    tail = b""
    with PeakRss(pid) as peak, Probe(str(client.base_url)) as probe:
        started = time.perf_counter()
        with client.stream("GET", "/api/v1/audit/export", params={"format": fmt}) as response:
            response.raise_for_status()
            head_hash = response.headers["steward-audit-head-hash"]
            for chunk in response.iter_bytes():
                size += len(chunk)
                lines += chunk.count(b"\n")
                tail = (tail + chunk)[-4096:]
        seconds = time.perf_counter() - started
    rows = lines - (fmt == "csv")
    if rows != expect:
        raise RuntimeError(f"{fmt} export: {rows} rows, expected {expect}")
    note = ""
    if fmt == "jsonl":
        last = json.loads(tail.rstrip(b"\n").rsplit(b"\n", 1)[-1])
        if last["hash"] != head_hash:
            raise RuntimeError("the last exported row is not the announced chain head")
        note = "last row = head"
    return Measure(run, f"export {fmt}", rows, size, seconds, rss_before, peak.peak, PeakRss(pid).rss(),
                   probe.summary(), note)


def verify(client: httpx.Client, pid: int, run: int, expect: int) -> Measure:
    rss_before = PeakRss(pid).rss()
    with PeakRss(pid) as peak, Probe(str(client.base_url)) as probe:
        started = time.perf_counter()
        response = client.get("/api/v1/audit/verify")
        seconds = time.perf_counter() - started
    response.raise_for_status()
    body = response.json()
    if not body["ok"] or body["rows"] != expect:
        raise RuntimeError(f"verify: {body}")
    return Measure(run, "verify", body["rows"], len(response.content), seconds, rss_before, peak.peak,
                   PeakRss(pid).rss(), probe.summary(), "ok")


async def retention_then_verify(database_url: str, client: httpx.Client, days: int) -> str:
    """Apply retention to about half the chain, as the reconciler would (without its per-pass cap)."""
    from app.audit.retention import apply_retention

    conn = await asyncpg.connect(database_url)
    try:
        await setup_connection(conn)
        started = time.perf_counter()
        deleted = await apply_retention(conn, days)
        seconds = time.perf_counter() - started
    finally:
        await conn.close()
    started = time.perf_counter()
    body = await asyncio.to_thread(lambda: client.get("/api/v1/audit/verify").json())
    verify_s = time.perf_counter() - started
    if not body["ok"] or body["anchored_at_seq"] is None:
        raise RuntimeError(f"verify after retention: {body}")
    return (f"Retention ({days} days): deleted {deleted:,} rows in {seconds:.1f} s ({deleted / seconds:,.0f} rows/s, "
            f"transactions of at most 10,000 rows); verify afterwards: ok, {body['rows']:,} rows anchored at seq "
            f"{body['anchored_at_seq']:,}, {verify_s:.1f} s")


def table(measures: list[Measure]) -> str:
    out = ["| run | what | rows | MB | s | rows/s | MB/s | server RSS before MiB | peak MiB | after MiB "
           "| /healthz ms p50 / p99 / max meanwhile | check |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for m in measures:
        out.append(f"| {m.run} | {m.what} | {m.rows:,} | {m.bytes / 1e6:,.1f} | {m.seconds:.2f} | "
                   f"{m.rows / m.seconds:,.0f} | {m.bytes / 1e6 / m.seconds:,.1f} | {m.rss_before:.0f} | "
                   f"{m.rss_peak:.0f} | {m.rss_after:.0f} | {m.healthz} | {m.note} |")
    return "\n".join(out)


def medians(measures: list[Measure]) -> str:
    out = ["| what | median s | median rows/s | median MB/s | max peak RSS MiB |", "|---|---:|---:|---:|---:|"]
    for what in dict.fromkeys(m.what for m in measures):
        ms = [m for m in measures if m.what == what]
        s = statistics.median(m.seconds for m in ms)
        out.append(f"| {what} | {s:.2f} | {statistics.median(m.rows / m.seconds for m in ms):,.0f} | "
                   f"{statistics.median(m.bytes / 1e6 / m.seconds for m in ms):,.1f} | "
                   f"{max(m.rss_peak for m in ms):.0f} |")
    return "\n".join(out)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{nproc} CPUs ({cpu}), {platform.system()} {platform.release()}, Python {platform.python_version()}"


def main(args: argparse.Namespace) -> int:
    name = f"steward_auditbench_{secrets.token_hex(4)}"
    admin_url = args.pg
    database_url = urlunsplit(urlsplit(admin_url)._replace(path="/" + name))
    logdir = Path(tempfile.mkdtemp(prefix="steward-auditbench-"))
    proc: subprocess.Popen[bytes] | None = None

    async def admin(sql: str) -> str:
        conn = await asyncpg.connect(admin_url)
        try:
            return str(await conn.execute(sql))
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        run_migrations(database_url)
        started = time.perf_counter()
        _, key, total = asyncio.run(fill(database_url, args.rows))
        print(f"filled {total:,} chained audit rows in {time.perf_counter() - started:.0f} s "
              f"(database {name})", file=sys.stderr, flush=True)
        port = free_port()
        proc = start_api(database_url, args.redis, port, logdir / "api.log")
        pid = proc.pid
        measures: list[Measure] = []
        with Probe(f"http://127.0.0.1:{port}") as idle:
            time.sleep(3)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"},
                          timeout=httpx.Timeout(600, connect=10)) as client:
            for run in range(1, args.runs + 1):
                for fmt in ("jsonl", "csv", "verify"):
                    measures.append(verify(client, pid, run, total) if fmt == "verify"
                                    else export(client, pid, run, fmt, total))
                    print(table(measures[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
            retained = asyncio.run(retention_then_verify(database_url, client, args.retention_days))
        print(f"Machine: {machine()}")
        print(f"Command: {' '.join([os.path.relpath(sys.executable), *sys.argv])}")
        print(f"Rows: {total:,} in one tenant's chain; server: steward api (uvicorn, one process); "
              f"/healthz ms p50 / p99 / max when idle: {idle.summary()}\n")
        print(table(measures))
        print()
        print(medians(measures))
        print()
        print(retained)
        return 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        shutil.rmtree(logdir, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pg", default=DEFAULT_PG, help="admin URL allowed to CREATE DATABASE")
    parser.add_argument("--redis", default=DEFAULT_REDIS, help="Redis URL for the API (rate limits, relay)")
    parser.add_argument("--retention-days", type=int, default=6,
                        help="at the end, apply retention with this many days (the fill spans rows/86,400 days)")
    sys.exit(main(parser.parse_args()))
