"""Runs: start, read (and wait for the end), list; operator actions and signals delegate to the engine.

Functions that move a run take the request's :class:`UnitOfWork` (see :mod:`app.request_work`), which
the caller commits and relays; they return the run as read in that transaction, with its new events.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Select, func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from app import pagination, tracing
from app.approvals.models import Approval
from app.audit.service import entry as audit_entry
from app.auth.permissions import allowed
from app.budgets.models import RunUsage
from app.budgets.service import (
    BUDGET_EXHAUSTED,
    create_usage,
    effective_limits,
    set_run_limits,
    usd_text,
)
from app.canonical import digest
from app.config import Settings
from app.context import Ctx
from app.engine import actions
from app.engine.actions import RunNotFound
from app.engine.advance import Advance, RunRow, StepRow, load_definition
from app.engine.notify import RunNotifier
from app.engine.state_machine import RUN_TERMINAL, IllegalTransition, RunStatus, StepStatus
from app.engine.unit_of_work import UnitOfWork
from app.errors import Conflict, Invalid, NotFound
from app.pg import driver, dumps
from app.runs import schemas
from app.runs.models import Run, RunEvent
from app.workflows import service as workflows_service
from app.workflows.definition import validate_input
from app.workflows.form import RunForm, place_errors, read_form
from app.workflows.steps import Definition, WaitStep

RUN_EVENTS_INLINE = 200

# The run statuses each operator action applies to (the engine's own table): what the dashboard offers.
ACTION_FROM = actions.ACTION_FROM


def request_hash(payload: Any) -> str:
    """Digest of a run request, to tell an Idempotency-Key replay from a reuse with another body."""
    return digest(payload)


class IdempotencyKeyReused(Invalid):
    type = "idempotency-key-reused"
    title = "Idempotency-Key reused with a different request"


# Raw statements of the start path: one round trip each (the ORM took eight for the same rows).
# The version and the tenant's run limits together; RLS scopes both to the transaction's tenant too.
_VERSION = (
    "SELECT v.id, v.workflow_id, v.version, b.run_defaults, b.run_maximums FROM workflow w "
    "JOIN workflow_version v ON v.workflow_id = w.id AND v.tenant_id = w.tenant_id "
    "AND v.version = coalesce($3::int, w.latest_version) "
    "LEFT JOIN budget b ON b.tenant_id = w.tenant_id WHERE w.tenant_id = $1 AND w.name = $2"
)
# The run and its steps in one statement; a taken Idempotency-Key inserts neither (no savepoint needed:
# ON CONFLICT waits for a concurrent insert of the same key, then reports no row).
_INSERT_RUN = """
WITH new_run AS (
    INSERT INTO run (id, tenant_id, workflow_id, workflow_version_id, workflow_name, workflow_version, status,
                     priority, input, idempotency_key, request_hash, created_by, principal_roles, version,
                     trace_context)
    VALUES ($1, $2, $3, $4, $5, $6, 'queued', $7, $8::jsonb, $9, $10, $11, $12, 1, $13)
    ON CONFLICT (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id
), steps AS (
    INSERT INTO step_run (id, tenant_id, run_id, step_id, kind, status, version, attempts)
    SELECT x.id, $2, new_run.id, x.step_id, x.kind, 'pending', 1, 0
    FROM new_run, unnest($14::uuid[], $15::text[], $16::text[]) AS x(id, step_id, kind)
)
SELECT count(*) FROM new_run
"""


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
    conn = tx.conn
    version = await conn.fetchrow(_VERSION, ctx.tenant_id, body.workflow, body.version)
    if version is None:
        what = f"workflow {body.workflow!r}"
        raise workflows_service.WorkflowNotFound(
            f"{what if body.version is None else f'version {body.version} of {what}'} not found")
    definition = await load_definition(conn, version["id"])
    errors = validate_input(definition, body.input)
    if errors:
        raise Invalid(
            "the input does not match the workflow's input_schema",
            errors=[{**error, "pointer": "/input" + error["pointer"]} for error in errors],
        )
    budget = {"run_defaults": version["run_defaults"], "run_maximums": version["run_maximums"]}
    limits = effective_limits(budget, definition.limits, body.limits.given() if body.limits else None)
    run_id, trace_context = uuid.uuid4(), tracing.current_traceparent()
    step_ids = [uuid.uuid4() for _ in definition.steps]
    inserted = await conn.fetchval(
        _INSERT_RUN, run_id, ctx.tenant_id, version["workflow_id"], version["id"], body.workflow, version["version"],
        body.priority, dumps(body.input), idempotency_key, digest if idempotency_key else None, ctx.principal,
        sorted(ctx.roles), trace_context, step_ids, [step.id for step in definition.steps],
        [step.kind for step in definition.steps],
    )
    if not inserted:
        # Another request with the same key won the race; answer as it did.
        assert idempotency_key is not None
        existing = await _by_idempotency_key(db, ctx, idempotency_key, digest)
        assert existing is not None
        return existing, False
    await create_usage(conn, ctx.tenant_id, run_id, body.workflow, limits)
    # The run was inserted by this transaction, so no other can see, let alone lock, it: what lock_run
    # would read back is what was just written.
    tx.tenant_id = ctx.tenant_id
    run = RunRow(id=run_id, tenant_id=ctx.tenant_id, status=RunStatus.QUEUED.value, version=1, priority=body.priority,
                 input=body.input, workflow_version_id=version["id"], started_at=None, trace_context=trace_context)
    rows: dict[tuple[str, int | None], StepRow] = {
        (step.id, None): StepRow(id=step_run_id, step_id=step.id, map_index=None, kind=step.kind,
                                 status=StepStatus.PENDING, version=1, attempts=0, current_attempt_id=None)
        for step, step_run_id in zip(definition.steps, step_ids, strict=True)
    }
    tx.event(
        run_id,
        "run_created",
        actor=ctx.principal,
        workflow=body.workflow,
        version=version["version"],
        priority=body.priority,
    )
    await Advance(tx=tx, run=run, definition=definition, settings=settings, rows=rows).plan_and_apply()
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
        status = await run_status(db, ctx, run_id)
        while RunStatus(status) not in RUN_TERMINAL:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # No transaction (nor connection) held while waiting; each check reads the latest commit.
            await db.rollback()
            try:
                # The timer is a backstop for a notification lost while the listener reconnects.
                await asyncio.wait_for(woken.wait(), timeout=min(left, 1.0))
            except TimeoutError:
                status = await run_status(db, ctx, run_id)
                continue
            woken.clear()
            # Woken: the run ended (or the listener reconnected). Read it all at once, and answer with
            # that read when it shows the end, as it nearly always does.
            run = await get_run(db, ctx, run_id)
            if RunStatus(run["status"]) in RUN_TERMINAL or deadline - time.monotonic() <= 0:
                return run
            status = run["status"]
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


def _iso(column: str) -> str:
    """SQL formatting a timestamptz as :func:`_ts` does in Python (no fraction when it is zero)."""
    return (
        f"to_char({column} AT TIME ZONE 'UTC', CASE WHEN extract(microseconds FROM {column}) % 1000000 = 0 "
        "THEN 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"' ELSE 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"' END)"
    )


_STATUS = "SELECT status FROM run WHERE id = $1 AND tenant_id = $2"
# The whole run document in one round trip: steps (with their attempts) and events come as JSON built by
# Postgres in the shape of ``schemas.RunRead``; only the nesting of map items and the steps' order (the
# definition's) are left to Python. Each step comes as [step_id, step]: an item's object has no id.
_READ_RUN = f"""
SELECT r.id, r.workflow_name, r.workflow_version, r.status, r.status_reason, r.priority, r.created_at,
       r.started_at, r.finished_at, r.input, r.output, r.error, r.workflow_version_id, r.trace_context,
       (SELECT coalesce(json_agg(json_build_array(s.step_id, CASE WHEN s.map_index IS NULL THEN
                   json_build_object('id', s.step_id, 'kind', s.kind, 'input', s.input, 'status', s.status,
                                     'output', s.output, 'error', s.error,
                                     'started_at', {_iso('s.started_at')}, 'finished_at', {_iso('s.finished_at')},
                                     'attempts', coalesce(a.attempts, '[]'), 'items', NULL)
                 ELSE
                   json_build_object('index', s.map_index, 'status', s.status, 'output', s.output, 'error', s.error,
                                     'started_at', {_iso('s.started_at')}, 'finished_at', {_iso('s.finished_at')},
                                     'attempts', coalesce(a.attempts, '[]'))
                 END) ORDER BY s.map_index NULLS FIRST), '[]')::text
          FROM step_run s LEFT JOIN (
              SELECT step_run_id, json_agg(json_build_object(
                  'n', n, 'status', status, 'queued_at', {_iso('queued_at')}, 'not_before', {_iso('not_before')},
                  'started_at', {_iso('started_at')}, 'finished_at', {_iso('finished_at')},
                  'error', CASE WHEN error_class IS NOT NULL
                                THEN json_build_object('class', error_class, 'message', error_message) END,
                  'worker', worker) ORDER BY n) AS attempts
              FROM step_attempt WHERE run_id = $1 GROUP BY step_run_id
          ) a ON a.step_run_id = s.id
         WHERE s.run_id = $1) AS steps,
       (SELECT coalesce(json_agg(json_build_object(
                   'id', e.id, 'type', e.type, 'step_id', e.step_id, 'map_index', e.map_index, 'data', e.data,
                   'created_at', {_iso('e.created_at')}, 'trace_id', e.trace_id) ORDER BY e.id), '[]')::text
          FROM (SELECT * FROM run_event WHERE run_id = $1 ORDER BY id LIMIT $3) e) AS events
FROM run r WHERE r.id = $1 AND r.tenant_id = $2
"""


async def get_run(db: AsyncSession, ctx: Ctx, run_id: uuid.UUID) -> dict[str, Any]:
    """The run with its steps, map items, attempts and first events, in the shape of ``schemas.RunRead``.

    Built as plain JSON-ready data by one query: this is what every long poll returns, so it skips the
    ORM and model validation. Another tenant's run is 404.
    """
    return (await _read_run(db, ctx, run_id))[0]


async def _read_run(db: AsyncSession, ctx: Ctx, run_id: uuid.UUID) -> tuple[dict[str, Any], Definition]:
    conn = await driver(db)
    run = await conn.fetchrow(_READ_RUN, run_id, ctx.tenant_id, RUN_EVENTS_INLINE + 1)
    if run is None:
        raise RunNotFound(f"run {run_id} not found")
    top: dict[str, dict[str, Any]] = {}
    for step_id, step in json.loads(run["steps"]):
        if "index" in step:
            top[step_id]["items"].append(step)
        else:
            if step["kind"] == "map":
                step["items"] = []
            top[step_id] = step
    for step in top.values():
        if step["kind"] == "map" and not step["items"]:
            step["items"] = None  # not expanded yet
    events = json.loads(run["events"])
    definition = await load_definition(conn, run["workflow_version_id"])
    return {
        "id": str(run["id"]), "workflow": run["workflow_name"], "workflow_version": run["workflow_version"],
        "status": run["status"], "status_reason": run["status_reason"], "priority": run["priority"],
        "created_at": _ts(run["created_at"]),
        "started_at": _ts(run["started_at"]), "finished_at": _ts(run["finished_at"]), "input": run["input"],
        "output": run["output"], "error": run["error"], "trace_id": tracing.trace_id_of(run["trace_context"]),
        "steps": [top[sid] for sid in definition.order if sid in top],
        "events": events[:RUN_EVENTS_INLINE],
        "events_truncated": len(events) > RUN_EVENTS_INLINE,
    }, definition


def _event(e: RunEvent) -> schemas.EventRead:
    return schemas.EventRead(
        id=e.id, type=e.type, step_id=e.step_id, map_index=e.map_index, data=e.data, created_at=e.created_at,
        trace_id=e.trace_id,
    )


async def run_status(db: AsyncSession, ctx: Ctx, run_id: uuid.UUID) -> str:
    status = await (await driver(db)).fetchval(_STATUS, run_id, ctx.tenant_id)
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
    reason: str | None = None,
    awaiting_approval: bool = False,
) -> schemas.RunPage:
    """Newest first, keyset-paginated on (created_at, id), each run with its usage against its limits and
    its count of pending approvals: one query per page, whatever the page size."""
    stmt = _run_list(ctx, RunFilters(status, workflow, reason, awaiting_approval, created_after, created_before))
    if key := PAGES.decode(cursor):
        ts, rid = key
        # A row comparison, not created_at < ts OR (...): Postgres turns it into an index bound, so a
        # page deep in a million runs costs what the first page costs.
        stmt = stmt.where(tuple_(Run.created_at, Run.id) < tuple_(ts, rid))
    rows = (await db.execute(stmt.limit(limit + 1))).all()
    next_cursor = PAGES.encode(rows[limit - 1].created_at, rows[limit - 1].id) if len(rows) > limit else None
    with_usage = allowed(ctx.roles, "budgets:read")  # as GET /budgets/usage would answer
    return schemas.RunPage(items=[_list_item(row, with_usage) for row in rows[:limit]], next_cursor=next_cursor)


async def list_events(
    db: AsyncSession, ctx: Ctx, run_id: uuid.UUID, *, after: int | None, limit: int, type: str | None = None,
    step_id: str | None = None,
) -> schemas.EventPage:
    """The run's events in order, keyset-paginated on id; only those of ``type`` and ``step_id`` when given."""
    await run_status(db, ctx, run_id)
    stmt = select(RunEvent).where(RunEvent.run_id == run_id, RunEvent.tenant_id == ctx.tenant_id)
    if after is not None:
        stmt = stmt.where(RunEvent.id > after)
    if type is not None:
        stmt = stmt.where(RunEvent.type == type)
    if step_id is not None:
        stmt = stmt.where(RunEvent.step_id == step_id)
    rows = (await db.execute(stmt.order_by(RunEvent.id).limit(limit + 1))).scalars().all()
    return schemas.EventPage(
        items=[_event(event) for event in rows[:limit]], next_cursor=rows[limit - 1].id if len(rows) > limit else None
    )


@dataclass(frozen=True)
class EventQuery:
    """Which of a run's events a page shows: ``after`` an id, of one ``type`` and one ``step_id`` if given."""

    after: int | None = None
    type: str | None = None
    step_id: str | None = None


@dataclass(frozen=True)
class ItemPage:
    items: list[dict[str, Any]]
    next_cursor: int | None  # the last index shown, when more follow


@dataclass(frozen=True)
class RunDetail:
    """A run as its page shows it: :func:`get_run`'s data, its definition (for the graph), the signals its
    waiting steps wait for, a page of each map step's items, and (when asked) a page of its events."""

    run: dict[str, Any]
    definition: Definition
    signals: tuple[str, ...]
    items: dict[str, ItemPage]
    events: schemas.EventPage | None
    event_types: tuple[str, ...]


async def get_run_detail(
    db: AsyncSession, ctx: Ctx, run_id: uuid.UUID, *, limit: int, items_step: str | None = None,
    items_after: int | None = None, events: EventQuery | None = None,
) -> RunDetail:
    """The run's page data; map items and events come ``limit`` at a page (``items_after`` applies to the
    map step ``items_step``, the others show their first page). Another tenant's run is 404."""
    run, definition = await _read_run(db, ctx, run_id)
    pages: dict[str, ItemPage] = {}
    for step in run["steps"]:
        if step["items"] is not None:
            after = items_after if step["id"] == items_step and items_after is not None else -1
            shown = [item for item in step["items"] if item["index"] > after][: limit + 1]
            pages[step["id"]] = ItemPage(shown[:limit], shown[limit - 1]["index"] if len(shown) > limit else None)
    signals = sorted({
        spec.wait.signal for step in run["steps"] if step["status"] == "waiting"
        and isinstance(spec := definition.step(step["id"]), WaitStep)
    })
    page: schemas.EventPage | None = None
    types: tuple[str, ...] = ()
    if events is not None:
        page = await list_events(db, ctx, run_id, after=events.after, limit=limit, type=events.type,
                                 step_id=events.step_id)
        conn = await driver(db)
        types = tuple(row["type"] for row in await conn.fetch(
            "SELECT DISTINCT type FROM run_event WHERE run_id = $1 AND tenant_id = $2 ORDER BY type",
            run_id, ctx.tenant_id))
    return RunDetail(run=run, definition=definition, signals=tuple(signals), items=pages, events=page,
                     event_types=types)


async def start_again(
    db: AsyncSession, work: UnitOfWork, ctx: Ctx, settings: Settings, run_id: uuid.UUID, input: Any
) -> dict[str, Any]:
    """A new run of ``run_id``'s workflow, same version and priority, with ``input`` (audited as a start);
    returns the new run. An input its schema refuses is 422 with pointers under ``/input``."""
    row = (await db.execute(
        select(Run.workflow_name, Run.workflow_version, Run.priority)
        .where(Run.id == run_id, Run.tenant_id == ctx.tenant_id)
    )).one_or_none()
    if row is None:
        raise RunNotFound(f"run {run_id} not found")
    try:
        body = schemas.RunCreate(workflow=row.workflow_name, version=row.workflow_version, input=input,
                                 priority=row.priority)
    except ValidationError as exc:
        raise Invalid("not a run input", errors=[
            {"pointer": "/input", "message": error["msg"]} for error in exc.errors()]) from exc
    run, _ = await start_run(db, work, ctx, settings, body, None)
    return run


async def raise_limits_and_resume(
    db: AsyncSession, work: UnitOfWork, ctx: Ctx, settings: Settings, run_id: uuid.UUID, limits: dict[str, Any]
) -> dict[str, Any]:
    """Set a paused run's limits and resume it, in one transaction, each audited as on its own: a run
    paused because a budget ran out goes on under the new limits, or neither happens (409 unless paused)."""
    await set_run_limits(db, ctx, run_id, limits)
    await actions.resume_run(work, settings, run_id, ctx.tenant_id, ctx.principal)
    work.audit(ctx.tenant_id, audit_entry(ctx, "run.resume", f"run:{run_id}"))
    return await _read_back(db, work, ctx, run_id)


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


# --- the runs list's filters and usage columns, and bulk operator actions ---------------------------------

# What the runs list offers to filter by: every run status, and why the engine paused or failed a run.
RUN_STATUSES = tuple(status.value for status in RunStatus)
STATUS_REASONS = (BUDGET_EXHAUSTED, actions.RUN_TIMEOUT)
# The most runs one bulk action touches, named by id or matched by filters.
BULK_MAX = 500


@dataclass(frozen=True)
class RunFilters:
    """Which runs a list shows (and a bulk action over "all matching" touches); ``None`` matches any."""

    status: str | None = None
    workflow: str | None = None
    reason: str | None = None
    awaiting_approval: bool = False  # only runs with an approval request waiting for a decision
    created_after: datetime | None = None
    created_before: datetime | None = None


def _run_list(ctx: Ctx, f: RunFilters) -> Select[Any]:
    # Each filter has an index that starts (tenant_id, <column>, created_at DESC, id DESC), so a page costs
    # the same at a million runs (status with workflow uses one and reads the other from the rows: at worst
    # one workflow's runs); "awaiting approval" starts from the few pending approvals instead.
    pending = (
        select(func.count()).select_from(Approval)
        .where(Approval.run_id == Run.id, Approval.tenant_id == Run.tenant_id, Approval.status == "pending")
        .scalar_subquery()
    )
    stmt = (
        select(Run.id, Run.workflow_name, Run.workflow_version, Run.status, Run.status_reason, Run.priority,
               Run.created_at, Run.started_at, Run.finished_at, RunUsage.limits, RunUsage.tokens,
               RunUsage.cost_usd, RunUsage.tool_calls, pending.label("pending_approvals"))
        .outerjoin(RunUsage, RunUsage.run_id == Run.id)
        .where(Run.tenant_id == ctx.tenant_id)
    )
    if f.status:
        stmt = stmt.where(Run.status == f.status)
    if f.workflow:
        stmt = stmt.where(Run.workflow_name == f.workflow)
    if f.reason:
        stmt = stmt.where(Run.status_reason == f.reason)
    if f.awaiting_approval:
        stmt = stmt.where(Run.id.in_(
            select(Approval.run_id).where(Approval.tenant_id == ctx.tenant_id, Approval.status == "pending")))
    if f.created_after:
        stmt = stmt.where(Run.created_at >= f.created_after)
    if f.created_before:
        stmt = stmt.where(Run.created_at < f.created_before)
    return stmt.order_by(Run.created_at.desc(), Run.id.desc())


def _list_item(row: Any, with_usage: bool) -> schemas.RunListItem:
    usage = None if row.limits is None or not with_usage else schemas.RunUsageSummary(
        tokens=row.tokens, cost_usd=usd_text(row.cost_usd), agent_steps=row.tool_calls, limits=row.limits)
    return schemas.RunListItem(
        id=row.id, workflow=row.workflow_name, workflow_version=row.workflow_version, status=row.status,
        status_reason=row.status_reason, priority=row.priority, created_at=row.created_at,
        started_at=row.started_at, finished_at=row.finished_at, usage=usage,
        pending_approvals=row.pending_approvals,
    )


OPERATIONS: dict[str, Callable[[AsyncSession, UnitOfWork, Ctx, Settings, uuid.UUID], Awaitable[dict[str, Any]]]] = {
    "pause": pause_run, "resume": resume_run, "cancel": cancel_run, "retry": retry_run,
}


class TooManyRuns(Invalid):
    type = "too-many-runs"
    title = "Too many runs for one bulk action"


async def act_on_runs(
    db: AsyncSession,
    ctx: Ctx,
    settings: Settings,
    action: str,
    targets: Sequence[uuid.UUID] | RunFilters,
    *,
    after_commit: Callable[[UnitOfWork], Awaitable[None]],
) -> list[schemas.BulkOutcome]:
    """Apply an operator action to runs named by id, or to every run matching ``targets`` (at most
    :data:`BULK_MAX`); one outcome per run, in order.

    Each run goes through the single-run service call (same engine move, same audit event) in a
    transaction of its own, committed and then relayed by ``after_commit``: one run refused, missing or
    changed meanwhile leaves the others done. Another tenant's run is ``not_found``, never touched.
    """
    operation = OPERATIONS.get(action)
    if operation is None:
        raise Invalid(f"no action {action!r}", errors=[{"pointer": "/form/action",
                                                        "message": f"one of {', '.join(OPERATIONS)}"}])
    if isinstance(targets, RunFilters):
        matched = (await db.execute(_run_list(ctx, targets).with_only_columns(Run.id).limit(BULK_MAX + 1)))
        run_ids = list(matched.scalars())
        if len(run_ids) > BULK_MAX:
            raise TooManyRuns(f"more than {BULK_MAX} runs match these filters: narrow them (a bulk action takes "
                              f"at most {BULK_MAX} runs)", errors=[{"pointer": "/form/scope",
                                                                   "message": f"over {BULK_MAX} runs match"}])
    else:
        run_ids = list(dict.fromkeys(targets))
        if len(run_ids) > BULK_MAX:
            raise TooManyRuns(f"{len(run_ids)} runs selected: a bulk action takes at most {BULK_MAX}",
                              errors=[{"pointer": "/form/run", "message": f"at most {BULK_MAX} runs"}])
    await db.commit()  # what the request did before (signing in) is its own transaction
    outcomes = []
    for run_id in run_ids:
        outcomes.append(await _act_on_one(db, ctx, settings, operation, run_id, after_commit))
    return outcomes


async def _act_on_one(
    db: AsyncSession, ctx: Ctx, settings: Settings,
    operation: Callable[[AsyncSession, UnitOfWork, Ctx, Settings, uuid.UUID], Awaitable[dict[str, Any]]],
    run_id: uuid.UUID, after_commit: Callable[[UnitOfWork], Awaitable[None]],
) -> schemas.BulkOutcome:
    """One run of a bulk action, in its own transaction: done and committed, or refused and rolled back."""
    work = UnitOfWork(await driver(db))
    try:
        run = await operation(db, work, ctx, settings, run_id)
        await work.flush()
        await db.commit()
    except NotFound:
        await db.rollback()
        return schemas.BulkOutcome(run_id=run_id, outcome="not_found", detail="no such run")
    except IllegalTransition as exc:
        await db.rollback()
        status = exc.extra.get("status_now")
        return schemas.BulkOutcome(run_id=run_id, outcome="not_allowed", status=status,
                                   detail=f"the run is {status}" if status else exc.detail)
    except Conflict as exc:
        await db.rollback()
        return schemas.BulkOutcome(run_id=run_id, outcome="conflict", detail=exc.detail)
    await after_commit(work)
    return schemas.BulkOutcome(run_id=run_id, outcome="done", status=run["status"])
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
