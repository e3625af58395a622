#!/usr/bin/env python3
"""Dashboard benchmark: server-side render times at a million runs, the cost of open live pages, and how
soon a change reaches an open page while the engine is busy. Prints markdown tables.

It starts its own product (as ``bench/engine.py`` does: a scratch database, ``steward api`` and
``steward worker`` as child processes, all removed at the end), fills the database with ``--runs`` runs
(``bench/runlist.py``'s fill: half of them in one tenant), signs in as the local admin of the busy
tenant through the sign-in form, and measures:

* render: the runs page (first page, a filtered page, a page half way down), and the page of a run whose
  ``map`` step has ``--map-items`` items; ``--samples`` requests each after a warm-up, one at a time, the
  time from sending the request to the last byte of the page;
* live pages: ``--streams`` Server-Sent Events streams held open on a run's page at once: the database
  connections of the product's database and the API process's resident memory, before and with them;
* update latency: ``--updates`` times, a run waiting on a signal is followed by an open stream; the signal
  is sent over the API and the clock stops when the page has fetched its refreshed live part after the
  stream's ``changed`` event (what the browser does), while ``--load`` chain-10 runs keep 8 in flight.

    .venv/bin/python bench/dashboard.py [--runs 1000000] [--samples 30] [--streams 200] [--updates 100]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.auth.local import LOCAL_ADMIN, ensure_local_admin
from app.runs.service import PAGES
from bench.engine import DEFAULT_PG, DEFAULT_REDIS, Product, bootstrap, chain_definition, fanout_definition, revision
from bench.runlist import FILL

BUSY_TENANT = "tenant-1"  # runlist's fill puts half the runs here


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def fill(database_url: str, runs: int) -> float:
    started = time.perf_counter()
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("SET synchronous_commit = off")  # the fill only; what is measured reads
        for statement in FILL.split(";\n"):
            if statement.strip():
                await (conn.execute(statement, runs) if "$1" in statement else conn.execute(statement))
    finally:
        await conn.close()
    return time.perf_counter() - started


async def admin_password(database_url: str) -> str:
    conn = await asyncpg.connect(database_url)
    try:
        tenant_id = await conn.fetchval("SELECT id FROM tenant WHERE name = $1", BUSY_TENANT)
        password = await ensure_local_admin(conn, tenant_id)
    finally:
        await conn.close()
    if password is None:
        raise SystemExit("the local admin already had a password: this is not a fresh database")
    return password


async def signed_in(url: str, password: str) -> httpx.AsyncClient:
    """A client holding the local admin's session, signed in through the sign-in form."""
    # Each open stream holds a connection: no pool limit (httpx's default is 100).
    browser = httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=None))
    login = await browser.get("/auth/login", params={"next": "/runs"})
    token = login.text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    answer = await browser.post("/auth/local", data={
        "csrf_token": token, "next": "/runs", "username": LOCAL_ADMIN, "password": password})
    if answer.status_code != 303:
        raise SystemExit(f"sign-in refused: {answer.status_code} {answer.text[:300]}")
    return browser


async def render_times(browser: httpx.AsyncClient, path: str, samples: int) -> list[float]:
    for _ in range(3):
        (await browser.get(path)).raise_for_status()
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        page = await browser.get(path)
        times.append((time.perf_counter() - started) * 1000)
        page.raise_for_status()
    return times


async def finished_run(api: httpx.AsyncClient, workflow: str, body: dict[str, Any]) -> str:
    run = (await api.post("/api/v1/runs", json={"workflow": workflow, **body})).raise_for_status().json()
    while run["status"] not in ("succeeded", "failed", "cancelled"):
        run = (await api.get(f"/api/v1/runs/{run['id']}", params={"wait": 30})).raise_for_status().json()
    if run["status"] != "succeeded":
        raise SystemExit(f"run of {workflow} ended {run['status']}: {run.get('error')}")
    return str(run["id"])


async def waiting_run(api: httpx.AsyncClient) -> str:
    run = (await api.post("/api/v1/runs", json={"workflow": "bench-wait", "input": {}})).raise_for_status().json()
    while run["status"] != "waiting":
        run = (await api.get(f"/api/v1/runs/{run['id']}", params={"wait": 5})).raise_for_status().json()
    return str(run["id"])


@contextlib.asynccontextmanager
async def stream(browser: httpx.AsyncClient, run_id: str) -> AsyncIterator[AsyncIterator[str]]:
    """An open event stream of a run's page (its first line read: the server has taken it)."""
    async with browser.stream("GET", f"/runs/{run_id}/stream", timeout=httpx.Timeout(60, read=None)) as answer:
        answer.raise_for_status()
        lines = answer.aiter_lines()
        await anext(lines)
        yield lines


async def connections(database_url: str, dbname: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", dbname))
    finally:
        await conn.close()


def rss_mb(pid: int) -> float:
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20


async def load(api: httpx.AsyncClient, runs: int, stop: asyncio.Event) -> int:
    """chain-10 runs, 8 in flight, until ``runs`` are done or the measurement ends; the runs finished."""
    done = 0
    queue = iter(range(runs))

    async def one() -> None:
        nonlocal done
        for _ in queue:
            if stop.is_set():
                return
            await finished_run(api, "bench-chain", {"input": {}})
            done += 1

    await asyncio.gather(*(one() for _ in range(8)))
    return done


async def main(args: argparse.Namespace, product: Product) -> None:
    assert product.database_url
    print(f"filling {args.runs:,} runs ...", file=sys.stderr, flush=True)
    fill_s = await fill(product.database_url, args.runs)
    key = (await bootstrap(product.database_url, BUSY_TENANT)).api_key
    api = httpx.AsyncClient(base_url=product.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    browser = await signed_in(product.url, await admin_password(product.database_url))
    for name, definition in {
        "bench-map": fanout_definition(100), "bench-chain": chain_definition(10),
        "bench-wait": {"steps": [{"id": "w", "wait": {"signal": "go"}}]},
    }.items():
        (await api.post("/api/v1/workflows", json={"name": name, "definition": definition})).raise_for_status()
    print("running a map of the items ...", file=sys.stderr, flush=True)
    map_run = await finished_run(api, "bench-map", {"input": {"items": list(range(args.map_items))}})

    conn = await asyncpg.connect(product.database_url)
    try:
        tenant_id = await conn.fetchval("SELECT id FROM tenant WHERE name = $1", BUSY_TENANT)
        count = await conn.fetchval("SELECT count(*) FROM run WHERE tenant_id = $1", tenant_id)
        middle = await conn.fetchrow("SELECT created_at, id FROM run WHERE tenant_id = $1 "
                                     "ORDER BY created_at DESC, id DESC OFFSET $2 LIMIT 1", tenant_id, count // 2)
    finally:
        await conn.close()
    pages = {
        "runs page, first page": "/runs",
        "runs page, status=failed and workflow=beta": "/runs?status=failed&workflow=beta",
        f"runs page, half way down ({count // 2:,} runs in)": "/runs?cursor="
        + PAGES.encode(middle["created_at"], middle["id"]),
        f"run page, a map of {args.map_items:,} items": f"/runs/{map_run}",
    }
    render = {label: await render_times(browser, path, args.samples) for label, path in pages.items()}

    api_pid = product.children["api"].pid
    idle_run = await waiting_run(api)
    before = (await connections(product.database_url, product.dbname), rss_mb(api_pid))
    async with contextlib.AsyncExitStack() as streams:
        for _ in range(args.streams):
            await streams.enter_async_context(stream(browser, idle_run))
        with_streams = (await connections(product.database_url, product.dbname), rss_mb(api_pid))

    print("measuring update latency under load ...", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    background = asyncio.create_task(load(api, args.load, stop))
    latencies = []
    for _ in range(args.updates):
        run_id = await waiting_run(api)
        async with stream(browser, run_id) as lines:
            started = time.perf_counter()
            (await api.post(f"/api/v1/runs/{run_id}/signals/go", json={"payload": {}})).raise_for_status()
            async for line in lines:
                if line == "event: changed":
                    break
            (await browser.get(f"/runs/{run_id}/live")).raise_for_status()
            latencies.append((time.perf_counter() - started) * 1000)
    stop.set()
    chains = await background

    print(f"\n{args.runs:,} runs ({count:,} in the signed-in tenant); fill {fill_s:.0f} s; revision {revision()}")
    print("command: " + " ".join(["bench/dashboard.py", *sys.argv[1:]]) + "\n")
    print("| page | p50 ms | p95 ms |\n|---|---:|---:|")
    for label, times in render.items():
        print(f"| {label} | {statistics.median(times):.1f} | {quantile(times, 0.95):.1f} |")
    print(f"\n| {args.streams} open run pages (SSE) | before | with them |\n|---|---:|---:|")
    print(f"| database connections of the product | {before[0]} | {with_streams[0]} |")
    print(f"| API process RSS, MB | {before[1]:.0f} | {with_streams[1]:.0f} |")
    print(f"\n| update reaches an open page ({args.updates} signals, {chains} chain-10 runs beside) | ms |")
    print("|---|---:|")
    for label, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("max", 1.0)):
        print(f"| {label} | {quantile(latencies, q):.0f} |")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=1_000_000)
    p.add_argument("--map-items", type=int, default=1000)
    p.add_argument("--samples", type=int, default=30)
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--updates", type=int, default=100)
    p.add_argument("--load", type=int, default=10_000, help="chain-10 runs at most beside the update test")
    p.add_argument("--pg", default=DEFAULT_PG)
    p.add_argument("--redis", default=DEFAULT_REDIS)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--startup-timeout", type=float, default=90.0)
    return p.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    running = Product(arguments)
    try:
        running.start()
        asyncio.run(main(arguments, running))
    finally:
        running.stop()
