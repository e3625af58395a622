"""arq job functions (module level: arq finds them by name)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from app.engine.advance import Claimed, Claimer, cached_definition, load_definition
from app.engine.attempts import Outcome, claim_attempt, record_outcomes
from app.engine.attempts import fire_wait_timeout as fire_wait_timeout_tx
from app.engine.reconciler import reconcile_once
from app.engine.runtime import Runtime
from app.engine.unit import in_tx
from app.tools.breaker import Breaker
from workers.executor import execute

log = logging.getLogger(__name__)


async def run_step(ctx: dict[str, Any], attempt_id: str) -> None:
    """Claim the attempt (and up to ``worker_batch`` ready siblings), run them side by side, record
    outcomes as they land, and keep running the run's next ready steps inline until none is left."""
    runtime: Runtime = ctx["runtime"]
    settings = runtime.settings
    batch = max(1, settings.worker_batch)
    claimer = Claimer(worker_id=ctx["worker_id"], job_id=ctx["job_id"], capacity=batch)
    claimed = await in_tx(runtime, claim_attempt, settings, uuid.UUID(attempt_id), claimer)
    running: dict[asyncio.Task[Outcome], Claimed] = {}
    results: list[tuple[Claimed, Outcome]] = []
    solo: Claimed | None = None
    started = 0
    try:
        while claimed or running:
            started += len(claimed)
            if len(claimed) == 1 and not running:
                # One step at a time (a chain): run it here, without a task to schedule and wait for.
                solo = claimed[0]
                results = [(solo, await _execute(runtime, ctx["http"], ctx["breaker"], solo))]
                solo = None
            else:
                for c in claimed:
                    running[asyncio.create_task(_execute(runtime, ctx["http"], ctx["breaker"], c))] = c
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                results = [(running.pop(task), task.result()) for task in done]
            room = batch - len(running) if started < settings.inline_continue_max else 0
            claimed = await in_tx(runtime, record_outcomes, settings, results, replace(claimer, capacity=room))
            results = []
    except asyncio.CancelledError:
        # Aborted (the run was cancelled: already recorded) or the worker is shutting down: record
        # interrupted attempts so they are retried now rather than when their leases run out.
        for task in running:
            task.cancel()
        unrecorded = [*running.values(), *(c for c, _ in results), *([solo] if solo else [])]
        await asyncio.shield(_interrupted(runtime, unrecorded))
        raise


async def _execute(runtime: Runtime, http: Any, breaker: Breaker, claimed: Claimed) -> Outcome:
    definition = cached_definition(claimed.workflow_version_id)
    if definition is None:
        async with runtime.pg.acquire() as conn:
            definition = await load_definition(conn, claimed.workflow_version_id)
    return await execute(runtime, http, breaker, definition, claimed)


async def _interrupted(runtime: Runtime, claimed: list[Claimed]) -> None:
    if not claimed:
        return
    t = datetime.now(UTC)
    outcome = Outcome(False, t, t, error_class="interrupted", transient=True, message="worker stopped mid-step")
    try:
        await in_tx(runtime, record_outcomes, runtime.settings, [(c, outcome) for c in claimed], None)
    except Exception:  # the leases will expire and the reconciler retries the steps instead
        log.warning("could not record %d interrupted attempts", len(claimed), exc_info=True)


async def fire_wait_timeout(ctx: dict[str, Any], step_run_id: str) -> None:
    runtime: Runtime = ctx["runtime"]
    await in_tx(runtime, fire_wait_timeout_tx, runtime.settings, uuid.UUID(step_run_id))


async def reconcile(ctx: dict[str, Any]) -> None:
    await reconcile_once(ctx["runtime"])
