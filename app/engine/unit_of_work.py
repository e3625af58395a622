"""A unit of engine work: one database transaction plus what it hands on after commit.

New attempts, run events, outbox rows and end-of-run notifications are collected while the engine
applies transitions and written by one statement just before commit; the jobs are relayed to arq
only after commit.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from app import tracing
from app.audit.chain import Entry, append
from app.clock import now
from app.engine.notify import RUN_CHANGED, RUN_DONE, TENANT_CHANGED
from app.engine.state_machine import StaleTransition, bulk_moves_sql
from app.pg import Conn, dumps

QUEUES = ("high", "normal", "low")


@dataclass(frozen=True)
class Job:
    """An arq job to enqueue: ``run_step(attempt_id)`` or ``fire_wait_timeout(step_run_id)``."""

    kind: str
    job_id: str
    queue: str
    not_before: datetime | None = None


# jsonb_to_recordset turns each JSON array into rows: one round trip whatever the batch sizes.
_FLUSH_TEMPLATE = """
WITH attempts AS (
    INSERT INTO step_attempt (id, tenant_id, run_id, step_run_id, n, status, job_id, worker, not_before,
                              queued_at, started_at, trace_context)
    SELECT * FROM jsonb_to_recordset($1::jsonb) AS x(
        id uuid, tenant_id uuid, run_id uuid, step_run_id uuid, n int, status text, job_id text, worker text,
        not_before timestamptz, queued_at timestamptz, started_at timestamptz, trace_context text)
), events AS (
    INSERT INTO run_event (tenant_id, run_id, step_id, map_index, type, data, created_at, trace_id)
    SELECT * FROM jsonb_to_recordset($2::jsonb) AS x(
        tenant_id uuid, run_id uuid, step_id text, map_index int, type text, data jsonb, created_at timestamptz,
        trace_id text)
), outbox AS (
    INSERT INTO outbox (tenant_id, run_id, kind, job_id, queue, not_before, created_at)
    SELECT * FROM jsonb_to_recordset($3::jsonb) AS x(
        tenant_id uuid, run_id uuid, kind text, job_id text, queue text, not_before timestamptz,
        created_at timestamptz)
)
{moves}
SELECT {moved}, count(pg_notify('{channel}', id)),
       -- Open dashboard pages of these runs refresh (app/engine/notify.py): one notification per run.
       (SELECT count(pg_notify('{changed}', run_id)) FROM (
            SELECT DISTINCT event ->> 'run_id' AS run_id FROM jsonb_array_elements($2::jsonb) AS event) AS changed),
       -- Open runs lists of these runs' tenants refresh too: one notification per tenant.
       (SELECT count(pg_notify('{tenant_changed}', tenant_id)) FROM (
            SELECT DISTINCT event ->> 'tenant_id' AS tenant_id FROM jsonb_array_elements($2::jsonb) AS event
       ) AS tenants)
FROM unnest($4::text[]) AS id
"""


@dataclass
class UnitOfWork:
    conn: Conn
    # The tenant of the run being worked on; set when the run is locked.
    tenant_id: uuid.UUID | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    outbox: list[dict[str, Any]] = field(default_factory=list)
    # Jobs to (re-)send after commit: new outbox rows, plus existing ones a resume re-sends.
    jobs: list[Job] = field(default_factory=list)
    # arq jobs to abort after commit (a cancelled run's running steps).
    aborts: list[str] = field(default_factory=list)
    # arq jobs whose attempts another job took over: (queue, job id), removed from Redis after commit.
    dequeue: list[tuple[str, str]] = field(default_factory=list)
    finished_runs: list[uuid.UUID] = field(default_factory=list)
    # Everything flushed so far (events, ended runs), for what happens after commit (metrics).
    written: list[dict[str, Any]] = field(default_factory=list)
    ended: list[uuid.UUID] = field(default_factory=list)
    # Step moves checked already, written by flush (see state_machine.defer_step_move).
    deferred: list[tuple[Any, str, dict[str, Any]]] = field(default_factory=list)
    # Audit events by tenant, inserted (unsealed: a sealer chains them after commit) by the last flush.
    audits: dict[uuid.UUID, list[Entry]] = field(default_factory=dict)

    def event(
        self, run_id: uuid.UUID, type_: str, *, step_id: str | None = None, map_index: int | None = None, **data: Any
    ) -> dict[str, Any]:
        row = {"tenant_id": self.tenant_id, "run_id": run_id, "step_id": step_id, "map_index": map_index,
               "type": type_, "data": data, "created_at": now()}
        # The trace the event was written in (left out, so NULL, with tracing off).
        if (trace_id := tracing.current_trace_id()) is not None:
            row["trace_id"] = trace_id
        self.events.append(row)
        return row

    def audit(self, tenant_id: uuid.UUID, entry: Entry) -> None:
        self.audits.setdefault(tenant_id, []).append(entry)

    def add_attempt(self, *, queue: str | None = None, step_id: str | None = None, map_index: int | None = None,
                    **values: Any) -> None:
        """``queue``: the attempt's job goes through it (``step_id`` and ``map_index`` name the step for
        its ``send`` span); None: this worker runs the attempt inline, or it waits first."""
        attempt = {"worker": None, "not_before": None, "started_at": None, "queued_at": now(), **values}
        # The attempt continues the trace that queued it (through a ``send`` span when it goes through
        # the queue), unless it waits first (a retry's backoff): a trace should not span the wait, so
        # that one starts its own, linked to the run's first.
        if attempt["not_before"] is not None:
            attempt["trace_context"] = None
        elif queue is not None:
            attempt["trace_context"] = tracing.sent(queue, attempt["tenant_id"], attempt["run_id"], step_id,
                                                    attempt["n"], map_index)
        else:
            attempt["trace_context"] = tracing.current_traceparent()
        self.attempts.append(attempt)

    def enqueue(self, run_id: uuid.UUID, job: Job) -> None:
        self.outbox.append({"tenant_id": self.tenant_id, "run_id": run_id, "kind": job.kind, "job_id": job.job_id,
                            "queue": job.queue, "not_before": job.not_before, "created_at": now()})
        self.jobs.append(job)

    async def flush(self, *, audit: bool = True) -> None:
        """Write what was collected; call before commit and before reading steps back (``audit=False``
        there: audit events are written by the flush before commit)."""
        await self._flush_engine()
        if audit and self.audits:
            audits, self.audits = self.audits, {}
            for tenant_id in sorted(audits):
                await append(self.conn, tenant_id, audits[tenant_id])

    async def _flush_engine(self) -> None:
        moves = self.deferred
        if not (self.attempts or self.events or self.outbox or self.finished_runs or moves):
            return
        args: list[Any] = [dumps(self.attempts), dumps(self.events), dumps(self.outbox),
                           [str(r) for r in self.finished_runs]]
        groups = {(to, tuple(sorted(values))) for _, to, values in moves}
        if len(groups) > 1:
            raise AssertionError("deferred step moves must share their target status and columns")
        if moves:
            ((to, columns),) = groups
            args += [to, dumps([{"id": row.id, "version": row.version - 1, **values} for row, _, values in moves])]
        moved = await self.conn.fetchval(_flush_sql(tuple(sorted(moves[0][2])) if moves else None), *args)
        self.written += self.events
        self.ended += self.finished_runs
        self.attempts, self.events, self.outbox, self.finished_runs, self.deferred = [], [], [], [], []
        if moves and moved != len(moves):
            raise StaleTransition(f"{len(moves) - moved} of {len(moves)} deferred step moves were stale")


_flush_cache: dict[tuple[str, ...] | None, str] = {}


def _flush_sql(columns: tuple[str, ...] | None) -> str:
    sql = _flush_cache.get(columns)
    if sql is None:
        if columns is None:
            sql = _FLUSH_TEMPLATE.format(moves="", moved="0", channel=RUN_DONE, changed=RUN_CHANGED,
                                         tenant_changed=TENANT_CHANGED)
        else:
            sql = _FLUSH_TEMPLATE.format(moves=f", moved AS ({bulk_moves_sql(5, 6, columns)})",
                                         moved="(SELECT count(*) FROM moved)", channel=RUN_DONE, changed=RUN_CHANGED,
                                         tenant_changed=TENANT_CHANGED)
        _flush_cache[columns] = sql
    return sql
