"""A workflow's reliability figures over a window: outcomes, rates, durations, cost, MTBF and MTTR, the
health of the tools and model providers it depends on, and its error budget when it sets an objective.

Every figure counts the runs of the workflow (all versions) *created* in the window, so the figures of
one window describe one population of runs. Definitions (docs/api.md, "Workflow reliability"):

- completion rate: finished runs (succeeded, failed, cancelled) over all runs of the window;
- success rate: succeeded over finished;
- agent success rate: ``agent`` steps that succeeded without intervention (no approval asked for the
  step, no operator pause, resume or retry of its run) over agent steps that finished;
- MTBF: the mean time between consecutive failed runs (by the time they finished);
- MTTR: the mean time from a failed run that follows a success (or opens the window) to the next
  succeeded run: one recovery per stretch of failures;
- error budget: with ``slo: {success_rate, window}`` in the latest version's definition, the share of
  the failures the objective allows over the SLO's window that is still unspent (negative when overspent).
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy.ext.asyncio import AsyncSession

from app.clock import now
from app.context import Ctx
from app.pg import driver
from app.workflows.service import WorkflowNotFound

Window = Literal["24h", "7d", "30d"]
WINDOWS: dict[str, timedelta] = {"24h": timedelta(hours=24), "7d": timedelta(days=7), "30d": timedelta(days=30)}
TERMINAL = ("succeeded", "failed", "cancelled")
# Dependencies listed, most called first.
MAX_DEPENDENCIES = 20

RUNS_SQL = """
WITH w AS (
    SELECT r.id, r.status, r.created_at, r.finished_at FROM run r
    WHERE r.tenant_id = $1 AND r.workflow_name = $2 AND r.created_at >= $3
)
SELECT
    (SELECT coalesce(jsonb_object_agg(status, n), '{}') FROM (SELECT status, count(*) AS n FROM w GROUP BY status) s)
        AS by_status,
    (SELECT percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at))
       FROM w WHERE status = ANY($4::text[]) AND finished_at IS NOT NULL) AS durations,
    (SELECT avg(u.cost_usd) FROM w JOIN run_usage u ON u.run_id = w.id WHERE w.status = ANY($4::text[])) AS cost
"""

# MTBF and MTTR over the window's finished runs in the order they finished. The time of the next success
# after each run is a running minimum read backwards (a frame anchored at one end: linear, not quadratic).
RECOVERY_SQL = """
WITH f AS (
    SELECT status, finished_at,
           lag(status) OVER (ORDER BY finished_at, id) AS before,
           min(finished_at) FILTER (WHERE status = 'succeeded') OVER (
               ORDER BY finished_at DESC, id DESC ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS next_success
    FROM run
    WHERE tenant_id = $1 AND workflow_name = $2 AND created_at >= $3 AND status IN ('succeeded', 'failed')
      AND finished_at IS NOT NULL
), failures AS (
    SELECT finished_at - lag(finished_at) OVER (ORDER BY finished_at) AS gap FROM f WHERE status = 'failed'
)
SELECT (SELECT extract(epoch FROM avg(gap)) FROM failures) AS mtbf,
       (SELECT extract(epoch FROM avg(next_success - finished_at)) FROM f
         WHERE status = 'failed' AND (before IS NULL OR before = 'succeeded') AND next_success IS NOT NULL) AS mttr
"""

AGENTS_SQL = """
SELECT count(*) FILTER (WHERE s.status = ANY($4::text[])) AS finished,
       count(*) FILTER (WHERE s.status = 'succeeded' AND NOT EXISTS (
           SELECT 1 FROM run_event e WHERE e.run_id = s.run_id
              AND (e.type IN ('run_paused', 'run_retried') OR (e.type = 'approval_requested' AND e.step_id = s.step_id))
       )) AS unaided
FROM step_run s JOIN run r ON r.id = s.run_id
WHERE s.tenant_id = $1 AND s.kind = 'agent' AND s.created_at >= $3 AND s.map_index IS NULL
  AND r.tenant_id = $1 AND r.workflow_name = $2 AND r.created_at >= $3
"""

# Tool calls (tool steps and agents' calls) and model calls, by tool and by provider. A step or event of a
# run created in the window was itself created in it: the bound on its own created_at loses nothing and
# lets the partial index by tenant and time do the work.
DEPENDENCIES_SQL = """
SELECT kind, name, count(*) AS calls, count(*) FILTER (WHERE ok) AS ok FROM (
    SELECT CASE WHEN e.type LIKE 'tool%' THEN 'tool' ELSE 'provider' END AS kind,
           CASE WHEN e.type LIKE 'tool%' THEN e.data ->> 'tool' ELSE split_part(e.data ->> 'model', '/', 1) END AS name,
           e.type = 'model_called' OR (e.type = 'tool_called' AND (e.data ->> 'ok')::boolean) AS ok
    FROM run_event e JOIN run r ON r.id = e.run_id
    WHERE e.tenant_id = $1 AND e.created_at >= $3
      AND e.type IN ('tool_called', 'tool_call_failed', 'model_called', 'model_call_failed')
      AND r.tenant_id = $1 AND r.workflow_name = $2 AND r.created_at >= $3
) calls
WHERE name IS NOT NULL
GROUP BY kind, name ORDER BY calls DESC, kind, name LIMIT $4
"""

OBJECTIVE_RUNS_SQL = """
SELECT count(*) FILTER (WHERE status = ANY($4::text[])) AS finished, count(*) FILTER (WHERE status = 'failed') AS failed
FROM run WHERE tenant_id = $1 AND workflow_name = $2 AND created_at >= $3
"""

LATEST_SQL = """
SELECT v.definition -> 'slo' AS slo FROM workflow w JOIN workflow_version v
  ON v.workflow_id = w.id AND v.version = w.latest_version
WHERE w.tenant_id = $1 AND w.name = $2
"""


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 6) if whole else None


async def workflow_stats(db: AsyncSession, ctx: Ctx, name: str, window: Window) -> dict[str, Any]:
    conn = await driver(db)
    latest = await conn.fetchrow(LATEST_SQL, ctx.tenant_id, name)
    if latest is None:
        raise WorkflowNotFound(f"workflow {name!r} not found")
    at = now()
    since = at - WINDOWS[window]
    runs = await conn.fetchrow(RUNS_SQL, ctx.tenant_id, name, since, list(TERMINAL))
    recovery = await conn.fetchrow(RECOVERY_SQL, ctx.tenant_id, name, since)
    agents = await conn.fetchrow(AGENTS_SQL, ctx.tenant_id, name, since, list(TERMINAL))
    dependencies = await conn.fetch(DEPENDENCIES_SQL, ctx.tenant_id, name, since, MAX_DEPENDENCIES)

    by_status: dict[str, int] = dict(runs["by_status"])
    total = sum(by_status.values())
    finished = sum(by_status.get(status, 0) for status in TERMINAL)
    durations = runs["durations"] or [None, None, None]
    cost: Decimal | None = runs["cost"]
    stats: dict[str, Any] = {
        "workflow": name, "window": window, "since": since, "until": at,
        "runs": {"total": total, "by_status": by_status},
        "completion_rate": _rate(finished, total),
        "success_rate": _rate(by_status.get("succeeded", 0), finished),
        "agent_success_rate": _rate(agents["unaided"], agents["finished"]),
        "agent_steps": agents["finished"],
        "duration_s": {"p50": durations[0], "p95": durations[1], "p99": durations[2]},
        "cost_per_run_usd": str(cost.quantize(Decimal("0.000001"))) if cost is not None else None,
        "mtbf_s": float(recovery["mtbf"]) if recovery["mtbf"] is not None else None,
        "mttr_s": float(recovery["mttr"]) if recovery["mttr"] is not None else None,
        "dependencies": [
            {"kind": row["kind"], "name": row["name"], "calls": row["calls"],
             "success_rate": _rate(row["ok"], row["calls"])}
            for row in dependencies
        ],
        "objective": None,
    }
    if slo := latest["slo"]:
        slo_since = at - WINDOWS[slo["window"]]
        counts = await conn.fetchrow(OBJECTIVE_RUNS_SQL, ctx.tenant_id, name, slo_since, list(TERMINAL))
        allowed = (1 - float(slo["success_rate"])) * counts["finished"]
        stats["objective"] = {
            "success_rate": slo["success_rate"], "window": slo["window"], "finished": counts["finished"],
            "failed": counts["failed"], "allowed_failures": round(allowed, 3),
            "error_budget_left": round(1 - counts["failed"] / allowed, 6) if allowed else None,
        }
    return stats
