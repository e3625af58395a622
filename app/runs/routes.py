"""Run endpoints: start, read, list, long-poll, operator actions, signals."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit.service import entry as audit_entry
from app.auth.deps import require
from app.config import Settings
from app.context import Ctx
from app.db import INT32_MAX, INT64_MAX, Db
from app.engine import actions
from app.engine.advance import RunRow
from app.engine.runtime import Runtime
from app.engine.state_machine import RUN_TERMINAL, RunStatus
from app.engine.unit_of_work import UnitOfWork
from app.errors import Invalid
from app.http import JsonRoute, api_responses, problem_responses
from app.pagination import Limit
from app.pg import driver
from app.runs import schemas
from app.runs import service as runs_service

router = APIRouter(prefix="/api/v1/runs", tags=["runs"], responses=api_responses(404), route_class=JsonRoute)

Viewer = Annotated[Ctx, Depends(require("runs:read"))]
Starter = Annotated[Ctx, Depends(require("runs:start"))]
Operator = Annotated[Ctx, Depends(require("runs:operate"))]
RunStatusParam = Annotated[RunStatus | None, Query(description="only runs in this status")]


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def _commit(request: Request, db: AsyncSession, tx: UnitOfWork) -> None:
    await tx.flush()
    await db.commit()
    await _runtime(request).after_commit(tx)


def _run_response(run: dict[str, Any], status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    # Already JSON-ready (see runs_service.get_run); the response_model only documents it.
    return Response(json.dumps(run, separators=(",", ":")), status_code, headers, media_type="application/json")


@router.post("", status_code=201, response_model=schemas.RunRead, responses=problem_responses(409))
async def start_run(
    request: Request,
    body: schemas.RunCreate,
    db: Db,
    ctx: Starter,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> Response:
    """Start a run. The same `Idempotency-Key` with the same body returns the same run (200)."""
    tx = UnitOfWork(await driver(db), ctx.tenant_id)
    settings: Settings = request.app.state.settings
    run_id, created = await runs_service.create_run(db, tx, ctx, settings, body, idempotency_key)
    if created:
        tx.audit(ctx.tenant_id, audit_entry(ctx, "run.start", f"run:{run_id}", data={
            "workflow": body.workflow, "version": body.version, "idempotency_key": idempotency_key}))
    await _commit(request, db, tx)
    run = await runs_service.get_run(db, ctx, run_id)
    return _run_response(run, 201 if created else 200, {"Location": f"/api/v1/runs/{run_id}"})


@router.get("", response_model=schemas.RunPage)
async def list_runs(
    request: Request,
    db: Db,
    ctx: Viewer,
    status: RunStatusParam = None,
    workflow: Annotated[str | None, Query(max_length=128)] = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Limit = None,
) -> schemas.RunPage:
    settings: Settings = request.app.state.settings
    size = min(limit or settings.page_size_default, settings.page_size_max)
    return await runs_service.list_runs(
        db,
        ctx,
        status=status.value if status else None,
        workflow=workflow,
        created_after=created_after,
        created_before=created_before,
        cursor=cursor,
        limit=size,
    )


@router.get("/{run_id}", response_model=schemas.RunRead)
async def get_run(
    request: Request,
    run_id: uuid.UUID,
    db: Db,
    ctx: Viewer,
    wait: Annotated[
        float | None,
        Query(ge=0, le=86_400, allow_inf_nan=False, description="hold up to this many seconds until the run ends"),
    ] = None,
) -> Response:
    """The run with its steps, attempts and events; `?wait=S` long-polls until it is terminal."""
    if wait:
        settings: Settings = request.app.state.settings
        await _wait_terminal(request, db, ctx, run_id, min(wait, settings.max_long_poll_s))
    return _run_response(await runs_service.get_run(db, ctx, run_id))


async def _wait_terminal(request: Request, db: AsyncSession, ctx: Ctx, run_id: uuid.UUID, wait: float) -> None:
    notifier = _runtime(request).notifier
    assert notifier is not None
    deadline = time.monotonic() + wait
    with notifier.subscribe(run_id) as woken:
        while True:
            # Read in a transaction of its own so each check sees the latest commit.
            status = await runs_service.run_status(db, ctx, run_id)
            await db.rollback()
            left = deadline - time.monotonic()
            if RunStatus(status) in RUN_TERMINAL or left <= 0:
                return
            try:
                # The timer is a backstop for a notification lost while the listener reconnects.
                await asyncio.wait_for(woken.wait(), timeout=min(left, 1.0))
            except TimeoutError:
                pass
            woken.clear()


@router.get("/{run_id}/events", response_model=schemas.EventPage)
async def list_events(
    request: Request,
    run_id: uuid.UUID,
    db: Db,
    ctx: Viewer,
    cursor: Annotated[int | None, Query(ge=0, le=INT64_MAX, description="events after this id")] = None,
    limit: Limit = None,
) -> schemas.EventPage:
    settings: Settings = request.app.state.settings
    size = min(limit or settings.page_size_default, settings.page_size_max)
    return await runs_service.list_events(db, ctx, run_id, after=cursor, limit=size)


@router.get("/{run_id}/steps/{step_id}/conversation", response_model=schemas.ConversationPage)
async def step_conversation(
    request: Request,
    run_id: uuid.UUID,
    step_id: str,
    db: Db,
    ctx: Viewer,
    cursor: Annotated[int | None, Query(ge=0, le=INT32_MAX, description="entries after this seq")] = None,
    limit: Limit = None,
) -> schemas.ConversationPage:
    """The full conversation of an ``llm`` or ``agent`` step: model turns and tool results, as checkpointed."""
    settings: Settings = request.app.state.settings
    size = min(limit or settings.page_size_default, settings.page_size_max)
    return await runs_service.list_conversation(db, ctx, run_id, step_id, after=cursor, limit=size)


Action = Callable[[UnitOfWork, Settings, uuid.UUID, uuid.UUID, str], Awaitable[RunRow]]


async def _act(
    request: Request, db: AsyncSession, ctx: Ctx, run_id: uuid.UUID, action: Action
) -> Response:
    tx = UnitOfWork(await driver(db), ctx.tenant_id)
    await action(tx, request.app.state.settings, run_id, ctx.tenant_id, ctx.principal)
    tx.audit(ctx.tenant_id, audit_entry(ctx, f"run.{action.__name__.removesuffix('_run')}", f"run:{run_id}"))
    await _commit(request, db, tx)
    return _run_response(await runs_service.get_run(db, ctx, run_id))


@router.post("/{run_id}/pause", response_model=schemas.RunRead, responses=problem_responses(409))
async def pause_run(request: Request, run_id: uuid.UUID, db: Db, ctx: Operator) -> Response:
    """Stop dispatching new steps; steps already running finish and are recorded."""
    return await _act(request, db, ctx, run_id, actions.pause_run)


@router.post("/{run_id}/resume", response_model=schemas.RunRead, responses=problem_responses(409))
async def resume_run(request: Request, run_id: uuid.UUID, db: Db, ctx: Operator) -> Response:
    return await _act(request, db, ctx, run_id, actions.resume_run)


@router.post("/{run_id}/cancel", response_model=schemas.RunRead, responses=problem_responses(409))
async def cancel_run(request: Request, run_id: uuid.UUID, db: Db, ctx: Operator) -> Response:
    """Cancel queued steps and abort running ones."""
    return await _act(request, db, ctx, run_id, actions.cancel_run)


@router.post("/{run_id}/retry", response_model=schemas.RunRead, responses=problem_responses(409))
async def retry_run(request: Request, run_id: uuid.UUID, db: Db, ctx: Operator) -> Response:
    """Run a failed run again from its failed steps; completed steps are not re-run."""
    return await _act(request, db, ctx, run_id, actions.retry_run)


@router.post("/{run_id}/signals/{name}", response_model=schemas.RunRead, responses=problem_responses(409))
async def signal_run(
    request: Request,
    run_id: uuid.UUID,
    name: str,
    db: Db,
    ctx: Starter,
    body: schemas.SignalBody | None = None,
) -> Response:
    """Deliver a signal: the steps waiting for `name` succeed with `payload` as their output."""
    if len(name) > 128:
        raise Invalid(
            "signal name too long", errors=[{"pointer": "/path/name", "message": "at most 128 characters"}]
        )
    tx = UnitOfWork(await driver(db), ctx.tenant_id)
    payload: Any = body.payload if body is not None else None
    await actions.signal_run(
        tx, request.app.state.settings, run_id, ctx.tenant_id, name, payload, ctx.principal
    )
    tx.audit(ctx.tenant_id, audit_entry(ctx, "run.signal", f"run:{run_id}", data={"signal": name}))
    await _commit(request, db, tx)
    return _run_response(await runs_service.get_run(db, ctx, run_id))
