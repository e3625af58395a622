#!/usr/bin/env python3
"""Outage benchmark: what the API, the workers and the runs do while Redis or PostgreSQL is away.

Everything runs on private servers this script owns (tests/support/servers.py): a ``redis-server`` on a
free port and an embedded PostgreSQL under ``.steward-bench/outage-pg`` (gitignored), with ``steward
api`` and ``--workers`` ``steward worker`` processes as children, and the tests' tool server on loopback
counting calls per Idempotency-Key. The machine's shared servers are never touched.

Scenarios (``--only redis,pg,blip``), each repeated ``--repeat`` times on a fresh product:

* ``redis``: runs start at ``--rate`` per second throughout; Redis gets ``SHUTDOWN NOSAVE`` (everything
  queued is lost), stays away ``--redis-outage`` seconds, and comes back empty.
* ``pg``: the same load; PostgreSQL is stopped (fast shutdown) for ``--pg-outage`` seconds. A run the
  API refused (503) is started again by the load generator once the API answers.
* ``blip``: ``--blip-runs`` runs of three 0.5 s tool calls in flight; PostgreSQL restarts with ``--blip``
  seconds down (the issue's "2-second restart").

Reported per scenario (medians over the repeats, and the worst): worker processes that exited, runs that
did not succeed, tool calls that ran twice for one Idempotency-Key, API answers during the outage (by
status, and whether 503s carried Retry-After), the time from the server's return until the API answers
again and until every run is finished, log lines and tracebacks the children wrote from the outage's start
to the end of the recovery, log lines without a timestamp, and asyncpg's "another operation is in
progress" count.

Run it with the project's virtualenv: ``.venv/bin/python bench/outage.py [--repeat 3] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import httpx  # noqa: E402

from app.vault.crypto import new_key  # noqa: E402
from bench.engine import bootstrap  # noqa: E402
from tests.fakes.tool_server import ToolServer  # noqa: E402
from tests.support.net import free_port  # noqa: E402
from tests.support.servers import PrivatePostgres, PrivateRedis  # noqa: E402

SCENARIOS = ("redis", "pg", "blip")
TERMINAL = {"succeeded", "failed", "cancelled"}
# A log record starts with its date and time (app/logs.py); a traceback continues it on indented lines.
TIMESTAMPED = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}")


class BenchError(Exception):
    pass


@dataclass
class Product:
    """A database on the private PostgreSQL, the private Redis, the API and worker processes."""

    pg: PrivatePostgres
    redis: PrivateRedis
    tools: ToolServer
    workers: int
    env_extra: dict[str, str]
    logdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="steward-outage-")))
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    dbname: str = field(default_factory=lambda: f"steward_outage_{secrets.token_hex(4)}")
    key: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def database_url(self) -> str:
        return self.pg.admin_url(self.dbname)

    def start(self) -> None:
        asyncio.run(self._admin(f'CREATE DATABASE "{self.dbname}"'))
        from app.db import run_migrations

        run_migrations(self.database_url)
        self.key = asyncio.run(self._bootstrap())
        env = {
            **os.environ, "DATABASE_URL": self.database_url, "REDIS_URL": self.redis.url,
            "STEWARD_QUEUE_PREFIX": f"outage-{secrets.token_hex(3)}", "PYTHONUNBUFFERED": "1",
            "STEWARD_RATE_LIMIT_PRINCIPAL_RPS": "0", "STEWARD_RATE_LIMIT_TENANT_RPS": "0",
            "STEWARD_HTTP_ALLOW_PRIVATE_NETWORKS": "true", "STEWARD_SECRET_KEYS": new_key(),
            **self.env_extra,
        }
        cmd = [sys.executable, "-m", "app.cli"]
        self._spawn("api", [*cmd, "api", "--port", str(self.port)], env)
        for n in range(self.workers):
            self._spawn(f"worker{n + 1}", [*cmd, "worker"], env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise BenchError("the API did not become ready within 60 s")

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(host=self.pg.socket_dir, port=self.pg.port, user="postgres", database="postgres")
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def _bootstrap(self) -> str:
        return (await bootstrap(self.database_url)).api_key

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        with open(self.logdir / f"{name}.log", "wb") as out:
            self.children[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                                   stderr=subprocess.STDOUT, start_new_session=True)

    def exited(self) -> list[str]:
        return [name for name, proc in self.children.items() if proc.poll() is not None]

    def check_alive(self) -> None:
        if self.exited():
            raise BenchError(f"exited: {', '.join(self.exited())}; logs in {self.logdir}")

    def log_sizes(self) -> dict[str, int]:
        return {name: (self.logdir / f"{name}.log").stat().st_size for name in self.children}

    def log_since(self, sizes: dict[str, int]) -> list[str]:
        lines: list[str] = []
        for name, offset in sizes.items():
            with open(self.logdir / f"{name}.log", "rb") as fh:
                fh.seek(offset)
                lines += fh.read().decode("utf-8", "replace").splitlines()
        return lines

    def stop(self) -> None:
        for proc in self.children.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.children.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(Exception):
            asyncio.run(self._admin(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)'))


# --- load --------------------------------------------------------------------------------------------


@dataclass
class Start:
    t: float  # time.monotonic() when the POST was sent
    status: int  # the answer's status, 0 for no answer
    retry_after: str | None
    run_id: str | None


class Load:
    """Starts runs at a fixed rate; a run the API refused is started again once it answers."""

    def __init__(self, http: httpx.AsyncClient, workflow: str, rate: float) -> None:
        self.http, self.workflow, self.rate = http, workflow, rate
        self.starts: list[Start] = []
        self.runs: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()

    async def start_one(self) -> None:
        while True:
            t = time.monotonic()
            try:
                r = await self.http.post("/api/v1/runs", json={"workflow": self.workflow, "input": {}})
            except httpx.HTTPError:
                self.starts.append(Start(t, 0, None, None))
            else:
                run_id = r.json()["id"] if r.status_code == 201 else None
                self.starts.append(Start(t, r.status_code, r.headers.get("retry-after"), run_id))
                if run_id is not None:
                    self.runs.append(run_id)
                    return
            await asyncio.sleep(0.5)

    async def _loop(self) -> None:
        while True:
            task = asyncio.create_task(self.start_one())
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
            await asyncio.sleep(1 / self.rate)

    async def drain(self, timeout: float = 60.0) -> None:
        """Wait for the starts still being retried (giving up on them after ``timeout``)."""
        if self._pending:
            _, late = await asyncio.wait(set(self._pending), timeout=timeout)
            for task in late:
                task.cancel()

    def __enter__(self) -> Load:
        self._task = asyncio.create_task(self._loop())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def finish_all(product: Product, run_ids: list[str], timeout: float) -> tuple[list[dict[str, Any]], float]:
    """Every run's status once all are terminal (or once ``timeout`` passed), and when that was; read from
    PostgreSQL itself: the truth, whether or not the API answers."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            conn = await asyncpg.connect(host=product.pg.socket_dir, port=product.pg.port, user="postgres",
                                         database=product.dbname)
            try:
                rows = await conn.fetch(
                    "SELECT id::text, status, extract(epoch FROM created_at) AS created, "
                    "extract(epoch FROM finished_at) AS finished FROM run WHERE id = ANY($1::uuid[])", run_ids)
            finally:
                await conn.close()
            runs = {r["id"]: dict(r) for r in rows}
            if all(runs.get(i, {}).get("status") in TERMINAL for i in run_ids) or time.monotonic() > deadline:
                return [runs.get(i, {"id": i, "status": "unknown"}) for i in run_ids], time.monotonic()
        await asyncio.sleep(0.2)


async def api_back(http: httpx.AsyncClient, timeout: float = 60.0) -> float | None:
    """Seconds until the API answers an authenticated read again; None if it did not within ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        with contextlib.suppress(httpx.HTTPError):
            if (await http.get("/api/v1/runs", params={"limit": 1})).status_code == 200:
                return time.monotonic() - t0
        await asyncio.sleep(0.05)
    return None


# --- scenarios ---------------------------------------------------------------------------------------


async def setup(http: httpx.AsyncClient, tools: ToolServer, seconds: float) -> str:
    tool = {"name": "slow_write", "description": "a write that takes a moment", "input_schema": {"type": "object"},
            "executor": {"kind": "http", "method": "POST", "url": f"{tools.url}/hang?seconds={seconds:g}"},
            "effect": "write"}
    r = await http.post("/api/v1/tools", json=tool)
    if r.status_code not in (200, 201):
        raise BenchError(f"POST /api/v1/tools: {r.status_code} {r.text[:300]}")
    steps = [{"id": "a", "tool": "slow_write", "args": {"step": "a"}},
             {"id": "b", "needs": ["a"], "tool": "slow_write", "args": {"step": "b"}},
             {"id": "c", "needs": ["b"], "tool": "slow_write", "args": {"step": "c"}}]
    name = f"outage_{secrets.token_hex(3)}"
    r = await http.post("/api/v1/workflows", json={"name": name, "definition": {"steps": steps}})
    if r.status_code not in (200, 201):
        raise BenchError(f"POST /api/v1/workflows: {r.status_code} {r.text[:300]}")
    return name


def twice(tools: ToolServer) -> int:
    keys = [c.idempotency_key for c in tools.calls_to("/hang")]
    return sum(1 for k in set(keys) if keys.count(k) > 1)


def summarise(product: Product, load_starts: list[Start], docs: list[dict[str, Any]], tools: ToolServer,
              lines: list[str], t_down: float, t_up: float, up_wall: float, api_s: float | None) -> dict[str, Any]:
    during = [s for s in load_starts if t_down <= s.t < t_up]
    # The runs that existed when the server came back (the backlog of the outage), by the database's clock.
    backlog = [d.get("finished") for d in docs if d.get("created") is None or float(d["created"]) < up_wall]
    unfinished = any(f is None for f in backlog)
    statuses: dict[str, int] = {}
    for s in during:
        statuses[str(s.status)] = statuses.get(str(s.status), 0) + 1
    refused = [s for s in during if s.status == 503]
    return {
        "workers_exited": len([n for n in product.exited() if n.startswith("worker")]),
        "runs": len(docs),
        "runs_not_succeeded": sum(1 for d in docs if d.get("status") != "succeeded"),
        "calls": len(tools.calls_to("/hang")),
        "calls_twice": twice(tools),
        "api_answers_during": statuses,
        "503_with_retry_after": sum(1 for s in refused if s.retry_after) if refused else None,
        "api_back_s": round(api_s, 2) if api_s is not None else None,
        "backlog_done_s": round(max(float(f) for f in backlog) - up_wall, 2) if backlog and not unfinished else None,
        # The access log (a line per request) is left out: the load's own requests would swamp it.
        "log_lines": sum(1 for line in lines if "uvicorn.access" not in line),
        "tracebacks": sum(1 for line in lines if line.startswith("Traceback")),
        "untimestamped_lines": sum(1 for line in lines if line.strip() and not line.startswith(("Traceback", " "))
                                   and not TIMESTAMPED.match(line)),
        "another_operation": sum(1 for line in lines if "another operation is in progress" in line),
    }


async def outage(product: Product, which: str, down_s: float, rate: float, step_s: float) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=product.url, headers={"Authorization": f"Bearer {product.key}"},
                                 timeout=30) as http:
        workflow = await setup(http, product.tools, step_s)
        server = product.redis if which == "redis" else product.pg
        with Load(http, workflow, rate) as load:
            await asyncio.sleep(2)  # steady state before the outage
            sizes = product.log_sizes()
            t_down = time.monotonic()
            await asyncio.to_thread(server.stop)
            await asyncio.sleep(down_s)
            await asyncio.to_thread(server.start)
            t_up, up_wall = time.monotonic(), time.time()
            api_s = await api_back(http)
            await asyncio.sleep(2)  # keep the load on a little after the return
        await load.drain()  # starts the API refused are retried until it answers
        docs, _ = await finish_all(product, load.runs, timeout=90)
        return summarise(product, load.starts, docs, product.tools, product.log_since(sizes), t_down, t_up,
                         up_wall, api_s)


async def blip(product: Product, runs: int, down_s: float, step_s: float) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=product.url, headers={"Authorization": f"Bearer {product.key}"},
                                 timeout=30) as http:
        workflow = await setup(http, product.tools, step_s)
        ids = []
        for _ in range(runs):
            r = await http.post("/api/v1/runs", json={"workflow": workflow, "input": {}})
            ids.append(r.json()["id"])
        t_start = time.monotonic()
        while len(product.tools.calls_to("/hang")) < min(runs, 30):  # noqa: ASYNC110  (calls in flight)
            await asyncio.sleep(0.01)
        sizes = product.log_sizes()
        t_down = time.monotonic()
        await asyncio.to_thread(product.pg.stop)
        await asyncio.sleep(down_s)
        await asyncio.to_thread(product.pg.start)
        t_up, up_wall = time.monotonic(), time.time()
        api_s, (docs, t_done) = await asyncio.gather(api_back(http), finish_all(product, ids, timeout=90))
        result = summarise(product, [], docs, product.tools, product.log_since(sizes), t_down, t_up, up_wall, api_s)
        result["total_s"] = round(t_done - t_start, 2)
        return result


# --- driver ------------------------------------------------------------------------------------------


def run_scenario(args: argparse.Namespace, name: str, pg: PrivatePostgres) -> dict[str, Any]:
    redis = PrivateRedis()
    redis.start()
    tools = ToolServer().start()
    product = Product(pg, redis, tools, args.workers, dict(item.split("=", 1) for item in args.env))
    try:
        product.start()
        if name == "redis":
            result = asyncio.run(outage(product, "redis", args.redis_outage, args.rate, args.step))
        elif name == "pg":
            result = asyncio.run(outage(product, "pg", args.pg_outage, args.rate, args.step))
        else:
            result = asyncio.run(blip(product, args.blip_runs, args.blip, args.step))
        result["logs"] = str(product.logdir)
        return result
    finally:
        product.stop()
        tools.stop()
        redis.stop()
        if not args.keep_logs:
            shutil.rmtree(product.logdir, ignore_errors=True)


ROWS = [("workers_exited", "worker processes that exited"), ("runs", "runs"),
        ("runs_not_succeeded", "runs that did not succeed"), ("calls", "tool calls"),
        ("calls_twice", "tool calls run twice (same Idempotency-Key)"),
        ("api_answers_during", "API answers to POST /runs during the outage"),
        ("503_with_retry_after", "... of the 503s, with Retry-After"),
        ("api_back_s", "server back → API answers (s; never: not within 60 s)"),
        ("backlog_done_s", "server back → every run created before finished (s; never: not within 90 s)"),
        ("total_s", "first call → every run finished (s)"),
        ("log_lines", "log lines, outage start → all finished"), ("tracebacks", "... of which tracebacks"),
        ("untimestamped_lines", "log lines without a timestamp"),
        ("another_operation", "\"another operation is in progress\"")]


def cell(values: list[Any]) -> str:
    if not values or all(v is None for v in values):
        return "–"
    if isinstance(values[0], dict):
        merged: dict[str, list[int]] = {}
        for v in values:
            for k, n in v.items():
                merged.setdefault(k, []).append(n)
        return ", ".join(f"{k}: {statistics.median(ns):g}" for k, ns in sorted(merged.items())) or "none"
    nums = [v for v in values if v is not None]
    med, worst = statistics.median(nums), max(nums)
    text = f"{med:g}" if med == worst else f"{med:g} (max {worst:g})"
    missing = len(values) - len(nums)
    return text + (f"; {missing} of {len(values)}: never" if missing else "")


def report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    names = list(results)
    heads = {"redis": f"Redis away {args.redis_outage:g} s", "pg": f"PostgreSQL away {args.pg_outage:g} s",
             "blip": f"PostgreSQL restart, {args.blip:g} s down"}
    out = ["| | " + " | ".join(heads[n] for n in names) + " |", "|---|" + "---|" * len(names)]
    for key, label in ROWS:
        if any(key in r for n in names for r in results[n]):
            out.append(f"| {label} | " + " | ".join(cell([r.get(key) for r in results[n]]) for n in names) + " |")
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--only", default=",".join(SCENARIOS))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--rate", type=float, default=5.0, help="runs started per second during redis/pg (default 5)")
    p.add_argument("--step", type=float, default=0.5, help="seconds each tool call takes (default 0.5)")
    p.add_argument("--redis-outage", type=float, default=20.0)
    p.add_argument("--pg-outage", type=float, default=15.0)
    p.add_argument("--blip", type=float, default=2.0)
    p.add_argument("--blip-runs", type=int, default=80, help="runs of 3 calls in the blip scenario (default 80)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment for children")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--keep-logs", action="store_true")
    args = p.parse_args(argv)
    args.only = [s for s in args.only.split(",") if s]
    if any(s not in SCENARIOS for s in args.only):
        p.error(f"--only: choose from {', '.join(SCENARIOS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    pg = PrivatePostgres(ROOT / ".steward-bench" / "outage-pg")
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        pg.start()
        for name in args.only:
            for i in range(args.repeat):
                print(f"{name} {i + 1}/{args.repeat} ...", file=sys.stderr, flush=True)
                results.setdefault(name, []).append(run_scenario(args, name, pg))
                print(json.dumps(results[name][-1]), file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        return 130
    except BenchError as exc:
        print(f"bench/outage.py: {exc}", file=sys.stderr)
        return 2
    finally:
        pg.close()
    print(report(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    bad = any(r["workers_exited"] or r["runs_not_succeeded"] or r["calls_twice"] for rs in results.values() for r in rs)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
