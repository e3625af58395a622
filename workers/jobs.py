"""arq job functions (module level: arq finds them by name)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

from app.engine.advance import Claimed, Claimer, cached_definition, load_definition
from app.engine.attempts import Outcome, claim_attempt, record_outcome
from app.engine.attempts import fire_wait_timeout as fire_wait_timeout_tx
from app.engine.reconciler import reconcile_once
from app.engine.runtime import Runtime
from app.engine.unit import in_tx
from workers.executor import execute

log = logging.getLogger(__name__)


async def run_step(ctx: dict[str, Any], attempt_id: str) -> None:
    """Claim the attempt, run it, record it; then keep running the run's next ready step inline."""
    runtime: Runtime = ctx["runtime"]
    settings = runtime.settings
    claimer = Claimer(worker_id=ctx["worker_id"], job_id=ctx["job_id"])
    claimed = await in_tx(runtime, claim_attempt, settings, uuid.UUID(attempt_id), claimer)
    chained = 0
    while claimed is not None:
        current: Claimed = claimed
        definition = cached_definition(current.workflow_version_id)
        if definition is None:
            async with runtime.pg.acquire() as conn:
                definition = await load_definition(conn, current.workflow_version_id)
        step = definition.step(current.step_id)
        try:
            outcome = await execute(runtime, ctx["http"], step, current)
        except asyncio.CancelledError:
            # Aborted (the run was cancelled: already recorded) or the worker is shutting down:
            # record an interrupted attempt so it is retried now rather than when the lease runs out.
            await asyncio.shield(_interrupted(runtime, current))
            raise
        chained += 1
        next_claimer = claimer if chained < settings.inline_continue_max else None
        claimed = await in_tx(runtime, record_outcome, settings, current, outcome, next_claimer)


async def _interrupted(runtime: Runtime, claimed: Claimed) -> None:
    t = datetime.now(UTC)
    outcome = Outcome(
        False, t, t, error_class="interrupted", transient=True, message="worker stopped mid-step"
    )
    try:
        await in_tx(runtime, record_outcome, runtime.settings, claimed, outcome, None)
    except Exception:  # the lease will expire and the reconciler retries the step instead
        log.warning("could not record the interrupted attempt %s", claimed.attempt_id, exc_info=True)


async def fire_wait_timeout(ctx: dict[str, Any], step_run_id: str) -> None:
    runtime: Runtime = ctx["runtime"]
    await in_tx(runtime, fire_wait_timeout_tx, runtime.settings, uuid.UUID(step_run_id))


async def reconcile(ctx: dict[str, Any]) -> None:
    await reconcile_once(ctx["runtime"])
