"""Run-list and dispatcher queries at scale: are the indexes doing their job at a million runs?

Creates a scratch database, migrates it, fills it with N runs (one step row each, most finished,
a few running with leases, waiting, or with outbox rows) for a busy tenant plus other tenants, then
times the API's run-list queries (first page, a deep keyset page, filtered by status and by workflow)
and the reconciler's scans, exactly as the product issues them. Prints a markdown table of medians and
the plan's top node, then drops the database.

    .venv/bin/python bench/runlist.py [--runs 1000000] [--pg postgresql://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import time
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.db import run_migrations
from app.workflows import stats

FILL = """
INSERT INTO tenant (id, name) SELECT gen_random_uuid(), 'tenant-' || i FROM generate_series(1, 10) i;
INSERT INTO workflow (id, tenant_id, name, latest_version)
    SELECT gen_random_uuid(), t.id, w, 1 FROM tenant t, unnest(ARRAY['alpha', 'beta', 'gamma']) w;
INSERT INTO workflow_version (id, tenant_id, workflow_id, version, definition, definition_hash)
    SELECT gen_random_uuid(), tenant_id, id, 1, '{"steps": [{"id": "a", "tool": "echo"}]}', 'x' FROM workflow;
-- Half the runs belong to tenant-1 (the busy one), the rest spread over the others.
INSERT INTO run (id, tenant_id, workflow_id, workflow_version_id, workflow_name, workflow_version, status,
                 priority, input, version, created_at, updated_at)
WITH ids AS MATERIALIZED (
    SELECT array_agg(w.id ORDER BY t.name = 'tenant-1' DESC, w.name, w.tenant_id) AS a
    FROM workflow w JOIN tenant t ON t.id = w.tenant_id
)
SELECT gen_random_uuid(), w.tenant_id, w.id, v.id, w.name, 1,
       (ARRAY['succeeded','succeeded','succeeded','succeeded','failed','cancelled','running','waiting'])[1 + i % 8],
       'normal', '{}', 1, now() - make_interval(secs => i), now()
FROM generate_series(1, $1::int) i CROSS JOIN ids
JOIN workflow w ON w.id = ids.a[1 + CASE WHEN i % 2 = 0 THEN (i / 2) % 3 ELSE 3 + i % 27 END]
JOIN workflow_version v ON v.workflow_id = w.id;
INSERT INTO step_run (id, tenant_id, run_id, step_id, kind, status, version, attempts, lease_expires_at,
                      wait_deadline, created_at)
SELECT gen_random_uuid(), r.tenant_id, r.id, 'a', 'tool',
       CASE r.status WHEN 'running' THEN 'running' WHEN 'waiting' THEN 'waiting' ELSE 'succeeded' END, 1, 1,
       CASE WHEN r.status = 'running' THEN now() + interval '1 hour' END,
       CASE WHEN r.status = 'waiting' THEN now() + interval '1 day' END, r.created_at
FROM run r;
-- Every 20th run had an agent step, every 10th made two tool calls (one failed): what the workflow stats read.
INSERT INTO step_run (id, tenant_id, run_id, step_id, kind, status, version, attempts, created_at)
SELECT gen_random_uuid(), r.tenant_id, r.id, 'agent', 'agent', 'succeeded', 1, 1, r.created_at
FROM (SELECT *, row_number() OVER () AS n FROM run) r WHERE r.n % 20 = 0;
INSERT INTO run_event (tenant_id, run_id, step_id, type, data, created_at)
SELECT r.tenant_id, r.id, 'a', 'tool_called', jsonb_build_object('tool', 'echo', 'ok', c.ok), r.created_at
FROM (SELECT *, row_number() OVER () AS n FROM run) r CROSS JOIN (VALUES (true), (false)) c(ok) WHERE r.n % 10 = 0;
INSERT INTO outbox (tenant_id, run_id, kind, job_id, queue, created_at)
SELECT tenant_id, id, 'step', id::text, 'steward:normal', now() FROM run WHERE status = 'running' LIMIT 1000;
VACUUM ANALYZE;
"""


async def timed(conn: asyncpg.Connection, sql: str, *args: object, repeat: int = 25) -> tuple[float, str]:  # type: ignore[type-arg]
    await conn.fetch(sql, *args)
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        await conn.fetch(sql, *args)
        samples.append((time.perf_counter() - t) * 1000)
    plan = await conn.fetch("EXPLAIN " + sql, *args)
    top = next((r[0].strip() for r in plan if "Scan" in r[0]), plan[0][0].strip())
    return statistics.median(samples), top.split("  (")[0].replace("->", "").strip()


async def main(args: argparse.Namespace) -> None:
    name = f"steward_runlist_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(args.pg)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = args.pg.rsplit("/", 1)[0] + "/" + name
    try:
        await asyncio.to_thread(run_migrations, url)
        conn = await asyncpg.connect(url)
        t = time.perf_counter()
        await conn.execute("SET synchronous_commit = off")  # only for the fill; the queries only read
        for statement in FILL.split(";\n"):
            if statement.strip():
                await conn.execute(statement, args.runs) if "$1" in statement else await conn.execute(statement)
        fill_s = time.perf_counter() - t
        busy = await conn.fetchval("SELECT id FROM tenant WHERE name = 'tenant-1'")
        count = await conn.fetchval("SELECT count(*) FROM run WHERE tenant_id = $1", busy)
        mid = await conn.fetchrow(
            "SELECT created_at, id FROM run WHERE tenant_id = $1 ORDER BY created_at DESC, id DESC OFFSET $2 LIMIT 1",
            busy, count // 2,
        )
        week_ago = await conn.fetchval("SELECT now() - interval '7 days'")
        terminal = list(stats.TERMINAL)
        page = "ORDER BY created_at DESC, id DESC LIMIT 51"
        cols = "SELECT id, workflow_name, status, created_at FROM run"
        queries = [
            ("list runs, first page", f"{cols} WHERE tenant_id = $1 {page}", (busy,)),
            ("list runs, page in the middle (keyset cursor)",
             f"{cols} WHERE tenant_id = $1 AND (created_at, id) < ($2, $3) {page}",
             (busy, mid["created_at"], mid["id"])),
            ("list runs, status=failed", f"{cols} WHERE tenant_id = $1 AND status = 'failed' {page}", (busy,)),
            ("list runs, workflow=beta", f"{cols} WHERE tenant_id = $1 AND workflow_name = 'beta' {page}", (busy,)),
            *[(f"workflow stats 7d, {part}", sql, (busy, "beta", week_ago, *extra)) for part, sql, extra in (
                ("runs", stats.RUNS_SQL, (terminal,)), ("MTBF/MTTR", stats.RECOVERY_SQL, ()),
                ("agents", stats.AGENTS_SQL, (terminal,)),
                ("dependencies", stats.DEPENDENCIES_SQL, (stats.MAX_DEPENDENCIES,)))],
            ("reconciler: expired leases",
             "SELECT id FROM step_run WHERE status = 'running' AND lease_expires_at < now() LIMIT 200", ()),
            ("reconciler: due wait timeouts",
             "SELECT id FROM step_run WHERE status = 'waiting' AND wait_deadline < now() LIMIT 200", ()),
            ("reconciler: stale outbox rows",
             "SELECT o.job_id FROM outbox o JOIN run r ON r.id = o.run_id WHERE o.created_at < now() - interval '5 s' "
             "AND r.status <> 'paused' ORDER BY o.id LIMIT 1000", ()),
        ]
        print(f"{args.runs:,} runs ({count:,} in the busy tenant), {args.runs:,} step rows; fill took {fill_s:.0f} s")
        print(f"command: {' '.join(sys.argv)}\n")
        print("| query | median ms | plan |\n|---|---:|---|")
        for label, sql, params in queries:
            ms, top = await timed(conn, sql, *params)
            print(f"| {label} | {ms:.2f} | {top} |")
        await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    asyncio.run(main(parser.parse_args()))
