"""The reconciler: repairs what crashes and lost messages leave behind, from Postgres alone.

- running steps whose lease expired (their worker died) fail that attempt as transient and retry;
- waiting steps past their deadline fail (the deferred arq job normally fires first);
- active runs past their ``timeout_s`` limit fail as ``run_timeout`` (paused runs wait for their operator);
- outbox rows not claimed in time (Redis flushed or down, a relay process died) are sent again;
- budget holds whose worker died are settled at their estimate, and the settled spend of tenants without
  caps (kept off their budget windows on the hot path) is folded into those windows, in batches.
Each pass handles a bounded batch; every row is re-checked under its run's lock before anything is
written, so reconcilers running in several worker processes never act on a row twice. Each row is
repaired in a transaction of its own: a row that cannot be repaired (its data broken by hand or by a
bug) is logged with its id, counted in ``rows_failed`` and left for the next pass, and the pass goes
on with the others. A database outage ends the pass instead: every other row would fail the same way.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

from app import metrics
from app.audit import retention as audit_retention
from app.budgets.service import fold_unwindowed, settle_stale
from app.clock import now
from app.config import Settings
from app.engine.actions import RUN_CLOCK, time_out_run
from app.engine.attempts import expire_lease, fire_wait_timeout
from app.engine.transaction import in_tx
from app.engine.unit_of_work import Job, UnitOfWork
from app.outage import is_database_outage
from app.runtime import Runtime

log = logging.getLogger(__name__)
BATCH = 200


@dataclass
class Report:
    leases_expired: int = 0
    waits_timed_out: int = 0
    runs_timed_out: int = 0
    jobs_resent: int = 0
    holds_settled: int = 0
    spend_folded: int = 0  # unwindowed reservations whose cost was added to their windows
    # Rows whose repair raised (logged with their id; tried again next pass).
    rows_failed: int = 0


Repair = Callable[[UnitOfWork, Settings, uuid.UUID], Awaitable[bool]]


async def reconcile_once(runtime: Runtime) -> Report:
    report = Report()
    settings = runtime.settings
    due_leases = await _due(runtime, "lease_expires_at", "running")
    report.leases_expired = await _repair_each(runtime, report, "expiring the lease of step run", due_leases,
                                               expire_lease)
    due_waits = await _due(runtime, "wait_deadline", "waiting")
    report.waits_timed_out = await _repair_each(runtime, report, "timing out the wait of step run", due_waits,
                                                fire_wait_timeout)
    # Before the outbox pass: a run failed here has its outbox rows deleted, nothing to send again.
    report.runs_timed_out = await _repair_each(runtime, report, "timing out run", await _overdue_runs(runtime),
                                               time_out_run)
    report.jobs_resent = await resend_stale_outbox(runtime)
    # Holds of calls whose worker died (a live call settles within its timeout plus a margin).
    async with runtime.pg.acquire() as conn:
        report.holds_settled = await settle_stale(conn, settings.step_timeout_s + settings.lease_s * 2)
        report.spend_folded = await fold_unwindowed(conn)
    # Audit events past settings.audit_retention_days: at most once an hour across all workers.
    await audit_retention.retention_pass(runtime)
    if report.leases_expired or report.waits_timed_out or report.runs_timed_out or report.rows_failed:
        log.info("reconciler: %s", report)
    for kind, count in (("lease_expired", report.leases_expired), ("wait_timed_out", report.waits_timed_out),
                        ("run_timed_out", report.runs_timed_out), ("job_resent", report.jobs_resent),
                        ("hold_settled", report.holds_settled)):
        if count:
            metrics.RECOVERIES.labels(kind).inc(count)
    return report


async def _repair_each(runtime: Runtime, report: Report, what: str, row_ids: list[uuid.UUID], repair: Repair) -> int:
    """Run ``repair`` on each row in a transaction of its own; returns how many it repaired.

    A row whose repair raises is logged and counted, and the others are still repaired; a database
    outage is raised, ending the pass."""
    repaired = 0
    for row_id in row_ids:
        try:
            repaired += await in_tx(runtime, repair, runtime.settings, row_id)
        except Exception as exc:
            if is_database_outage(exc):
                raise
            report.rows_failed += 1
            log.exception("reconciler: %s %s failed; carrying on with the others", what, row_id)
    return repaired


async def _due(runtime: Runtime, column: str, status: str) -> list[uuid.UUID]:
    rows = await runtime.pg.fetch(
        f"SELECT id FROM step_run WHERE status = $1 AND {column} < $2 LIMIT {BATCH}", status, now()
    )
    return [row["id"] for row in rows]


_CLOCK_STATUSES = ", ".join(f"'{status.value}'" for status in RUN_CLOCK)


async def _overdue_runs(runtime: Runtime) -> list[uuid.UUID]:
    """Runs whose clock runs and whose ``timeout_s`` deadline passed (re-checked under their lock)."""
    rows = await runtime.pg.fetch(
        # Spelled out (not a parameter) so the planner can use the partial index ix_run_active.
        f"SELECT r.id FROM run r JOIN run_usage u ON u.run_id = r.id WHERE r.status IN ({_CLOCK_STATUSES}) "
        "AND (u.limits ->> 'timeout_s') IS NOT NULL "
        "AND coalesce(r.started_at, r.created_at) + (u.limits ->> 'timeout_s')::float8 * interval '1 second' < $1 "
        f"LIMIT {BATCH}",
        now(),
    )
    return [row["id"] for row in rows]


async def resend_stale_outbox(runtime: Runtime) -> int:
    """Send again the jobs whose rows outlived ``outbox_stale_s`` (not for paused runs: they wait)."""
    stale = now() - timedelta(seconds=runtime.settings.outbox_stale_s)
    rows = await runtime.pg.fetch(
        "SELECT o.kind, o.job_id, o.queue, o.not_before FROM outbox o JOIN run r ON r.id = o.run_id "
        "WHERE o.created_at < $1 AND (o.not_before IS NULL OR o.not_before < $1) AND r.status <> 'paused' "
        f"ORDER BY o.id LIMIT {BATCH * 5}",
        stale,
    )
    if rows:
        await runtime.relay.send([
            Job(kind=row["kind"], job_id=row["job_id"], queue=row["queue"], not_before=row["not_before"])
            for row in rows
        ])
    return len(rows)
