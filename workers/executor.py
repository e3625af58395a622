"""Runs one claimed step (a tool call, or a model step) under a hard timeout, renewing the lease meanwhile."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import httpx

from app.config import Settings
from app.engine.advance import Claimed, step_timeout
from app.engine.attempts import Outcome, renew_lease
from app.engine.checkpoints import Fenced
from app.outage import DATABASE, Backoff, is_database_outage
from app.runtime import Runtime
from app.tools.breaker import Breaker
from app.tools.calls import Caller, CallSite, run_scope
from app.workflows.steps import Definition, MapStep, ModelStep, StepDef, ToolStep
from workers.agent import run_model_step

log = logging.getLogger(__name__)
# The error class of an attempt that could not reach the database (transient: retried).
UNAVAILABLE = "database_unavailable"


@dataclass
class Lease:
    """When this worker's lease on a step runs out, as far as it knows: a ``time.monotonic()`` taken before
    the claim or renewal was sent, plus ``lease_s``, so never later than the lease in the database."""

    expires: float


def _now() -> datetime:
    return datetime.now(UTC)


def tool_name(step: StepDef, claimed: Claimed) -> str:
    if claimed.map_index is not None:
        assert isinstance(step, MapStep)
        return step.map.tool
    assert isinstance(step, ToolStep)
    return step.tool


async def execute(runtime: Runtime, http: httpx.AsyncClient, breaker: Breaker, definition: Definition,
                  claimed: Claimed, lease: Lease) -> Outcome:
    """Run the step's tool call through the guardrails (app/tools/calls.py), or its model step
    (workers/agent.py), under the step's hard timeout.

    A tool step that cannot reach the database before its call is run again once it can, while the
    lease lasts: the tool was not called (the only database write after a call, the budget settlement,
    is left to the reconciler when it fails), so no attempt is spent on an outage.
    """
    step = definition.step(claimed.step_id)
    backoff = Backoff()
    while True:
        outcome = await _execute_once(runtime, http, breaker, definition, claimed, lease)
        if outcome.error_class != UNAVAILABLE or isinstance(step, ModelStep):
            return outcome
        delay = backoff.next()
        if time.monotonic() + delay >= lease.expires:
            return outcome
        await asyncio.sleep(delay)


async def _execute_once(runtime: Runtime, http: httpx.AsyncClient, breaker: Breaker, definition: Definition,
                        claimed: Claimed, lease: Lease) -> Outcome:
    settings = runtime.settings
    step = definition.step(claimed.step_id)
    timeout = step_timeout(step, settings)
    started = _now()
    heartbeat = None
    if timeout > settings.lease_s / 3:
        heartbeat = asyncio.create_task(_renew_lease(runtime, claimed, lease))
    try:
        async with asyncio.timeout(timeout):
            async with runtime.pg.acquire() as conn:
                scope = await run_scope(conn, claimed.run_id, claimed.tenant_id, definition.permissions,
                                        definition.shadow)
            caller = Caller(runtime, http, scope, breaker)
            if isinstance(step, ModelStep):
                model_outcome = await run_model_step(runtime, http, caller, step, claimed)
            else:
                site = CallSite(claimed.step_run_id, claimed.step_id, claimed.attempt_n, claimed.idempotency_key)
                result = await caller.call(site, tool_name(step, claimed), claimed.args)
    except TimeoutError:
        return Outcome(False, started, _now(), error_class="timeout", transient=True,
                       message=f"step did not finish within {timeout:g}s")
    except Fenced as exc:  # the step moved on without us: nothing of this attempt may be recorded
        log.info("%s", exc)
        return Outcome(False, started, _now(), error_class="fenced", message=str(exc), transient=True)
    except Exception as exc:  # a bug in a tool must fail the step, not the worker
        if is_database_outage(exc):
            DATABASE.down(exc)
            return Outcome(False, started, _now(), error_class=UNAVAILABLE, transient=True,
                           message="the database could not be reached")
        log.exception("step %s crashed", claimed.step_id)
        return Outcome(False, started, _now(), error_class="internal", message=f"{type(exc).__name__}: {exc}")
    finally:
        if heartbeat is not None:
            heartbeat.cancel()
    if isinstance(step, ModelStep):
        if not model_outcome.ok:
            return model_outcome
        return replace(_checked(model_outcome.output, started, settings), events=model_outcome.events)
    if result.ok:
        checked = _checked(result.output, started, settings)
        if not checked.ok:
            return replace(checked, events=result.events, audits=result.audits)
    # The call's result is the attempt's outcome; the attempt began before the call's lookups.
    return replace(result, started_at=started, finished_at=_now())


def _checked(output: object, started: datetime, settings: Settings) -> Outcome:
    try:
        size = len(json.dumps(output, separators=(",", ":"), allow_nan=False))
    except (TypeError, ValueError) as exc:  # NaN, Infinity, or no JSON at all: Postgres would refuse it
        return Outcome(False, started, _now(), error_class="output_invalid", message=f"output is not JSON: {exc}")
    if size > settings.max_output_bytes:
        return Outcome(
            False,
            started,
            _now(),
            error_class="output_too_large",
            message=f"output is {size} bytes; the limit is {settings.max_output_bytes}",
        )
    return Outcome(True, started, _now(), output=output)


async def _renew_lease(runtime: Runtime, claimed: Claimed, lease: Lease) -> None:
    """Extend the lease while the step runs; a dead worker stops renewing and its lease runs out.

    A renewal that fails (the database is away) changes nothing: the step goes on, and ``lease`` keeps
    the expiry the database last accepted, which bounds how long the outcome may be recorded in.
    """
    interval = runtime.settings.lease_s / 3
    while True:
        await asyncio.sleep(interval)
        sent = time.monotonic()
        try:
            async with runtime.pg.acquire() as conn:
                if not await renew_lease(conn, claimed, runtime.settings.lease_s):
                    return  # the step moved on without us (cancelled, or the lease already expired)
            lease.expires = sent + runtime.settings.lease_s
        except Exception as exc:
            if is_database_outage(exc):
                DATABASE.down(exc)
            else:
                log.warning("lease renewal failed for step run %s", claimed.step_run_id, exc_info=True)
