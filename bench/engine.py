#!/usr/bin/env python3
"""Engine benchmark: drives a running Steward over its REST API and prints a markdown table.

Scenarios (select with ``--only chain1,chain8,fanout``):

* ``chain1``  chain-10 c=1: a workflow of 10 sequential ``echo`` steps, 50 runs one at a time.
* ``chain8``  chain-10 c=8: the same workflow, 200 runs with 8 in flight.
* ``fanout``  fan-out-100: a ``map`` over 100 items (concurrency 100) and a join step, 3 runs one at a time.

Each run is started with ``POST /api/v1/runs`` and followed with ``GET /api/v1/runs/{id}?wait=30`` (long
poll) until it is terminal. One warm-up run per workflow is made first and not counted.

Reported per scenario: runs, wall time, runs/s, steps/s (step executions counted from the returned run
documents, map items included), the step hand-off time from the server's timestamps (chains: the next
step's attempt start minus the previous step's attempt finish; fan-out: the join's start minus the
latest item finish), the server-side run duration (finished_at - created_at), the run latency seen by
the client (POST sent to terminal response received), and Postgres write transactions per step (the
cluster-wide ``pg_current_xact_id()`` delta over the scenario: xids are only assigned to transactions
that write).

Two modes:

* ``--url http://127.0.0.1:8000 --key stw_...`` measures a product that is already running
  (``--database-url`` adds the transaction count).
* Without ``--url`` the script starts its own: a fresh database ``steward_bench_<random>`` on ``--pg``,
  migrations, a tenant with an admin key, ``steward api`` and ``steward worker`` as child processes
  (Redis database ``--redis``, flushed first, and a queue prefix of their own), and removes it all at
  the end, also on Ctrl-C or error.

Options of the self-hosted mode (none of them changes the default run):

* ``--tenants N``: N tenants, each with its own admin key and its own copy of the workflows; the j-th run of
  client task k goes to tenant ``(k + j * c) % N`` (c: the scenario's concurrency), so chain-10 c=8 with 8
  tenants keeps one run in flight per tenant, and c=1 cycles through them.
* ``--apis N --workers M``: N ``steward api`` processes on ports of their own (every request, each poll
  included, goes to the next one round-robin) and M ``steward worker`` processes, named api-1.. and
  worker-1.. in the CPU figures. Either option also samples the Postgres connections of each process
  (pg_stat_activity rows matched to the process's TCP ports, every second) and reports the peaks.
* ``--soak SECONDS``: instead of the scenarios, the chain-10 loop at ``--chain8-concurrency`` for that
  long, with the resident memory (RSS) of every child sampled after the warm-up and every 10 s; reports
  first, last and peak RSS per process and the growth from first to last (and the connection peaks).

Run it with the project's virtualenv: ``.venv/bin/python bench/engine.py [--json out.json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

try:
    import asyncpg
    import httpx
    import psutil
except ImportError as exc:  # pragma: no cover - a wrong interpreter
    sys.exit(
        f"bench/engine.py: {exc}; run it with the project's virtualenv: .venv/bin/python bench/engine.py"
    )

from tests.support.net import free_port  # noqa: E402

if TYPE_CHECKING:
    from app.tenants.service import Bootstrapped

SCENARIOS = ("chain1", "chain8", "fanout")
CHAIN_WORKFLOW = "bench-chain-10"
FANOUT_WORKFLOW = "bench-fanout-100"
TERMINAL = {"succeeded", "failed", "cancelled"}
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379/12"
STDERR_TAIL_LINES = 40
SOAK_SAMPLE_S = 10.0  # RSS sampling period of --soak
CONN_SAMPLE_S = 1.0  # pg_stat_activity sampling period of --apis / --workers / --soak

# The aims the numbers are read against (docs/benchmarks.md).
AIM_CHAIN1_HANDOFF_P50_MS = 2.0
AIM_CHAIN8_STEPS_PER_S = 550.0
AIM_CHAIN8_HANDOFF_P99_MS = 25.0
AIM_FANOUT_RUN_MS = 150.0
AIM_WRITE_TX_PER_STEP = 2.0


class BenchError(Exception):
    """A failure that stops the benchmark, reported as a message (plus the children's stderr tails)."""


# --- workflows ---------------------------------------------------------------------------------------


def chain_definition(n: int) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    for i in range(1, n + 1):
        step: dict[str, Any] = {"id": f"s{i}", "tool": "echo", "args": {"i": i}}
        if i > 1:
            step["needs"] = [f"s{i - 1}"]
        steps.append(step)
    return {"steps": steps}


def fanout_definition(concurrency: int) -> dict[str, Any]:
    return {
        "steps": [
            {
                "id": "fan",
                "map": {
                    "items": "${{ input.items }}",
                    "tool": "echo",
                    "args": {"v": "${{ item }}"},
                    "concurrency": concurrency,
                },
            },
            {"id": "join", "needs": ["fan"], "tool": "echo", "args": {"n": "${{ size(steps.fan.output) }}"}},
        ],
    }


# --- statistics --------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def ms_between(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return (end - start).total_seconds() * 1000.0


def last_attempt(obj: dict[str, Any]) -> dict[str, Any]:
    """The last attempt of a step or map item, falling back to the object's own timestamps."""
    attempts = obj.get("attempts") or []
    if attempts:
        return dict(attempts[-1])
    return {"started_at": obj.get("started_at"), "finished_at": obj.get("finished_at")}


def step_executions(run: dict[str, Any]) -> int:
    """Attempts of plain steps plus attempts of map items (a map step itself executes nothing)."""
    total = 0
    for step in run.get("steps", []):
        items = step.get("items")
        if items is not None:
            total += sum(len(item.get("attempts") or []) for item in items)
        else:
            total += len(step.get("attempts") or [])
    return total


def chain_handoffs(run: dict[str, Any]) -> list[float]:
    steps = run.get("steps", [])
    out: list[float] = []
    for prev, nxt in zip(steps, steps[1:], strict=False):
        gap = ms_between(ts(last_attempt(prev).get("finished_at")), ts(last_attempt(nxt).get("started_at")))
        if gap is not None:
            out.append(gap)
    return out


def fanout_handoffs(run: dict[str, Any]) -> list[float]:
    by_id = {s["id"]: s for s in run.get("steps", [])}
    fan, join = by_id.get("fan"), by_id.get("join")
    if not fan or not join:
        return []
    finishes = [ts(last_attempt(item).get("finished_at")) for item in fan.get("items") or []]
    finishes_known = [f for f in finishes if f is not None]
    if not finishes_known:
        return []
    gap = ms_between(max(finishes_known), ts(last_attempt(join).get("started_at")))
    return [gap] if gap is not None else []


# --- results -----------------------------------------------------------------------------------------


@dataclass
class RunResult:
    id: str | None
    status: str
    latency_ms: float
    server_ms: float | None = None
    steps: int = 0
    handoffs_ms: list[float] = field(default_factory=list)
    error: Any = None


@dataclass
class ScenarioResult:
    key: str
    name: str
    runs_planned: int
    concurrency: int
    wall_s: float = 0.0
    runs: list[RunResult] = field(default_factory=list)
    write_tx: int | None = None
    cpu_s: dict[str, float] | None = None  # CPU seconds used during the window, by process group
    other_db_writes: int | None = None  # rows written in other databases during the window (contamination)
    aborted: str | None = None
    load_before: float | None = None  # 1-minute load average of the machine around the scenario
    load_after: float | None = None

    @property
    def ok_runs(self) -> list[RunResult]:
        return [r for r in self.runs if r.status == "succeeded"]

    @property
    def failed(self) -> list[RunResult]:
        return [r for r in self.runs if r.status != "succeeded"]

    def summary(self) -> dict[str, Any]:
        ok = self.ok_runs
        steps = sum(r.steps for r in self.runs)
        handoffs = [h for r in ok for h in r.handoffs_ms]
        latencies = [r.latency_ms for r in ok]
        server = [r.server_ms for r in ok if r.server_ms is not None]
        return {
            "key": self.key,
            "scenario": self.name,
            "runs": len(self.runs),
            "runs_ok": len(ok),
            "runs_failed": len(self.failed),
            "concurrency": self.concurrency,
            "wall_s": self.wall_s,
            "runs_per_s": len(self.runs) / self.wall_s if self.wall_s else None,
            "steps": steps,
            "steps_per_s": steps / self.wall_s if self.wall_s else None,
            "handoffs": len(handoffs),
            "handoff_p50_ms": percentile(handoffs, 50),
            "handoff_p99_ms": percentile(handoffs, 99),
            "handoff_max_ms": max(handoffs) if handoffs else None,
            "run_server_p50_ms": percentile(server, 50),
            "run_server_p99_ms": percentile(server, 99),
            "run_server_max_ms": max(server) if server else None,
            "latency_p50_ms": percentile(latencies, 50),
            "latency_p99_ms": percentile(latencies, 99),
            "write_tx": self.write_tx,
            "write_tx_per_step": (self.write_tx / steps) if self.write_tx is not None and steps else None,
            "other_db_writes": self.other_db_writes,
            "cpu_s": self.cpu_s,
            "cpu_ms_per_step": {k: v * 1000.0 / steps for k, v in self.cpu_s.items()}
            if self.cpu_s and steps
            else None,
            "aborted": self.aborted,
            "load_before": self.load_before,
            "load_after": self.load_after,
        }


# --- the API client ----------------------------------------------------------------------------------


@dataclass
class Target:
    url: str
    key: str
    database_url: str | None
    urls: list[str] = field(default_factory=list)  # every api process (--apis); empty: just url
    tenant_keys: list[str] = field(default_factory=list)  # an admin key per tenant (--tenants); empty: just key


class Api:
    """One tenant's client; each request goes to the next of the target's api processes."""

    def __init__(self, target: Target, *, run_timeout_s: float, poll_wait_s: float) -> None:
        self.run_timeout_s = run_timeout_s
        self.poll_wait_s = poll_wait_s
        self.clients = [
            httpx.AsyncClient(
                base_url=url.rstrip("/"),
                headers={"Authorization": f"Bearer {target.key}"},
                timeout=httpx.Timeout(30.0, read=poll_wait_s + 30.0),
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
            )
            for url in target.urls or [target.url]
        ]
        self.http = self.clients[0]
        self._turn = itertools.count()

    def _next(self) -> httpx.AsyncClient:
        return self.clients[next(self._turn) % len(self.clients)]

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()

    @staticmethod
    def _check(resp: httpx.Response, what: str, ok: tuple[int, ...] = (200, 201)) -> dict[str, Any]:
        if resp.status_code not in ok:
            raise BenchError(f"{what}: HTTP {resp.status_code}: {resp.text[:800]}")
        body: dict[str, Any] = resp.json()
        return body

    async def ready(self) -> None:
        for client in self.clients:
            resp = await client.get("/readyz")
            if resp.status_code != 200:
                raise BenchError(f"GET {client.base_url}/readyz: HTTP {resp.status_code}: {resp.text[:400]}")

    async def create_workflow(self, name: str, definition: dict[str, Any]) -> int:
        resp = await self._next().post(
            "/api/v1/workflows",
            json={"name": name, "description": "bench/engine.py", "definition": definition},
        )
        body = self._check(resp, f"POST /api/v1/workflows ({name})")
        return int(body["version"])

    async def run(
        self, workflow: str, version: int, run_input: dict[str, Any]
    ) -> tuple[RunResult, dict[str, Any]]:
        """Start a run and long-poll it to a terminal state; never longer than run_timeout_s."""
        started = time.perf_counter()
        deadline = started + self.run_timeout_s
        resp = await self._next().post(
            "/api/v1/runs", json={"workflow": workflow, "version": version, "input": run_input}
        )
        doc = self._check(resp, "POST /api/v1/runs")
        run_id = str(doc["id"])
        polls = 0
        while doc.get("status") not in TERMINAL:
            left = deadline - time.perf_counter()
            if left <= 0:
                latency = (time.perf_counter() - started) * 1000.0
                return RunResult(
                    run_id,
                    f"timeout ({doc.get('status')})",
                    latency,
                    error=f"no terminal state within {self.run_timeout_s:g} s after {polls} polls",
                ), doc
            wait = max(1.0, min(self.poll_wait_s, left))
            resp = await self._next().get(
                f"/api/v1/runs/{run_id}",
                params={"wait": f"{wait:g}"},
                timeout=httpx.Timeout(30.0, read=wait + 30.0),
            )
            doc = self._check(resp, f"GET /api/v1/runs/{run_id}")
            polls += 1
        latency = (time.perf_counter() - started) * 1000.0
        result = RunResult(
            id=run_id,
            status=str(doc["status"]),
            latency_ms=latency,
            server_ms=ms_between(ts(doc.get("created_at")), ts(doc.get("finished_at"))),
            steps=step_executions(doc),
            error=doc.get("error") if doc["status"] != "succeeded" else None,
        )
        if result.status != "succeeded":
            result.error = {
                "run": doc.get("error"),
                "steps": [
                    {"id": s["id"], "status": s["status"], "error": s.get("error")}
                    for s in doc.get("steps", [])
                    if s.get("status") not in ("succeeded",)
                ][:5],
            }
        return result, doc


# --- transaction counting ----------------------------------------------------------------------------


def plain_pg_url(url: str) -> str:
    for prefix in ("postgresql+asyncpg://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


class XidProbe:
    """``pg_current_xact_id()`` before and after a window; the probe's own xid is subtracted."""

    def __init__(self, conn: asyncpg.Connection, dbname: str) -> None:
        self.conn = conn
        self.dbname = dbname

    @classmethod
    async def connect(cls, database_url: str) -> XidProbe:
        conn = await asyncio.wait_for(asyncpg.connect(plain_pg_url(database_url)), timeout=15)
        dbname = await conn.fetchval("SELECT current_database()")
        return cls(conn, dbname)

    async def xid(self) -> int:
        return int(str(await self.conn.fetchval("SELECT pg_current_xact_id()")))

    async def other_db_writes(self) -> int:
        """Rows inserted/updated/deleted in other databases (cumulative): nonzero deltas mean other
        clients wrote during the window, so the cluster-wide xid delta includes their transactions."""
        await self.conn.execute("SELECT pg_stat_clear_snapshot()")
        value = await self.conn.fetchval(
            "SELECT coalesce(sum(tup_inserted + tup_updated + tup_deleted), 0) FROM pg_stat_database "
            "WHERE datname IS DISTINCT FROM $1",
            self.dbname,
        )
        return int(value)

    async def close(self) -> None:
        await self.conn.close()


class CpuMeter:
    """CPU time (user + system) of the api and worker processes, of the PostgreSQL backends serving the
    product's database, and of the whole machine, read from /proc (Linux, same machine only)."""

    def __init__(self, pids: dict[str, int], probe: XidProbe | None) -> None:
        self.pids = pids
        self.probe = probe
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _proc_cpu(self, pid: int) -> float | None:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return (int(fields[11]) + int(fields[12])) / self.tick  # utime, stime

    def _machine_busy(self) -> float | None:
        try:
            values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return (sum(values[:8]) - idle) / self.tick  # user..steal; guest time is already in user

    async def snapshot(self) -> dict[str, dict[int, float] | float | None]:
        backends: list[int] = []
        if self.probe is not None:
            rows = await self.probe.conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            backends = [int(r["pid"]) for r in rows]
        snap: dict[str, dict[int, float] | float | None] = {}
        for name, pid in self.pids.items():
            snap[name] = {pid: self._proc_cpu(pid) or 0.0}
        snap["postgres"] = {pid: cpu for pid in backends if (cpu := self._proc_cpu(pid)) is not None}
        snap["machine"] = self._machine_busy()
        return snap

    @staticmethod
    def delta(
        before: dict[str, dict[int, float] | float | None], after: dict[str, dict[int, float] | float | None]
    ) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, value in after.items():
            prev = before.get(name)
            if isinstance(value, dict) and isinstance(prev, dict):
                # A backend that connected during the window counts from zero; one that left is lost.
                out[name] = sum(cpu - prev.get(pid, 0.0) for pid, cpu in value.items())
            elif isinstance(value, float) and isinstance(prev, float):
                out[name] = value - prev
        return out


def process_tree(pid: int) -> list[psutil.Process]:
    """The process and its descendants (expression evaluators); empty once it is gone."""
    try:
        proc = psutil.Process(pid)
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return []


def tcp_ports_by_inode() -> dict[int, int]:
    """The local port of every TCP socket of this network namespace, by socket inode."""
    ports: dict[int, int] = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(path).read_text().splitlines()[1:]:
                fields = line.split()
                ports[int(fields[9])] = int(fields[1].rsplit(":", 1)[1], 16)
    return ports


def socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(int(link[8:-1]))
    return inodes


class ConnCounter:
    """Postgres connections to the product's database per process, sampled periodically: each
    pg_stat_activity row's client_port is matched to the local TCP ports of a process (/proc, Linux, same
    machine; the expression evaluators, which never connect, are not looked at). Rows no process claims (a
    Unix socket, a connection opened or closed mid-sample, another client) count as ``other``. A backend
    (pid and client port) keeps its process once known, so /proc/net/tcp, slow to read on a machine with
    many sockets, is read again only when a new backend appears."""

    def __init__(self, conn: asyncpg.Connection, pids: dict[str, int]) -> None:
        self.conn = conn
        self.pids = pids
        self.samples = 0
        self.peak: dict[str, int] = {}
        self.peak_by_application: dict[str, dict[str, int]] = {}
        self.last: dict[str, dict[str, int]] = {}
        self.error: str | None = None
        self.owners: dict[tuple[int, int], str] = {}  # (backend pid, client port) -> process name

    @classmethod
    async def connect(cls, database_url: str, pids: dict[str, int]) -> ConnCounter:
        return cls(await asyncio.wait_for(asyncpg.connect(plain_pg_url(database_url)), timeout=15), pids)

    def _ports(self) -> dict[int, str]:
        by_inode = tcp_ports_by_inode()
        return {
            by_inode[inode]: name
            for name, pid in self.pids.items()
            for inode in socket_inodes(pid)
            if inode in by_inode
        }

    async def sample(self) -> None:
        rows = await self.conn.fetch(
            "SELECT pid, application_name, client_port FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        backends = [(int(row["pid"]), int(row["client_port"] or -1)) for row in rows]
        if any(b not in self.owners for b in backends):
            # After the query: a row's connection is still open when its port is listed.
            ports = await asyncio.to_thread(self._ports)
            self.owners = {b: ports.get(b[1], "other") for b in backends}
        counts: dict[str, dict[str, int]] = {}
        for row, backend in zip(rows, backends, strict=True):
            by_app = counts.setdefault(self.owners[backend], {})
            app = row["application_name"] or "(none)"
            by_app[app] = by_app.get(app, 0) + 1
        self.samples += 1
        self.last = counts
        for name, by_app in counts.items():
            self.peak[name] = max(self.peak.get(name, 0), sum(by_app.values()))
            peaks = self.peak_by_application.setdefault(name, {})
            for app, n in by_app.items():
                peaks[app] = max(peaks.get(app, 0), n)

    async def run(self, interval_s: float) -> None:
        """Sample until cancelled; a failed sample ends the sampling and is reported, not raised."""
        try:
            while True:
                await self.sample()
                await asyncio.sleep(interval_s)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self.error = f"{exc.__class__.__name__}: {exc}"

    def summary(self) -> dict[str, Any]:
        return {
            "interval_s": CONN_SAMPLE_S,
            "samples": self.samples,
            "error": self.error,
            "peak": self.peak,
            "peak_by_application": self.peak_by_application,
            "last": self.last,
        }

    async def close(self) -> None:
        await self.conn.close()


class RssSampler:
    """Resident memory of each product process (its descendants apart, as ``<name> children``)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.started = time.perf_counter()
        self.samples: dict[str, list[tuple[float, float]]] = {}  # name -> [(seconds since start, MiB)]

    def sample(self) -> None:
        at = round(time.perf_counter() - self.started, 1)
        for name, pid in self.pids.items():
            tree = process_tree(pid)
            rss = {}
            for proc in tree:
                with contextlib.suppress(psutil.Error):
                    rss[proc.pid] = proc.memory_info().rss / 2**20
            if pid in rss:
                self.samples.setdefault(name, []).append((at, rss.pop(pid)))
            if rss or f"{name} children" in self.samples:
                self.samples.setdefault(f"{name} children", []).append((at, sum(rss.values())))

    async def run(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.sample()

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, points in self.samples.items():
            first, last = points[0][1], points[-1][1]
            out[name] = {
                "first_mib": first,
                "last_mib": last,
                "max_mib": max(v for _, v in points),
                "growth_pct": (last - first) * 100.0 / first if first else None,
                "samples": points,
            }
        return {"interval_s": SOAK_SAMPLE_S, "processes": out}


# --- scenarios ---------------------------------------------------------------------------------------


async def run_scenario(
    api: Api,
    result: ScenarioResult,
    workflow: str,
    version: int,
    make_input: Callable[[], dict[str, Any]],
    handoffs: Callable[[dict[str, Any]], list[float]],
    probe: XidProbe | None,
    max_failures: int,
    cpu: CpuMeter | None = None,
    *,
    tenants: Sequence[tuple[Api, int]] = (),
    duration_s: float | None = None,
) -> None:
    """``result.runs_planned`` runs, ``result.concurrency`` in flight, or as many as start within
    ``duration_s``. With ``tenants`` (each one's client and workflow version), the j-th run of client task k
    goes to tenant ``(k + j * concurrency) % len(tenants)``."""
    remaining = result.runs_planned
    stop_at: float | None = None
    failures = 0
    lock = asyncio.Lock()

    async def take() -> bool:
        nonlocal remaining
        async with lock:
            if result.aborted:
                return False
            if stop_at is not None:
                return time.perf_counter() < stop_at
            if remaining <= 0:
                return False
            remaining -= 1
            return True

    async def client_task(slot: int) -> None:
        nonlocal failures
        turn = slot
        while await take():
            run_api, run_version = tenants[turn % len(tenants)] if tenants else (api, version)
            turn += result.concurrency
            started = time.perf_counter()
            try:
                run, doc = await run_api.run(workflow, run_version, make_input())
            except (httpx.HTTPError, BenchError, ValueError, KeyError) as exc:
                run, doc = (
                    RunResult(
                        None,
                        "error",
                        (time.perf_counter() - started) * 1000.0,
                        error=f"{exc.__class__.__name__}: {exc}",
                    ),
                    {},
                )
            if run.status == "succeeded":
                run.handoffs_ms = handoffs(doc)
            else:
                failures += 1
                if failures >= max_failures and not result.aborted:
                    result.aborted = f"stopped after {failures} failed runs"
            result.runs.append(run)

    x0 = w0 = None
    cpu0 = await cpu.snapshot() if cpu is not None else None
    if probe is not None:
        await asyncio.sleep(0.3)  # let the previous window's trailing writes land before the first probe
        w0 = await probe.other_db_writes()
        x0 = await probe.xid()
    started = time.perf_counter()
    if duration_s is not None:
        stop_at = started + duration_s
    await asyncio.gather(*(client_task(slot) for slot in range(result.concurrency)))
    result.wall_s = time.perf_counter() - started
    if probe is not None and x0 is not None and w0 is not None:
        await asyncio.sleep(0.3)  # trailing writes of the last run (outbox bookkeeping) belong to it
        x1 = await probe.xid()
        result.write_tx = x1 - x0 - 1
        result.other_db_writes = await probe.other_db_writes() - w0
    if cpu is not None and cpu0 is not None:
        result.cpu_s = cpu.delta(cpu0, await cpu.snapshot())


async def bench(
    args: argparse.Namespace, target: Target, product: Product | None
) -> tuple[dict[str, Any], int]:
    tenant_apis = [
        Api(replace(target, key=key), run_timeout_s=args.run_timeout, poll_wait_s=args.poll_wait)
        for key in target.tenant_keys or [target.key]
    ]
    api = tenant_apis[0]
    probe: XidProbe | None = None
    conns: ConnCounter | None = None
    rss: RssSampler | None = None
    background: list[asyncio.Future[None]] = []
    results: list[ScenarioResult] = []
    try:
        await _with_timeout(api.ready(), 15, "the API does not answer GET /readyz")
        if target.database_url:
            probe = await XidProbe.connect(target.database_url)
        machine = await machine_info(probe, args, product)
        cpu = CpuMeter({**product.pids(), "client": os.getpid()}, probe) if product is not None else None
        print_header(machine, args)
        if product is not None and target.database_url and (args.apis or args.workers or args.soak):
            conns = await ConnCounter.connect(target.database_url, {**product.pids(), "client": os.getpid()})
            background.append(asyncio.ensure_future(conns.run(CONN_SAMPLE_S)))

        selected = ["soak"] if args.soak else args.only
        chain_versions = [0] * len(tenant_apis)
        fan_versions = [0] * len(tenant_apis)
        for i, tenant_api in enumerate(tenant_apis):
            if {"chain1", "chain8", "soak"} & set(selected):
                chain_versions[i] = await tenant_api.create_workflow(
                    CHAIN_WORKFLOW, chain_definition(args.chain_length)
                )
            if "fanout" in selected:
                fan_versions[i] = await tenant_api.create_workflow(
                    FANOUT_WORKFLOW, fanout_definition(args.fanout_concurrency)
                )

        chain_input: Callable[[], dict[str, Any]] = dict
        items = list(range(args.fanout_items))

        def fan_input() -> dict[str, Any]:
            return {"items": items}

        # Warm-up: one run per workflow and tenant, not counted (imports, pools, prepared statements, caches).
        for tenant_api, chain_version, fan_version in zip(tenant_apis, chain_versions, fan_versions, strict=True):
            for workflow, version, make_input in (
                (CHAIN_WORKFLOW, chain_version, chain_input),
                (FANOUT_WORKFLOW, fan_version, fan_input),
            ):
                if not version:
                    continue
                warm, _ = await tenant_api.run(workflow, version, make_input())
                if warm.status != "succeeded":
                    raise BenchError(
                        f"warm-up run of {workflow} did not succeed: {warm.status}: "
                        f"{json.dumps(warm.error, default=str)[:800]}"
                    )
                print(f"warm-up {workflow}: {warm.latency_ms:.0f} ms", file=sys.stderr, flush=True)

        def spread(versions: list[int]) -> list[tuple[Api, int]]:
            return list(zip(tenant_apis, versions, strict=True)) if len(tenant_apis) > 1 else []

        suffix = f", {len(tenant_apis)} tenants" if len(tenant_apis) > 1 else ""
        plan: list[tuple[ScenarioResult, str, Callable[[], dict[str, Any]], Any, list[int]]] = []
        if "chain1" in selected:
            plan.append(
                (
                    ScenarioResult("chain1", f"chain-{args.chain_length} c=1{suffix}", args.chain1_runs, 1),
                    CHAIN_WORKFLOW,
                    chain_input,
                    chain_handoffs,
                    chain_versions,
                )
            )
        if "chain8" in selected:
            c = args.chain8_concurrency
            plan.append(
                (
                    ScenarioResult("chain8", f"chain-{args.chain_length} c={c}{suffix}", args.chain8_runs, c),
                    CHAIN_WORKFLOW,
                    chain_input,
                    chain_handoffs,
                    chain_versions,
                )
            )
        if "fanout" in selected:
            plan.append(
                (
                    ScenarioResult("fanout", f"fan-out-{args.fanout_items}{suffix}", args.fanout_runs, 1),
                    FANOUT_WORKFLOW,
                    fan_input,
                    fanout_handoffs,
                    fan_versions,
                )
            )
        if "soak" in selected:
            c = args.chain8_concurrency
            plan.append(
                (
                    ScenarioResult("soak", f"chain-{args.chain_length} c={c} soak {args.soak:g} s{suffix}", 0, c),
                    CHAIN_WORKFLOW,
                    chain_input,
                    chain_handoffs,
                    chain_versions,
                )
            )

        for result, workflow, make_input, handoffs, versions in plan:
            soaking = result.key == "soak"
            if soaking:
                what = f"{result.concurrency} in flight for {args.soak:g} s"
                budget = args.soak + args.run_timeout + 60
            else:
                what = f"{result.runs_planned} runs, {result.concurrency} in flight"
                budget = args.run_timeout * math.ceil(result.runs_planned / result.concurrency) + 60
            print(f"running {result.name}: {what} ...", file=sys.stderr, flush=True)
            result.load_before = os.getloadavg()[0]
            if soaking and product is not None:
                rss = RssSampler(product.pids())
                rss.sample()
                background.append(asyncio.ensure_future(rss.run(SOAK_SAMPLE_S)))
            try:
                await _with_timeout(
                    run_scenario(
                        api, result, workflow, versions[0], make_input, handoffs, probe, args.max_failures, cpu,
                        tenants=spread(versions), duration_s=args.soak if soaking else None,
                    ),
                    budget,
                    f"scenario {result.name} did not finish within {budget:g} s",
                )
            except BenchError as exc:
                result.aborted = str(exc)
            if rss is not None and soaking:
                rss.sample()
            result.load_after = os.getloadavg()[0]
            results.append(result)
            s = result.summary()
            print(f"  {s['runs_ok']}/{s['runs']} ok in {s['wall_s']:.2f} s", file=sys.stderr, flush=True)
            for failed_run in result.failed[:3]:
                print(
                    f"  run {failed_run.id}: {failed_run.status}: "
                    f"{json.dumps(failed_run.error, default=str)[:600]}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        for task in background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if conns is not None:
            await conns.close()
        if probe is not None:
            await probe.close()
        for tenant_api in tenant_apis:
            await tenant_api.aclose()

    report = {
        "machine": machine,
        "command": command_line(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("key",)},
        "scenarios": [r.summary() for r in results],
        # A soak's runs are summarised only: an hour of them would be tens of megabytes.
        "runs": {r.key: [asdict(x) for x in r.runs] for r in results if r.key != "soak"},
    }
    if conns is not None:
        report["connections"] = conns.summary()
    if rss is not None:
        report["memory"] = rss.summary()
    bad = any(
        r.failed or r.aborted or len(r.runs) < r.runs_planned or (r.key == "soak" and not r.runs) for r in results
    )
    return report, (1 if bad else 0)


async def _with_timeout(aw: Awaitable[Any], seconds: float, message: str) -> Any:
    try:
        return await asyncio.wait_for(aw, timeout=seconds)
    except TimeoutError:
        raise BenchError(message) from None


# --- machine and output ------------------------------------------------------------------------------


def redact_url(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<url>"
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


def command_line() -> str:
    argv = list(sys.argv)
    out: list[str] = []
    redact_next = False
    for arg in argv:
        if redact_next:
            out.append("stw_***")
            redact_next = False
            continue
        if arg == "--key":
            redact_next = True
        elif arg.startswith("--key="):
            arg = "--key=stw_***"
        elif "://" in arg:
            arg = (
                redact_url(arg)
                if "=" not in arg
                else arg.split("=", 1)[0] + "=" + redact_url(arg.split("=", 1)[1])
            )
        out.append(arg)
    exe = sys.executable
    with contextlib.suppress(ValueError):
        exe = os.path.relpath(exe)
    return shlex.join([exe, *out])


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def revision() -> str | None:
    """The product's git commit, and whether the working tree differs from it (read-only git calls)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=normal"],
            cwd=ROOT, capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    changed = len(status.stdout.splitlines()) if status.returncode == 0 else None
    return head.stdout.strip() + (f" + {changed} uncommitted paths" if changed else "")


def memory() -> str | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return None


async def machine_info(
    probe: XidProbe | None, args: argparse.Namespace, product: Product | None
) -> dict[str, Any]:
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    pg_version = None
    if probe is not None:
        pg_version = await probe.conn.fetchval("SHOW server_version")
    return {
        "nproc": nproc,
        "cpu": cpu_model(),
        "memory": memory(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "postgres": pg_version,
        "mode": product.describe()
        if product is not None
        else f"external {args.url}",
        "child_env": args.env,
        "revision": revision(),
    }


def print_header(machine: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"Machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['memory']}, {machine['os']}; "
        f"Python {machine['python']}; PostgreSQL {machine['postgres'] or 'n/a'}",
        flush=True,
    )
    print(
        f"Product: {machine['mode']}" + (f"; child env {' '.join(args.env)}" if args.env else ""), flush=True
    )
    print(f"Revision: {machine['revision'] or 'unknown'}", flush=True)
    print(f"Command: {command_line()}", flush=True)
    print(flush=True)


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(scenarios: list[dict[str, Any]]) -> str:
    head = [
        "scenario",
        "runs",
        "wall s",
        "runs/s",
        "steps/s",
        "hand-off p50 ms",
        "hand-off p99 ms",
        "run (server) p50 ms",
        "run (server) p99 ms",
        "latency p50 ms",
        "latency p99 ms",
        "write tx/step",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for s in scenarios:
        runs = f"{s['runs_ok']}/{s['runs']}" + (" (aborted)" if s["aborted"] else "")
        tx = fmt(s["write_tx_per_step"], 2)
        if s["other_db_writes"]:
            tx += "*"
        lines.append(
            "| "
            + " | ".join(
                [
                    s["scenario"],
                    runs,
                    fmt(s["wall_s"], 2),
                    fmt(s["runs_per_s"], 1),
                    fmt(s["steps_per_s"], 0),
                    fmt(s["handoff_p50_ms"], 2),
                    fmt(s["handoff_p99_ms"], 2),
                    fmt(s["run_server_p50_ms"], 1),
                    fmt(s["run_server_p99_ms"], 1),
                    fmt(s["latency_p50_ms"], 1),
                    fmt(s["latency_p99_ms"], 1),
                    tx,
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def aims_table(scenarios: list[dict[str, Any]]) -> str:
    by = {s["key"]: s for s in scenarios}
    rows: list[tuple[str, Any, str, float, bool]] = []  # what, measured, aim text, aim, lower is better
    if c1 := by.get("chain1"):
        rows.append(
            (
                f"{c1['scenario']} hand-off p50 (ms)",
                c1["handoff_p50_ms"],
                "<= 2",
                AIM_CHAIN1_HANDOFF_P50_MS,
                True,
            )
        )
    if c8 := by.get("chain8"):
        rows.append((f"{c8['scenario']} steps/s", c8["steps_per_s"], ">= 550", AIM_CHAIN8_STEPS_PER_S, False))
        rows.append(
            (
                f"{c8['scenario']} hand-off p99 (ms)",
                c8["handoff_p99_ms"],
                "<= 25",
                AIM_CHAIN8_HANDOFF_P99_MS,
                True,
            )
        )
    if fan := by.get("fanout"):
        rows.append(
            (
                f"{fan['scenario']} run duration p50 (ms)",
                fan["run_server_p50_ms"],
                "<= 150",
                AIM_FANOUT_RUN_MS,
                True,
            )
        )
        rows.append(
            (
                f"{fan['scenario']} run duration max (ms)",
                fan["run_server_max_ms"],
                "<= 150",
                AIM_FANOUT_RUN_MS,
                True,
            )
        )
    for s in scenarios:
        rows.append(
            (f"{s['scenario']} write tx/step", s["write_tx_per_step"], "<= 2", AIM_WRITE_TX_PER_STEP, True)
        )
    lines = ["| aim | measured | target | measured / target | met |", "|---|---:|---:|---:|:---:|"]
    for what, measured, aim_text, aim, lower in rows:
        if measured is None:
            lines.append(f"| {what} | n/a | {aim_text} | n/a | n/a |")
            continue
        ratio = measured / aim if aim else float("nan")
        met = measured <= aim if lower else measured >= aim
        lines.append(f"| {what} | {measured:.2f} | {aim_text} | {ratio:.2f}x | {'yes' if met else 'no'} |")
    return "\n".join(lines)


def print_report(report: dict[str, Any]) -> None:
    print(markdown_table(report["scenarios"]))
    if any(s["other_db_writes"] for s in report["scenarios"]):
        print(
            "\n\\* other databases on the same PostgreSQL cluster were written during this window: the "
            "cluster-wide xid delta includes their transactions, so this figure is an upper bound."
        )
    scenarios = report["scenarios"]
    loads = ", ".join(f"{s['scenario']} {fmt(s['load_before'], 2)} -> {fmt(s['load_after'], 2)}"
                      for s in scenarios)
    nproc = report["machine"]["nproc"]
    print(f"\n1-minute load average before -> after each scenario ({nproc} CPUs): {loads}")
    for s in scenarios:
        per_step = s.get("cpu_ms_per_step")
        if per_step:
            busy = (s["cpu_s"] or {}).get("machine")
            util = f"; machine {100 * busy / (nproc * s['wall_s']):.0f}% busy" if busy and s["wall_s"] else ""
            parts = ", ".join(f"{k} {v:.2f}" for k, v in per_step.items())
            print(f"CPU ms per step, {s['scenario']}: {parts}{util}")
    if conns := report.get("connections"):
        peaks = [
            f"{name} {conns['peak'][name]} ("
            + ", ".join(f"{app} {n}" for app, n in sorted(conns["peak_by_application"][name].items()))
            + ")"
            for name in sorted(conns["peak"], key=lambda n: (n == "other", n))
        ]
        print(
            f"Postgres connections per process, peak of {conns['samples']} samples every "
            f"{conns['interval_s']:g} s (total; by application_name): {'; '.join(peaks) or 'none'}"
        )
        if conns["error"]:
            print(f"(connection sampling stopped early: {conns['error']})")
    if memory := report.get("memory"):
        print(f"RSS per process in MiB, sampled after the warm-up and every {memory['interval_s']:g} s:")
        for name, m in memory["processes"].items():
            growth = "n/a" if m["growth_pct"] is None else f"{m['growth_pct']:+.1f}%"
            print(
                f"  {name}: first {m['first_mib']:.1f}, last {m['last_mib']:.1f}, max {m['max_mib']:.1f}, "
                f"first -> last {growth} ({len(m['samples'])} samples)"
            )
    print()
    print(aims_table(report["scenarios"]))
    print()
    print(
        "hand-off: next step's attempt started_at - previous step's attempt finished_at "
        "(fan-out: join start - latest item finish); run (server): finished_at - created_at; "
        "latency: POST sent to terminal response received; "
        "write tx/step: pg_current_xact_id() delta / step executions."
    )
    for s in report["scenarios"]:
        if s["runs_failed"] or s["aborted"]:
            print(
                f"\nFAILED: {s['scenario']}: {s['runs_failed']} failed runs"
                + (f"; {s['aborted']}" if s["aborted"] else "")
            )


# --- self-hosted product -----------------------------------------------------------------------------


def steward_command() -> list[str]:
    venv = ROOT / ".venv" / "bin" / "steward"
    if venv.exists():
        return [str(venv)]
    found = shutil.which("steward")
    return [found] if found else [sys.executable, "-m", "app.cli"]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the benchmark dies without cleaning up (kill -9)."""
    if sys.platform != "linux":
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def tail(path: Path, lines: int = STDERR_TAIL_LINES) -> str:
    try:
        data = path.read_bytes()[-64_000:].decode("utf-8", "replace")
    except OSError:
        return "(no output)"
    return "\n".join(data.splitlines()[-lines:]) or "(empty)"



async def bootstrap(database_url: str, tenant: str = "bench") -> Bootstrapped:
    """The tenant, created if need be, with a new admin key (the benchmarks' product has no other)."""
    from app.db import make_engine, make_sessionmaker
    from app.tenants.service import bootstrap_tenant

    engine = make_engine(database_url, pool_size=1, max_overflow=0)
    try:
        async with make_sessionmaker(engine)() as db:
            result = await bootstrap_tenant(db, tenant)
            await db.commit()
    finally:
        await engine.dispose()
    return result

class Product:
    """A database, a Redis database and the API and worker processes, all removed by ``stop()``.

    Its options are read from ``args`` when present (other benchmarks pass their own namespace): ``apis``,
    ``workers`` and ``tenants``, each 1 by default."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.admin_url = plain_pg_url(args.pg)
        self.dbname = f"steward_bench_{secrets.token_hex(4)}"
        self.database_url = urlunsplit(urlsplit(self.admin_url)._replace(path="/" + self.dbname))
        self.queue_prefix = f"stwbench-{secrets.token_hex(4)}"
        self.apis = getattr(args, "apis", None) or 1
        self.workers = getattr(args, "workers", None) or 1
        self.tenants = getattr(args, "tenants", None) or 1
        self.ports: list[int] = []
        while len(self.ports) < self.apis:
            if (port := free_port()) not in self.ports:
                self.ports.append(port)
        self.port = self.ports[0]
        self.logdir = Path(tempfile.mkdtemp(prefix="steward-bench-"))
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        self.db_created = False
        self.keep_logs = False
        self.key = ""
        self.tenant_keys: list[str] = []
        self.commands: dict[str, list[str]] = {}

    @property
    def url(self) -> str:
        return self.urls[0]

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.ports]

    def describe(self) -> str:
        """The commands the product runs, for the report's header."""
        first: dict[str, list[str]] = {}
        for name, cmd in self.commands.items():
            first.setdefault(name.split("-")[0], cmd)
        api = " ".join(first["api"]) + (
            f" (x{self.apis}, ports {', '.join(map(str, self.ports))})" if self.apis > 1 else ""
        )
        worker = " ".join(first["worker"]) + (f" (x{self.workers})" if self.workers > 1 else "")
        return f"self-hosted: {api} + {worker}"

    def start(self) -> Target:
        ports = f"port {self.port}" if self.apis == 1 else f"ports {', '.join(map(str, self.ports))}"
        print(
            f"starting product: database {self.dbname}, redis {redact_url(self.args.redis)}, "
            f"queue prefix {self.queue_prefix}, {ports}",
            file=sys.stderr,
            flush=True,
        )
        asyncio.run(self._create_database())
        from app.db import run_migrations

        run_migrations(self.database_url)
        self.tenant_keys = asyncio.run(self._bootstrap())
        self.key = self.tenant_keys[0]
        asyncio.run(self._flush_redis())
        env = {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.args.redis,
            "STEWARD_QUEUE_PREFIX": self.queue_prefix,
            "PYTHONUNBUFFERED": "1",
            # The client's polling is not what is measured: no request rate limits (--env overrides).
            "STEWARD_RATE_LIMIT_PRINCIPAL_RPS": "0",
            "STEWARD_RATE_LIMIT_TENANT_RPS": "0",
        }
        for item in self.args.env:
            name, _, value = item.partition("=")
            env[name] = value
        cmd = steward_command()
        for i, port in enumerate(self.ports, 1):
            name = "api" if self.apis == 1 else f"api-{i}"
            self._spawn(name, [*cmd, "api", "--host", "127.0.0.1", "--port", str(port)], env)
        for i in range(1, self.workers + 1):
            self._spawn("worker" if self.workers == 1 else f"worker-{i}", [*cmd, "worker"], env)
        self._wait_ready(self.args.startup_timeout)
        return Target(
            url=self.url,
            key=self.key,
            database_url=self.database_url,
            urls=self.urls,
            tenant_keys=self.tenant_keys,
        )

    async def _create_database(self) -> None:
        conn = await asyncio.wait_for(asyncpg.connect(self.admin_url), timeout=15)
        try:
            await conn.execute(f'CREATE DATABASE "{self.dbname}"')
            self.db_created = True
        finally:
            await conn.close()

    async def _bootstrap(self) -> list[str]:
        """An admin key per tenant: ``bench``, then ``bench-2`` .. ``bench-N``."""
        names = ["bench", *(f"bench-{i}" for i in range(2, self.tenants + 1))]
        return [(await bootstrap(self.database_url, name)).api_key for name in names]

    async def _flush_redis(self) -> None:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(self.args.redis, socket_connect_timeout=10)
        try:
            await asyncio.wait_for(client.flushdb(), timeout=15)
        finally:
            await client.aclose()

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        out = self.logdir / f"{name}.out"
        err = self.logdir / f"{name}.err"
        self.logs[name] = err
        self.commands[name] = [os.path.relpath(c, ROOT) if c.startswith(str(ROOT)) else c for c in cmd]
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            self.children[name] = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        pending = list(self.urls)
        while time.monotonic() < deadline:
            for name, proc in self.children.items():
                code = proc.poll()
                if code is not None:
                    raise BenchError(f"steward {name} exited with code {code} during start-up")
            for url in list(pending):
                try:
                    resp = httpx.get(url + "/readyz", timeout=2.0)
                    if resp.status_code == 200:
                        pending.remove(url)
                        continue
                    last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                except httpx.HTTPError as exc:
                    last = f"{exc.__class__.__name__}: {exc}"
            if not pending:
                return
            time.sleep(0.25)
        raise BenchError(
            f"the API did not become ready on {', '.join(pending)} within {timeout_s:g} s (last: {last})"
        )

    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self.children.items()}

    def check_alive(self) -> None:
        for name, proc in self.children.items():
            code = proc.poll()
            if code is not None:
                raise BenchError(f"steward {name} exited with code {code} during the benchmark")

    def print_tails(self) -> None:
        self.keep_logs = True
        for name, path in self.logs.items():
            print(
                f"\n--- steward {name} stderr (last {STDERR_TAIL_LINES} lines; full log {path}) ---",
                file=sys.stderr,
            )
            print(tail(path), file=sys.stderr)
        sys.stderr.flush()

    def stop(self) -> None:
        for proc in self.children.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        deadline = time.monotonic() + 20
        for proc in self.children.values():
            left = max(0.1, deadline - time.monotonic())
            try:
                proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        if self.db_created:
            try:
                asyncio.run(self._drop_database())
            except Exception as exc:  # report, but keep tearing down
                print(f"could not drop database {self.dbname}: {exc}", file=sys.stderr)
        if self.keep_logs:
            print(f"child logs kept in {self.logdir}", file=sys.stderr)
        else:
            shutil.rmtree(self.logdir, ignore_errors=True)

    async def _drop_database(self) -> None:
        conn = await asyncio.wait_for(asyncpg.connect(self.admin_url), timeout=15)
        try:
            await asyncio.wait_for(conn.execute(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)'), 30)
        finally:
            await conn.close()


async def bench_with_watchdog(
    args: argparse.Namespace, target: Target, product: Product | None
) -> tuple[dict[str, Any], int]:
    """Run the benchmark; when we started the product, fail fast if one of its processes dies."""
    if product is None:
        return await bench(args, target, product)
    return await watched(bench(args, target, product), product)


async def watched(work: Awaitable[T], product: Product) -> T:
    """Await ``work``, failing fast (BenchError) if one of the product's processes dies meanwhile."""
    main = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            product.check_alive()
            await asyncio.sleep(0.5)

    watcher = asyncio.ensure_future(watch())
    done, _ = await asyncio.wait({main, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if main in done:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        return main.result()
    main.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await main
    watcher.result()  # raises the BenchError
    raise AssertionError("unreachable")


# --- entry point -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--url", help="a running product (default: start one)")
    p.add_argument("--key", help="API key (stw_...) for --url")
    p.add_argument(
        "--database-url", help="the product's database, for the write-transaction count (--url mode)"
    )
    p.add_argument(
        "--pg", default=DEFAULT_PG, help=f"admin URL to create the bench database on (default {DEFAULT_PG})"
    )
    p.add_argument(
        "--redis",
        default=DEFAULT_REDIS,
        help=f"Redis database for the product, flushed first (default {DEFAULT_REDIS})",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the api and worker processes (repeatable)",
    )
    p.add_argument("--only", help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all)")
    p.add_argument("--json", metavar="PATH", help="write the raw numbers here")
    p.add_argument("--chain-length", type=int, default=10)
    p.add_argument("--chain1-runs", type=int, default=50)
    p.add_argument("--chain8-runs", type=int, default=200)
    p.add_argument("--chain8-concurrency", type=int, default=8)
    p.add_argument("--fanout-runs", type=int, default=3)
    p.add_argument("--fanout-items", type=int, default=100)
    p.add_argument("--fanout-concurrency", type=int, default=100)
    p.add_argument("--run-timeout", type=float, default=60.0, help="seconds a run may take (default 60)")
    p.add_argument("--poll-wait", type=float, default=30.0, help="?wait= of each long poll (default 30)")
    p.add_argument("--max-failures", type=int, default=5, help="stop a scenario after this many failed runs")
    p.add_argument("--startup-timeout", type=float, default=90.0, help="seconds for the product to come up")
    p.add_argument(
        "--tenants", type=int, default=1, metavar="N",
        help="spread the runs round-robin over N tenants, each with its own API key (default 1)",
    )
    p.add_argument(
        "--apis", type=int, metavar="N",
        help="api processes, requests spread round-robin over them (default 1); reports Postgres connections",
    )
    p.add_argument(
        "--workers", type=int, metavar="M", help="worker processes (default 1); reports Postgres connections"
    )
    p.add_argument(
        "--soak", type=float, metavar="SECONDS",
        help="instead of the scenarios, run the chain-10 loop (--chain8-concurrency) this long, sampling RSS",
    )
    args = p.parse_args(argv)
    if args.soak is not None and args.only is not None:
        p.error("--soak runs the chain-10 loop alone: drop --only")
    if args.url and (args.tenants != 1 or args.apis or args.workers or args.soak is not None):
        p.error("--tenants, --apis, --workers and --soak are for the self-hosted mode (without --url)")
    if args.soak is not None and args.soak <= 0:
        p.error("--soak must be more than 0 seconds")
    for name in ("apis", "workers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    args.only = args.only if args.only is not None else ",".join(SCENARIOS)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SCENARIOS]
    if unknown or not only:
        p.error(
            f"--only: unknown scenario(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(SCENARIOS)}"
        )
    args.only = only
    if args.url and not args.key:
        p.error("--url needs --key")
    if args.key and not args.url:
        p.error("--key needs --url")
    if args.database_url and not args.url:
        p.error("--database-url is for --url mode (otherwise the script knows its own database)")
    for item in args.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", item, flags=re.S):
            p.error(f"--env {item!r}: expected KEY=VALUE")
    for name in (
        "chain_length",
        "chain1_runs",
        "chain8_runs",
        "chain8_concurrency",
        "fanout_runs",
        "fanout_items",
        "fanout_concurrency",
        "max_failures",
        "tenants",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    product: Product | None = None
    code = 0
    try:
        if args.url:
            target = Target(url=args.url, key=args.key, database_url=args.database_url)
        else:
            product = Product(args)
            target = product.start()
        report, code = asyncio.run(bench_with_watchdog(args, target, product))
        print_report(report)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
            print(f"\nraw numbers written to {args.json}", file=sys.stderr)
        if code and product is not None:
            product.print_tails()
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        code = 130
    except BenchError as exc:
        print(f"\nbench/engine.py: {exc}", file=sys.stderr)
        if product is not None:
            product.print_tails()
        code = 2
    except Exception:
        traceback.print_exc()
        if product is not None:
            product.print_tails()
        code = 2
    finally:
        if product is not None:
            try:
                product.stop()
            except KeyboardInterrupt:
                print(
                    f"interrupted again during clean-up; database {product.dbname} may be left behind",
                    file=sys.stderr,
                )
    return code


if __name__ == "__main__":
    sys.exit(main())
