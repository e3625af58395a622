"""arq job functions (module level: arq finds them by name).

A database outage is waited out, not raised to arq (which would log a traceback per job): claims and
outcomes are retried while the step's lease lasts (see :func:`run_step`); the reconciler and timers
simply skip their turn, and the next one repairs what was left.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from opentelemetry.trace import SpanKind

from app import metrics, tracing
from app.engine.advance import Claimed, Claimer, cached_definition, load_definition, queue_name
from app.engine.attempts import Outcome, claim_attempt, record_outcomes
from app.engine.attempts import fire_wait_timeout as fire_wait_timeout_tx
from app.engine.reconciler import reconcile_once
from app.engine.transaction import DatabaseUnavailable, in_tx
from app.engine.unit_of_work import UnitOfWork
from app.logs import bound
from app.outage import DATABASE, Backoff, is_database_outage, quiet_database_outage
from app.runtime import Runtime
from app.tools.breaker import Breaker
from workers.executor import UNAVAILABLE, Lease, execute

log = logging.getLogger(__name__)


async def run_step(ctx: dict[str, Any], attempt_id: str) -> None:
    """Claim the attempt (and up to ``worker_batch`` ready siblings), run them side by side, record
    outcomes as they land, and keep running the run's next ready steps inline until none is left.

    While the database is away, a claim is tried again for up to ``lease_s`` (after that the job is
    dropped: its outbox row stays, and the reconciler sends it again), and an outcome is tried again
    until the lease of one of its steps would run out. Within the lease no other worker may take the
    step, so a tool call that finished during a short outage is recorded, never run again; past it the
    reconciler gives the step to someone else, and what we would record is stale anyway (the versioned
    transition refuses it).
    """
    runtime: Runtime = ctx["runtime"]
    settings = runtime.settings
    batch = max(1, settings.worker_batch)
    claimer = Claimer(worker_id=ctx["worker_id"], job_id=ctx["job_id"], capacity=batch)
    began: list[float] = []

    async def claim(tx: UnitOfWork) -> list[Claimed]:
        began.append(time.monotonic())  # the lease the committed try takes starts after this
        return await claim_attempt(tx, settings, uuid.UUID(attempt_id), claimer)

    try:
        claimed = await in_tx(runtime, claim, until=time.monotonic() + settings.lease_s)
    except DatabaseUnavailable:
        return  # logged by the outage tracker; the outbox row outlives this job
    leases = {c.step_run_id: Lease(began[-1] + settings.lease_s) for c in claimed}
    running: dict[asyncio.Task[Outcome], Claimed] = {}
    results: list[tuple[Claimed, Outcome]] = []
    solo: Claimed | None = None
    started = 0
    # The traceparent of each attempt's ``process`` span (tracing on): its outcome is recorded in it.
    ran_in: dict[uuid.UUID, str] = {}
    try:
        while claimed or running:
            started += len(claimed)
            if len(claimed) == 1 and not running:
                # One step at a time (a chain): run it here, without a task to schedule and wait for.
                solo = claimed[0]
                results = [(solo, await _execute(runtime, ctx["http"], ctx["breaker"], solo, leases[solo.step_run_id],
                                                 ran_in))]
                solo = None
            else:
                for c in claimed:
                    task = asyncio.create_task(_execute(runtime, ctx["http"], ctx["breaker"], c, leases[c.step_run_id],
                                                        ran_in))
                    running[task] = c
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                results = [(running.pop(task), task.result()) for task in done]
            room = batch - len(running) if started < settings.inline_continue_max else 0
            with tracing.resumed(ran_in.get(results[0][0].attempt_id)):
                claimed, claimed_at = await _record(runtime, results, replace(claimer, capacity=room), leases)
            for c, _ in results:
                leases.pop(c.step_run_id, None)
                ran_in.pop(c.attempt_id, None)
            leases.update({c.step_run_id: Lease(claimed_at + settings.lease_s) for c in claimed})
            results = []
    except asyncio.CancelledError:
        # Aborted (the run was cancelled: already recorded) or the worker is shutting down: record
        # interrupted attempts so they are retried now rather than when their leases run out.
        for task in running:
            task.cancel()
        unrecorded = [*running.values(), *(c for c, _ in results), *([solo] if solo else [])]
        await asyncio.shield(_interrupted(runtime, unrecorded))
        raise


async def _execute(runtime: Runtime, http: Any, breaker: Breaker, claimed: Claimed, lease: Lease,
                   ran_in: dict[uuid.UUID, str]) -> Outcome:
    queue = queue_name(runtime.settings, claimed.priority)
    attributes = tracing.queue_attributes("process", queue, claimed.tenant_id, claimed.run_id, claimed.step_id,
                                          claimed.attempt_n, claimed.map_index)
    process = tracing.continued(f"process {queue}", attributes, SpanKind.CONSUMER, claimed.trace_context,
                                claimed.run_trace_context)
    with bound(tenant=claimed.tenant_id, run=claimed.run_id, step=claimed.step_id, item=claimed.map_index,
               attempt=claimed.attempt_n), process as current:
        if (traceparent := tracing.current_traceparent()) is not None:
            ran_in[claimed.attempt_id] = traceparent
        outcome = await _execute_bound(runtime, http, breaker, claimed, lease)
        definition = cached_definition(claimed.workflow_version_id)
        seconds = (outcome.finished_at - outcome.started_at).total_seconds()
        kind = definition.step(claimed.step_id).kind if definition is not None else "unknown"
        metrics.observe_attempt(kind, outcome.ok, outcome.error_class, seconds)
        current.set_attribute("steward.step.kind", kind)
        tracing.outcome(current, outcome.ok, outcome.error_class)
        # Messages are what the run's events say (tool errors scrubbed of secrets), never arguments.
        log.debug("attempt %d of step %s: %s in %.0f ms", claimed.attempt_n, claimed.step_id,
                  "ok" if outcome.ok else f"{outcome.error_class}: {outcome.message}", seconds * 1000)
        return outcome


async def _execute_bound(runtime: Runtime, http: Any, breaker: Breaker, claimed: Claimed, lease: Lease) -> Outcome:
    backoff = Backoff()
    while (definition := cached_definition(claimed.workflow_version_id)) is None:
        try:
            async with runtime.pg.acquire() as conn:
                definition = await load_definition(conn, claimed.workflow_version_id)
            break
        except Exception as exc:
            if not is_database_outage(exc):
                raise
            DATABASE.down(exc)
            delay = backoff.next()
            if time.monotonic() + delay >= lease.expires:
                t = datetime.now(UTC)
                return Outcome(False, t, t, error_class=UNAVAILABLE, transient=True,
                               message="the database could not be reached")
            await asyncio.sleep(delay)
    return await execute(runtime, http, breaker, definition, claimed, lease)


async def _record(
    runtime: Runtime, results: list[tuple[Claimed, Outcome]], claimer: Claimer, leases: dict[uuid.UUID, Lease]
) -> tuple[list[Claimed], float]:
    """Record the outcomes, trying again through an outage until the first of their leases runs out;
    returns the steps claimed inline and when the transaction that claimed them began."""
    began: list[float] = []

    async def record(tx: UnitOfWork) -> list[Claimed]:
        pending = results
        if began:
            # An earlier try may have committed before its connection was lost: record what is not yet.
            rows = await tx.conn.fetch("SELECT id FROM step_attempt WHERE id = ANY($1::uuid[]) AND status = 'running'",
                                       [c.attempt_id for c, _ in results])
            still = {r["id"] for r in rows}
            pending = [(c, o) for c, o in results if c.attempt_id in still]
        began.append(time.monotonic())
        return await record_outcomes(tx, runtime.settings, pending, claimer) if pending else []

    until = min(leases[c.step_run_id].expires for c, _ in results)
    try:
        return await in_tx(runtime, record, until=until), began[-1]
    except DatabaseUnavailable:
        log.warning("could not record %d step outcome(s) of run %s before the lease ran out; the reconciler "
                    "will retry those steps", len(results), results[0][0].run_id)
        return [], time.monotonic()


async def _interrupted(runtime: Runtime, claimed: list[Claimed]) -> None:
    if not claimed:
        return
    t = datetime.now(UTC)
    outcome = Outcome(False, t, t, error_class="interrupted", transient=True, message="worker stopped mid-step")
    try:
        await in_tx(runtime, record_outcomes, runtime.settings, [(c, outcome) for c in claimed], None)
    except Exception as exc:  # the leases will expire and the reconciler retries the steps instead
        if is_database_outage(exc):
            DATABASE.down(exc)
        else:
            log.warning("could not record %d interrupted attempts", len(claimed), exc_info=True)


async def fire_wait_timeout(ctx: dict[str, Any], step_run_id: str) -> None:
    runtime: Runtime = ctx["runtime"]
    with quiet_database_outage():  # the reconciler fires overdue waits from Postgres
        await in_tx(runtime, fire_wait_timeout_tx, runtime.settings, uuid.UUID(step_run_id))


async def reconcile(ctx: dict[str, Any]) -> None:
    with quiet_database_outage():  # the next pass does what this one could not
        await reconcile_once(ctx["runtime"])
