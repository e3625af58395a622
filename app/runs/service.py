"""Runs: start, read (and wait for the end), list; operator actions and signals delegate to the engine.

Functions that move a run take the request's :class:`UnitOfWork` (see :mod:`app.request_work`), which
the caller commits and relays; they return the run as read in that transaction, with its new events.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import insert, select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app import pagination
from app.audit.service import entry as audit_entry
from app.budgets.service import create_usage, effective_limits, tenant_budget
from app.canonical import digest
from app.config import Settings
from app.context import Ctx
from app.engine import actions
from app.engine.actions import RunNotFound
from app.engine.advance import Advance, RunRow, load_definition, lock_run
from app.engine.notify import RunNotifier
from app.engine.state_machine import RUN_TERMINAL, RunStatus
from app.engine.unit_of_work import UnitOfWork
from app.errors import Invalid, NotFound
from app.pg import driver
from app.runs import schemas
from app.runs.models import Run, RunEvent, StepRun
from app.workflows import service as workflows_service
from app.workflows.definition import validate_input
from app.workflows.form import RunForm, place_errors, read_form

RUN_EVENTS_INLINE = 200

# The run statuses each operator action applies to (the engine's own table): what the dashboard offers.
ACTION_FROM = actions.ACTION_FROM


def request_hash(payload: Any) -> str:
    """Digest of a run request, to tell an Idempotency-Key replay from a reuse with another body."""
    return digest(payload)


class IdempotencyKeyReused(Invalid):
    type = "idempotency-key-reused"
    title = "Idempotency-Key reused with a different request"


async def create_run(
    db: AsyncSession, tx: UnitOfWork, ctx: Ctx, settings: Settings, body: schemas.RunCreate, idempotency_key: str | None
) -> tuple[uuid.UUID, bool]:
    """Start a run (or return the one this Idempotency-Key already started); returns (id, created).

    ``tx`` works on ``db``'s connection: the run, its steps and its first dispatch commit together.
    """
    digest = request_hash(body.model_dump(mode="json"))
    if idempotency_key is not None:
        existing = await _by_idempotency_key(db, ctx, idempotency_key, digest)
        if existing is not None:
            return existing, False
    wv = await workflows_service.get_workflow_version(db, ctx, body.workflow, body.version)
    definition = await load_definition(tx.conn, wv.id)
    errors = validate_input(definition, body.input)
    if errors:
        raise Invalid(
            "the input does not match the workflow's input_schema",
            errors=[{**error, "pointer": "/input" + error["pointer"]} for error in errors],
        )
    run_id = uuid.uuid4()
    values = {
        "id": run_id,
        "tenant_id": ctx.tenant_id,
        "workflow_id": wv.workflow_id,
        "workflow_version_id": wv.id,
        "workflow_name": body.workflow,
        "workflow_version": wv.version,
        "status": RunStatus.QUEUED.value,
        "priority": body.priority,
        "input": body.input,
        "idempotency_key": idempotency_key,
        "request_hash": digest if idempotency_key else None,
        "created_by": ctx.principal,
        "principal_roles": sorted(ctx.roles),
        "version": 1,
    }
    try:
        async with db.begin_nested():
            await db.execute(insert(Run).values(**values))
    except IntegrityError:
        # Another request with the same key won the race; answer as it did.
        if idempotency_key is None:
            raise
        existing = await _by_idempotency_key(db, ctx, idempotency_key, digest)
        assert existing is not None
        return existing, False
    conn = await driver(db)
    limits = effective_limits(await tenant_budget(conn, ctx.tenant_id), definition.limits,
                              body.limits.given() if body.limits else None)
    await create_usage(conn, ctx.tenant_id, run_id, body.workflow, limits)
    await db.execute(
        insert(StepRun),
        [
            {
                "tenant_id": ctx.tenant_id,
                "run_id": run_id,
                "step_id": step.id,
                "map_index": None,
                "kind": step.kind,
                "status": "pending",
                "version": 1,
                "attempts": 0,
            }
            for step in definition.steps
        ],
    )
    run = await lock_run(tx, run_id)
    assert run is not None
    tx.event(
        run_id,
        "run_created",
        actor=ctx.principal,
        workflow=body.workflow,
        version=wv.version,
        priority=body.priority,
    )
    await Advance(tx=tx, run=run, definition=definition, settings=settings).plan_and_apply()
    return run_id, True


async def start_run(
    db: AsyncSession, work: UnitOfWork, ctx: Ctx, settings: Settings, body: schemas.RunCreate,
    idempotency_key: str | None,
) -> tuple[dict[str, Any], bool]:
    """:func:`create_run`, audited; returns the run (as :func:`get_run` reads it) and whether it is new."""
    run_id, created = await create_run(db, work, ctx, settings, body, idempotency_key)
    if created:
        work.audit(ctx.tenant_id, audit_entry(ctx, "run.start", f"run:{run_id}", data={
            "workflow": body.workflow, "version": body.version, "idempotency_key": idempotency_key}))
    return await _read_back(db, work, ctx, run_id), created


async def _read_back(db: AsyncSession, work: UnitOfWork, ctx: Ctx, run_id: uuid.UUID) -> dict[str, Any]:
    # The events ``work`` collected go in first, so the run read back shows them.
    await work.flush(audit=False)
    return await get_run(db, ctx, run_id)


Action = Callable[[UnitOfWork, Settings, uuid.UUID, uuid.UUID, str], Awaitable[RunRow]]


async def _operate(
    db: AsyncSession, work: UnitOfWork, ctx: Ctx, settings: Settings, run_id: uuid.UUID, action: Action, verb: str
) -> dict[str, Any]:
    await action(work, settings, run_id, ctx.tenant_id, ctx.principal)
    work.audit(ctx.tenant_id, audit_entry(ctx, f"run.{verb}", f"run:{run_id}"))
    return await _read_back(db, work, ctx, run_id)


async def pause_run(
    db: AsyncSession, work: UnitOfWork, ctx: Ctx, settings: Settings, run_id: uuid.UUID
) -> dict[str, Any]:
    """Stop dispatching the run's steps (an operator action, audited); returns the run."""
    return await _operate(db, work, ctx, settings, run_id, actions.pause_run, "pause")


async def resume_run(
    db: AsyncSession, work: UnitOfWork, ctx: Ctx, settings: Settings, run_id: uuid.UUID
) -> dict[str, Any]:
    """Continue a paused run (audited); returns the run."""
    return await _operate(db, work, ctx, settings, run_id, actions.resume_run, "resume")


async def cancel_run(
    db: AsyncSession, work: UnitOfWork, ctx: Ctx, settings: Settings, run_id: uuid.UUID
) -> dict[str, Any]:
    """Cancel the run's unfinished steps and the run (audited); returns the run."""
    return await _operate(db, work, ctx, settings, run_id, actions.cancel_run, "cancel")


async def retry_run(
    db: AsyncSession, work: UnitOfWork, ctx: Ctx, settings: Settings, run_id: uuid.UUID
) -> dict[str, Any]:
    """Run a failed run again from its failed steps (audited); returns the run."""
    return await _operate(db, work, ctx, settings, run_id, actions.retry_run, "retry")


async def signal_run(
    db: AsyncSession, work: UnitOfWork, ctx: Ctx, settings: Settings, run_id: uuid.UUID, name: str, payload: Any
) -> dict[str, Any]:
    """Deliver signal ``name`` to the steps waiting for it (audited); returns the run."""
    await actions.signal_run(work, settings, run_id, ctx.tenant_id, ctx.principal, name=name, payload=payload)
    work.audit(ctx.tenant_id, audit_entry(ctx, "run.signal", f"run:{run_id}", data={"signal": name}))
    return await _read_back(db, work, ctx, run_id)


async def wait_for_run(
    db: AsyncSession, ctx: Ctx, run_id: uuid.UUID, *, wait_s: float, notifier: RunNotifier | None
) -> dict[str, Any]:
    """:func:`get_run` once the run is terminal, or after ``wait_s`` seconds, whichever comes first.

    ``notifier``: the API process's (only a runtime started for the API listens)."""
    assert notifier is not None
    deadline = time.monotonic() + wait_s
    with notifier.subscribe(run_id) as woken:
        while True:
            # Read in a transaction of its own so each check sees the latest commit.
            status = await run_status(db, ctx, run_id)
            await db.rollback()
            left = deadline - time.monotonic()
            if RunStatus(status) in RUN_TERMINAL or left <= 0:
                break
            try:
                # The timer is a backstop for a notification lost while the listener reconnects.
                await asyncio.wait_for(woken.wait(), timeout=min(left, 1.0))
            except TimeoutError:
                pass
            woken.clear()
    return await get_run(db, ctx, run_id)


async def _by_idempotency_key(db: AsyncSession, ctx: Ctx, key: str, digest: str) -> uuid.UUID | None:
    row = (
        await db.execute(
            select(Run.id, Run.request_hash).where(Run.tenant_id == ctx.tenant_id, Run.idempotency_key == key)
        )
    ).one_or_none()
    if row is None:
        return None
    if row.request_hash != digest:
        raise IdempotencyKeyReused(
            f"Idempotency-Key {key!r} was used for a different request (run {row.id})", run_id=str(row.id)
        )
    return uuid.UUID(str(row.id))


def _ts(value: datetime | None) -> str | None:
    # The same form pydantic gives the other endpoints' timestamps.
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


_RUN = (
    "SELECT id, workflow_name, workflow_version, status, status_reason, priority, created_at, started_at, "
    "finished_at, input, output, error, workflow_version_id FROM run WHERE id = $1 AND tenant_id = $2"
)
_STEPS = (
    "SELECT id, step_id, map_index, kind, status, input, output, error, started_at, finished_at FROM step_run "
    "WHERE run_id = $1 ORDER BY map_index NULLS FIRST"
)
_ATTEMPTS = (
    "SELECT step_run_id, n, status, queued_at, not_before, started_at, finished_at, error_class, error_message, "
    "worker FROM step_attempt WHERE run_id = $1 ORDER BY n"
)
_EVENTS = (
    "SELECT id, type, step_id, map_index, data, created_at FROM run_event WHERE run_id = $1 ORDER BY id LIMIT $2"
)


async def get_run(db: AsyncSession, ctx: Ctx, run_id: uuid.UUID) -> dict[str, Any]:
    """The run with its steps, map items, attempts and first events, in the shape of ``schemas.RunRead``.

    Built as plain JSON-ready data straight from four queries: this is what every long poll returns,
    so it skips the ORM and model validation. Another tenant's run is 404.
    """
    conn = await driver(db)
    run = await conn.fetchrow(_RUN, run_id, ctx.tenant_id)
    if run is None:
        raise RunNotFound(f"run {run_id} not found")
    steps = await conn.fetch(_STEPS, run_id)
    attempts = await conn.fetch(_ATTEMPTS, run_id)
    events = await conn.fetch(_EVENTS, run_id, RUN_EVENTS_INLINE + 1)
    by_step: dict[uuid.UUID, list[dict[str, Any]]] = defaultdict(list)
    for attempt in attempts:
        by_step[attempt["step_run_id"]].append({
            "n": attempt["n"], "status": attempt["status"], "queued_at": _ts(attempt["queued_at"]),
            "not_before": _ts(attempt["not_before"]), "started_at": _ts(attempt["started_at"]),
            "finished_at": _ts(attempt["finished_at"]),
            "error": ({"class": attempt["error_class"], "message": attempt["error_message"]}
                      if attempt["error_class"] else None),
            "worker": attempt["worker"],
        })
    top: dict[str, dict[str, Any]] = {}
    for row in steps:
        common = {"status": row["status"], "output": row["output"], "error": row["error"],
                  "started_at": _ts(row["started_at"]), "finished_at": _ts(row["finished_at"]),
                  "attempts": by_step.get(row["id"], [])}
        if row["map_index"] is None:
            top[row["step_id"]] = {"id": row["step_id"], "kind": row["kind"], "input": row["input"], **common,
                                   "items": [] if row["kind"] == "map" else None}
        else:
            top[row["step_id"]]["items"].append({"index": row["map_index"], **common})
    for step in top.values():
        if step["kind"] == "map" and not step["items"]:
            step["items"] = None  # not expanded yet
    definition = await load_definition(conn, run["workflow_version_id"])
    return {
        "id": str(run["id"]), "workflow": run["workflow_name"], "workflow_version": run["workflow_version"],
        "status": run["status"], "status_reason": run["status_reason"], "priority": run["priority"],
        "created_at": _ts(run["created_at"]),
        "started_at": _ts(run["started_at"]), "finished_at": _ts(run["finished_at"]), "input": run["input"],
        "output": run["output"], "error": run["error"],
        "steps": [top[sid] for sid in definition.order if sid in top],
        "events": [
            {"id": event["id"], "type": event["type"], "step_id": event["step_id"], "map_index": event["map_index"],
             "data": event["data"], "created_at": _ts(event["created_at"])}
            for event in events[:RUN_EVENTS_INLINE]
        ],
        "events_truncated": len(events) > RUN_EVENTS_INLINE,
    }


def _summary(run: Run) -> schemas.RunSummary:
    return schemas.RunSummary(
        id=run.id,
        workflow=run.workflow_name,
        workflow_version=run.workflow_version,
        status=run.status,
        status_reason=run.status_reason,
        priority=run.priority,
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
    )


def _event(e: RunEvent) -> schemas.EventRead:
    return schemas.EventRead(
        id=e.id, type=e.type, step_id=e.step_id, map_index=e.map_index, data=e.data, created_at=e.created_at
    )


async def run_status(db: AsyncSession, ctx: Ctx, run_id: uuid.UUID) -> str:
    status = (
        await db.execute(select(Run.status).where(Run.id == run_id, Run.tenant_id == ctx.tenant_id))
    ).scalar_one_or_none()
    if status is None:
        raise RunNotFound(f"run {run_id} not found")
    return str(status)


PAGES = pagination.keyset("runs", datetime, uuid.UUID)


async def list_runs(
    db: AsyncSession,
    ctx: Ctx,
    *,
    status: str | None,
    workflow: str | None,
    created_after: datetime | None,
    created_before: datetime | None,
    cursor: str | None,
    limit: int,
) -> schemas.RunPage:
    """Newest first, keyset-paginated on (created_at, id)."""
    stmt = select(Run).where(Run.tenant_id == ctx.tenant_id)
    if status:
        stmt = stmt.where(Run.status == status)
    if workflow:
        stmt = stmt.where(Run.workflow_name == workflow)
    if created_after:
        stmt = stmt.where(Run.created_at >= created_after)
    if created_before:
        stmt = stmt.where(Run.created_at < created_before)
    if key := PAGES.decode(cursor):
        ts, rid = key
        # A row comparison, not created_at < ts OR (...): Postgres turns it into an index bound, so a
        # page deep in a million runs costs what the first page costs.
        stmt = stmt.where(tuple_(Run.created_at, Run.id) < tuple_(ts, rid))
    rows = (
        (await db.execute(stmt.order_by(Run.created_at.desc(), Run.id.desc()).limit(limit + 1)))
        .scalars()
        .all()
    )
    next_cursor = PAGES.encode(rows[limit - 1].created_at, rows[limit - 1].id) if len(rows) > limit else None
    return schemas.RunPage(items=[_summary(run) for run in rows[:limit]], next_cursor=next_cursor)


async def list_events(
    db: AsyncSession, ctx: Ctx, run_id: uuid.UUID, *, after: int | None, limit: int
) -> schemas.EventPage:
    await run_status(db, ctx, run_id)
    stmt = select(RunEvent).where(RunEvent.run_id == run_id, RunEvent.tenant_id == ctx.tenant_id)
    if after is not None:
        stmt = stmt.where(RunEvent.id > after)
    rows = (await db.execute(stmt.order_by(RunEvent.id).limit(limit + 1))).scalars().all()
    return schemas.EventPage(
        items=[_event(event) for event in rows[:limit]], next_cursor=rows[limit - 1].id if len(rows) > limit else None
    )


class StepNotFound(NotFound):
    type = "step-not-found"


async def list_conversation(
    db: AsyncSession, ctx: Ctx, run_id: uuid.UUID, step_id: str, *, after: int | None, limit: int
) -> schemas.ConversationPage:
    """An ``llm``/``agent`` step's checkpoints: every model turn and tool result, in order."""
    await run_status(db, ctx, run_id)
    conn = await driver(db)
    step_run_id = await conn.fetchval(
        "SELECT id FROM step_run WHERE run_id = $1 AND tenant_id = $2 AND step_id = $3 AND map_index IS NULL",
        run_id, ctx.tenant_id, step_id,
    )
    if step_run_id is None:
        raise StepNotFound(f"run {run_id} has no step {step_id!r}")
    rows = await conn.fetch(
        "SELECT seq, kind, call_id, data, created_at FROM agent_checkpoint WHERE step_run_id = $1 AND seq > $2 "
        "ORDER BY seq LIMIT $3",
        step_run_id, -1 if after is None else after, limit + 1,
    )
    items = [schemas.ConversationEntry(**dict(row)) for row in rows[:limit]]
    return schemas.ConversationPage(items=items, next_cursor=rows[limit - 1]["seq"] if len(rows) > limit else None)


# --- the dashboard's "start a run" form -------------------------------------------------------------------


@dataclass(frozen=True)
class FormStart:
    form: RunForm  # with the values sent, and every problem on the field it belongs to
    run_id: uuid.UUID | None  # None: not started (the form has errors)


async def start_run_from_form(
    db: AsyncSession, work: UnitOfWork, ctx: Ctx, settings: Settings, workflow: str, version: int | None,
    sent: dict[str, str],
) -> FormStart:
    """Start a run from the fields of a version's generated form (or its JSON editor), as :func:`start_run`
    does (audited, checked against the input_schema); or return the form with its errors in place. The
    form's hidden request key is the run's Idempotency-Key: the same form sent twice starts one run."""
    form = await workflows_service.run_form(db, ctx, workflow, version)
    try:
        form.request_key = str(uuid.UUID(sent.get("request", "")))
    except ValueError:
        form.request_key = str(uuid.uuid4())
    value = read_form(form, sent)
    if form.has_errors:
        return FormStart(form, None)
    try:
        body = schemas.RunCreate(workflow=workflow, version=form.version, input=value)
    except ValidationError as exc:
        form.errors += [str(error["msg"]) for error in exc.errors()]
        return FormStart(form, None)
    try:
        run, _ = await start_run(db, work, ctx, settings, body, f"dashboard:{form.request_key}")
    except Invalid as exc:
        if not exc.errors:
            form.errors.append(exc.detail)
        place_errors(form, [{**e, "pointer": e["pointer"].removeprefix("/input")} for e in exc.errors or []])
        return FormStart(form, None)
    return FormStart(form, uuid.UUID(run["id"]))
