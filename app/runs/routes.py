"""Run endpoints: start, read, list, long-poll, operator actions, signals."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Response

from app.auth.deps import require
from app.context import Ctx
from app.db import INT32_MAX, INT64_MAX, Db
from app.engine.state_machine import RunStatus
from app.errors import Invalid
from app.http import AppSettings, JsonRoute, api_responses, problem_responses
from app.pagination import Limit, page_size
from app.request_work import Work
from app.runs import schemas
from app.runs import service as runs_service
from app.runtime import AppRuntime

router = APIRouter(prefix="/api/v1/runs", tags=["runs"], responses=api_responses(404), route_class=JsonRoute)

Viewer = Annotated[Ctx, Depends(require("runs:read"))]
Starter = Annotated[Ctx, Depends(require("runs:start"))]
Operator = Annotated[Ctx, Depends(require("runs:operate"))]
RunStatusParam = Annotated[RunStatus | None, Query(description="only runs in this status")]


def _run_response(run: dict[str, Any], status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    # Already JSON-ready (see runs_service.get_run); the response_model only documents it.
    return Response(json.dumps(run, separators=(",", ":")), status_code, headers, media_type="application/json")


@router.post("", status_code=201, response_model=schemas.RunRead, responses=problem_responses(409))
async def start_run(
    body: schemas.RunCreate,
    db: Db,
    ctx: Starter,
    work: Work,
    settings: AppSettings,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> Response:
    """Start a run. The same `Idempotency-Key` with the same body returns the same run (200)."""
    run, created = await runs_service.start_run(db, work, ctx, settings, body, idempotency_key)
    return _run_response(run, 201 if created else 200, {"Location": f"/api/v1/runs/{run['id']}"})


@router.get("", response_model=schemas.RunPage)
async def list_runs(
    db: Db,
    ctx: Viewer,
    settings: AppSettings,
    status: RunStatusParam = None,
    workflow: Annotated[str | None, Query(max_length=128)] = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    reason: Annotated[str | None, Query(max_length=64, description="only runs with this status_reason "
                                        "(budget_exhausted, run_timeout)")] = None,
    awaiting_approval: Annotated[bool, Query(description="only runs with an approval waiting for a decision")] = False,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Limit = None,
) -> schemas.RunPage:
    """The tenant's runs, newest first, each with its usage against its limits and its pending approvals."""
    return await runs_service.list_runs(
        db,
        ctx,
        status=status.value if status else None,
        workflow=workflow,
        created_after=created_after,
        created_before=created_before,
        reason=reason,
        awaiting_approval=awaiting_approval,
        cursor=cursor,
        limit=page_size(limit, settings),
    )


@router.get("/{run_id}", response_model=schemas.RunRead)
async def get_run(
    run_id: uuid.UUID,
    db: Db,
    ctx: Viewer,
    settings: AppSettings,
    runtime: AppRuntime,
    wait: Annotated[
        float | None,
        Query(ge=0, le=86_400, allow_inf_nan=False, description="hold up to this many seconds until the run ends"),
    ] = None,
) -> Response:
    """The run with its steps, attempts and events; `?wait=S` long-polls until it is terminal."""
    if wait:
        wait_s = min(wait, settings.max_long_poll_s)
        return _run_response(await runs_service.wait_for_run(db, ctx, run_id, wait_s=wait_s, notifier=runtime.notifier))
    return _run_response(await runs_service.get_run(db, ctx, run_id))


@router.get("/{run_id}/events", response_model=schemas.EventPage)
async def list_events(
    run_id: uuid.UUID,
    db: Db,
    ctx: Viewer,
    settings: AppSettings,
    cursor: Annotated[int | None, Query(ge=0, le=INT64_MAX, description="events after this id")] = None,
    limit: Limit = None,
    type: Annotated[str | None, Query(max_length=128, description="only events of this type")] = None,
    step: Annotated[str | None, Query(max_length=128, description="only events of this step")] = None,
) -> schemas.EventPage:
    return await runs_service.list_events(
        db, ctx, run_id, after=cursor, limit=page_size(limit, settings), type=type or None, step_id=step or None
    )


@router.get("/{run_id}/steps/{step_id}/conversation", response_model=schemas.ConversationPage)
async def step_conversation(
    run_id: uuid.UUID,
    step_id: str,
    db: Db,
    ctx: Viewer,
    settings: AppSettings,
    cursor: Annotated[int | None, Query(ge=0, le=INT32_MAX, description="entries after this seq")] = None,
    limit: Limit = None,
) -> schemas.ConversationPage:
    """The full conversation of an ``llm`` or ``agent`` step: model turns and tool results, as checkpointed."""
    return await runs_service.list_conversation(
        db, ctx, run_id, step_id, after=cursor, limit=page_size(limit, settings)
    )


@router.post("/{run_id}/pause", response_model=schemas.RunRead, responses=problem_responses(409))
async def pause_run(run_id: uuid.UUID, db: Db, ctx: Operator, work: Work, settings: AppSettings) -> Response:
    """Stop dispatching new steps; steps already running finish and are recorded."""
    return _run_response(await runs_service.pause_run(db, work, ctx, settings, run_id))


@router.post("/{run_id}/resume", response_model=schemas.RunRead, responses=problem_responses(409))
async def resume_run(run_id: uuid.UUID, db: Db, ctx: Operator, work: Work, settings: AppSettings) -> Response:
    return _run_response(await runs_service.resume_run(db, work, ctx, settings, run_id))


@router.post("/{run_id}/cancel", response_model=schemas.RunRead, responses=problem_responses(409))
async def cancel_run(run_id: uuid.UUID, db: Db, ctx: Operator, work: Work, settings: AppSettings) -> Response:
    """Cancel queued steps and abort running ones."""
    return _run_response(await runs_service.cancel_run(db, work, ctx, settings, run_id))


@router.post("/{run_id}/retry", response_model=schemas.RunRead, responses=problem_responses(409))
async def retry_run(run_id: uuid.UUID, db: Db, ctx: Operator, work: Work, settings: AppSettings) -> Response:
    """Run a failed run again from its failed steps; completed steps are not re-run."""
    return _run_response(await runs_service.retry_run(db, work, ctx, settings, run_id))


@router.post("/{run_id}/signals/{name}", response_model=schemas.RunRead, responses=problem_responses(409))
async def signal_run(
    run_id: uuid.UUID,
    name: str,
    db: Db,
    ctx: Starter,
    work: Work,
    settings: AppSettings,
    body: schemas.SignalBody | None = None,
) -> Response:
    """Deliver a signal: the steps waiting for `name` succeed with `payload` as their output."""
    if len(name) > 128:
        raise Invalid(
            "signal name too long", errors=[{"pointer": "/path/name", "message": "at most 128 characters"}]
        )
    payload: Any = body.payload if body is not None else None
    return _run_response(await runs_service.signal_run(db, work, ctx, settings, run_id, name, payload))
