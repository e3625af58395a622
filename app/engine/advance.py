"""``advance()``: load a run's steps, ask the planner what follows, apply it through the state machine.

Callers hold the run row lock (:func:`lock_run`) for the whole transaction, so moves of one run are
serialised; every step write is still versioned, and a lost race reloads and re-plans.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from app import tracing
from app.clock import now
from app.config import Settings
from app.engine.gates import Gate, cancel_approvals, request_approval
from app.engine.planner import Plan, StepView, plan
from app.engine.state_machine import (
    RUN_TERMINAL,
    RunStatus,
    StaleTransition,
    StepStatus,
    defer_step_move,
    transition_run,
    transition_step,
    transition_steps,
)
from app.engine.unit_of_work import Job, UnitOfWork
from app.pg import Conn, dumps
from app.workflows.definition import parse_stored
from app.workflows.steps import ApprovalStep, Definition, RetryPolicy, StepDef, WaitStep

MAX_PASSES = 50


@dataclass
class RunRow:
    id: uuid.UUID
    tenant_id: uuid.UUID
    status: str
    version: int
    priority: str
    input: Any
    workflow_version_id: uuid.UUID
    started_at: datetime | None
    trace_context: str | None = None  # the traceparent of the request that started the run


@dataclass
class StepRow:
    id: uuid.UUID
    step_id: str
    map_index: int | None
    kind: str
    status: str
    version: int
    attempts: int
    current_attempt_id: uuid.UUID | None
    output: Any = None


def step_row(columns: Sequence[Any]) -> StepRow:
    """A :class:`StepRow` from its columns in field order (as :data:`_LOAD_STEPS` and
    ``state_machine.finish_attempts`` select them); on the hot path, so no dict per row."""
    id_, step_id, map_index, kind, status, version, attempts, current_attempt_id, output = columns
    return StepRow(id=id_, step_id=step_id, map_index=map_index, kind=kind, status=status, version=version,
                   attempts=attempts, current_attempt_id=current_attempt_id, output=output)


@dataclass(frozen=True)
class Claimer:
    """A worker ready to run up to ``capacity`` ready steps itself instead of sending them through the queue."""

    worker_id: str
    job_id: str
    capacity: int = 1


@dataclass
class Claimed:
    """A step attempt this worker now holds the lease for and must execute."""

    run_id: uuid.UUID
    tenant_id: uuid.UUID
    workflow_version_id: uuid.UUID
    priority: str
    step_run_id: uuid.UUID
    step_version: int
    step_id: str
    map_index: int | None
    attempt_id: uuid.UUID
    attempt_n: int
    args: Any
    job_id: str
    worker_id: str
    # Traces: what queued the attempt (its span is the attempt's parent) and the run's first trace.
    trace_context: str | None = None
    run_trace_context: str | None = None

    @property
    def idempotency_key(self) -> str:
        key = f"{self.run_id}:{self.step_id}"
        return key if self.map_index is None else f"{key}:{self.map_index}"


_LOCK_RUN = (
    "SELECT id, tenant_id, status, version, priority, input, workflow_version_id, started_at, trace_context FROM run "
    "WHERE id = $1 AND ($2::uuid IS NULL OR tenant_id = $2) FOR UPDATE"
)
# Item outputs stay in the database until their map completes: a map of thousands would otherwise
# be read back on every item's completion.
_LOAD_STEPS = (
    "SELECT id, step_id, map_index, kind, status, version, attempts, current_attempt_id, "
    "CASE WHEN map_index IS NULL THEN output END AS output FROM step_run WHERE run_id = $1 "
    "ORDER BY step_id, map_index"
)


async def lock_run(tx: UnitOfWork, run_id: uuid.UUID, tenant_id: uuid.UUID | None = None) -> RunRow | None:
    """Lock a run's row for this transaction (every engine move of the run happens under it), and tell
    ``tx`` whose events it is writing. None when there is no such run (of ``tenant_id``, when given)."""
    row = await tx.conn.fetchrow(_LOCK_RUN, run_id, tenant_id)
    if row is None:
        return None
    run = RunRow(**row)
    tx.tenant_id = run.tenant_id
    return run


_definitions: OrderedDict[uuid.UUID, Definition] = OrderedDict()


def cached_definition(workflow_version_id: uuid.UUID) -> Definition | None:
    cached = _definitions.get(workflow_version_id)
    if cached is not None:
        _definitions.move_to_end(workflow_version_id)
    return cached


async def load_definition(conn: Conn, workflow_version_id: uuid.UUID) -> Definition:
    """Parsed definition of a version; versions are immutable, so parse once per process."""
    cached = cached_definition(workflow_version_id)
    if cached is not None:
        return cached
    raw = await conn.fetchval("SELECT definition FROM workflow_version WHERE id = $1", workflow_version_id)
    definition = parse_stored(raw)
    _definitions[workflow_version_id] = definition
    if len(_definitions) > 512:
        _definitions.popitem(last=False)
    return definition


async def load_steps(conn: Conn, run_id: uuid.UUID) -> dict[tuple[str, int | None], StepRow]:
    return {(row["step_id"], row["map_index"]): step_row(row) for row in await conn.fetch(_LOAD_STEPS, run_id)}


def views(definition: Definition, rows: dict[tuple[str, int | None], StepRow]) -> dict[str, StepView]:
    items: dict[str, list[str]] = {}
    for (sid, idx), row in rows.items():
        if idx is not None:
            items.setdefault(sid, []).append(row.status)
    return {
        step.id: StepView(
            status=rows[(step.id, None)].status,
            output=rows[(step.id, None)].output,
            items=tuple(items[step.id]) if step.id in items else None,
        )
        for step in definition.steps
    }


def queue_name(settings: Settings, priority: str) -> str:
    return f"{settings.queue_prefix}:{priority}"


def backoff_delay(
    step: StepDef, settings: Settings, attempt_n: int, retry_after: float | None, rand: float,
    policy: RetryPolicy | None = None,
) -> float:
    """Exponential backoff for the attempt after ``attempt_n``; ``rand`` in [0, 1) drives the jitter.

    The step's own ``retry`` wins; then ``policy`` (the tool's); then the settings."""
    retry = step.retry or policy
    base = retry.backoff_base_s if retry else settings.retry_backoff_base_s
    cap = retry.backoff_max_s if retry else settings.retry_backoff_max_s
    jitter = retry.jitter if retry else True
    delay = min(cap, base * (2 ** (attempt_n - 1)))
    if jitter:
        # "Equal jitter": keep half, randomise half, so retries spread without collapsing to zero.
        delay = delay / 2 + delay / 2 * rand
    if retry_after is not None:
        delay = max(delay, min(retry_after, settings.retry_backoff_max_s))
    return float(delay)


def max_attempts(step: StepDef, settings: Settings, policy: RetryPolicy | None = None) -> int:
    retry = step.retry or policy
    return retry.max_attempts if retry else settings.retry_max_attempts


def step_timeout(step: StepDef, settings: Settings) -> float:
    return step.timeout_s if step.timeout_s is not None else settings.step_timeout_s


@dataclass
class Advance:
    """Applies plans for one locked run inside one transaction."""

    tx: UnitOfWork
    run: RunRow
    definition: Definition
    settings: Settings
    claimer: Claimer | None = None
    claimed: list[Claimed] = field(default_factory=list)
    rows: dict[tuple[str, int | None], StepRow] = field(default_factory=dict)

    @property
    def conn(self) -> Conn:
        return self.tx.conn

    async def plan_and_apply(self) -> list[Claimed]:
        """Plan and apply until nothing changes; returns the steps claimed for ``claimer``."""
        if RunStatus(self.run.status) in RUN_TERMINAL:
            return []
        passes = 0
        while passes < MAX_PASSES:
            passes += 1
            if passes > 1 or not self.rows:
                await self.tx.flush(audit=False)  # deferred writes first: the reload must see them
                self.rows = await load_steps(self.conn, self.run.id)
            try:
                step_plan = await plan(
                    self.definition,
                    self.run.input,
                    views(self.definition, self.rows),
                    max_map_items=self.settings.max_map_items,
                    expression_budget_s=self.settings.expression_timeout_s,
                )
                await self._apply(step_plan)
            except StaleTransition:
                continue  # someone moved a row first: plan again from what is there now
            if not step_plan.complete_maps:
                return self.claimed
            # A completed map's output is now stored: plan again for the steps that need it.
        raise StaleTransition(f"run {self.run.id} kept changing while being planned")

    async def _apply(self, step_plan: Plan) -> None:
        paused = self.run.status == RunStatus.PAUSED
        for sid in step_plan.skip:
            await self._move(self.rows[(sid, None)], StepStatus.SKIPPED, "step_skipped", finished_at=now())
        for sid, error in step_plan.fail:
            await self._move(self.rows[(sid, None)], StepStatus.FAILED, "step_failed", error=error, finished_at=now())
        for sid in step_plan.complete_maps:
            await self._complete_map(sid)
        # A failing run starts nothing new (what is running finishes and is recorded).
        if not paused and step_plan.run_status != RunStatus.FAILED:
            for sid in step_plan.wait:
                await self._wait(sid)
            for sid, item_args in step_plan.expand:
                await self._expand(sid, item_args)
            for sid in step_plan.reopen:
                await self._move(self.rows[(sid, None)], StepStatus.RUNNING, "map_reopened")
            starts = [(self.rows[(sid, None)], args) for sid, args in step_plan.start]
            # Items of a map just expanded: their args are known here, no need to read them back.
            expanded = {sid: item_args for sid, item_args in step_plan.expand}
            starts += [
                (self.rows[(sid, index)], expanded[sid][index] if sid in expanded else None)
                for sid, index in step_plan.start_items
            ]
            await self._start_all(starts)
        await self._settle_run(step_plan, paused)

    async def _move(
        self,
        row: StepRow,
        to: StepStatus,
        event: str | None,
        data: dict[str, Any] | None = None,
        **values: Any,
    ) -> None:
        row.version = await transition_step(self.conn, row.id, status=row.status, version=row.version, to=to, **values)
        row.status = to
        if event:
            if "error" in values:
                data = {**(data or {}), "error": values["error"]}
            self.tx.event(self.run.id, event, step_id=row.step_id, map_index=row.map_index, **(data or {}))

    async def dispatch(self, starts: list[tuple[StepRow, Any]], **extra: Any) -> None:
        """Queue steps with a new attempt each (args None: their stored input); ``extra`` columns are set too."""
        await self._start_all(starts, extra)

    async def _start_all(self, starts: list[tuple[StepRow, Any]], extra: dict[str, Any] | None = None) -> None:
        """Start tool steps and map items: the first may go to the claiming worker, the rest are queued."""
        if self.claimer is not None:
            room = max(0, self.claimer.capacity - len(self.claimed))
            for row, args in starts[:room]:
                await self._claim_inline(row, args, self.claimer)
            starts = starts[room:]
        if not starts:
            return
        missing = [row.id for row, args in starts if args is None]
        if missing:
            stored = dict(await self.conn.fetch("SELECT id, input FROM step_run WHERE id = ANY($1::uuid[])", missing))
            starts = [(row, stored[row.id] if args is None else args) for row, args in starts]
        queue = queue_name(self.settings, self.run.priority)
        moves = []
        for row, args in starts:
            attempt_id, attempt_n = uuid.uuid4(), row.attempts + 1
            moves.append(
                (row, {"attempts": attempt_n, "current_attempt_id": attempt_id, "input": args, **(extra or {})})
            )
            self._add_attempt(row, attempt_id, attempt_n, "queued", queue=queue, step_id=row.step_id,
                              map_index=row.map_index)
            self.tx.enqueue(self.run.id, Job(kind="step", job_id=str(attempt_id), queue=queue))
            self.tx.event(self.run.id, "step_queued", step_id=row.step_id, map_index=row.map_index, attempt=attempt_n)
        await transition_steps(self.conn, moves, StepStatus.QUEUED)
        for row, values in moves:
            row.attempts, row.current_attempt_id = values["attempts"], values["current_attempt_id"]

    async def _claim_inline(self, row: StepRow, args: Any, claimer: Claimer) -> None:
        if args is None:
            args = await self.conn.fetchval("SELECT input FROM step_run WHERE id = $1", row.id)
        attempt_id, attempt_n, started = uuid.uuid4(), row.attempts + 1, now()
        values = {
            "attempts": attempt_n,
            "current_attempt_id": attempt_id,
            "input": args,
            "lease_owner": claimer.worker_id,
            "started_at": started,
            "lease_expires_at": started + timedelta(seconds=self.settings.lease_s),
        }
        defer_step_move(self.tx.deferred, row, StepStatus.RUNNING, values)
        self.tx.event(
            self.run.id,
            "step_started",
            step_id=row.step_id,
            map_index=row.map_index,
            attempt=attempt_n,
            worker=claimer.worker_id,
        )
        self._add_attempt(
            row, attempt_id, attempt_n, "running", started_at=started, job_id=claimer.job_id, worker=claimer.worker_id
        )
        row.attempts, row.current_attempt_id = attempt_n, attempt_id
        self.claimed.append(
            Claimed(
                run_id=self.run.id,
                tenant_id=self.run.tenant_id,
                workflow_version_id=self.run.workflow_version_id,
                priority=self.run.priority,
                step_run_id=row.id,
                step_version=row.version,
                step_id=row.step_id,
                map_index=row.map_index,
                attempt_id=attempt_id,
                attempt_n=attempt_n,
                args=args,
                job_id=claimer.job_id,
                worker_id=claimer.worker_id,
                trace_context=tracing.current_traceparent(),  # run inline: a child of the step before it
                run_trace_context=self.run.trace_context,
            )
        )

    def _add_attempt(self, row: StepRow, attempt_id: uuid.UUID, attempt_n: int, status: str, **values: Any) -> None:
        values.setdefault("job_id", str(attempt_id))
        self.tx.add_attempt(
            id=attempt_id,
            tenant_id=self.run.tenant_id,
            run_id=self.run.id,
            step_run_id=row.id,
            n=attempt_n,
            status=status,
            **values,
        )

    async def _wait(self, sid: str) -> None:
        step = self.definition.step(sid)
        queue = queue_name(self.settings, self.run.priority)
        if isinstance(step, ApprovalStep):
            gate = Gate(kind="step", call_id="", tool=None, tool_version=None, args=None,
                        reason=step.approval.reason, timeout_s=step.approval.timeout_s,
                        on_expiry=step.approval.on_expiry)
            await request_approval(self.tx, self.run, self.rows[(sid, None)], gate, queue=queue)
            return
        assert isinstance(step, WaitStep)
        spec = step.wait
        deadline = now() + timedelta(seconds=spec.timeout_s) if spec.timeout_s is not None else None
        row = self.rows[(sid, None)]
        await self._move(row, StepStatus.WAITING, "step_waiting", wait_deadline=deadline, started_at=now())
        if deadline is not None:
            job = Job(kind="wait_timeout", job_id=f"wt:{row.id}:{row.version}", queue=queue, not_before=deadline)
            self.tx.enqueue(self.run.id, job)

    async def _expand(self, sid: str, item_args: list[Any]) -> None:
        parent = self.rows[(sid, None)]
        await self._move(parent, StepStatus.RUNNING, "map_expanded", {"items": len(item_args)}, started_at=now())
        if not item_args:
            await self._complete_map(sid)
            return
        ids = [uuid.uuid4() for _ in item_args]
        await self.conn.execute(
            "INSERT INTO step_run (id, tenant_id, run_id, step_id, map_index, kind, status, version, attempts, "
            "input, created_at) SELECT id, $2, $3, $4, ord - 1, 'item', 'pending', 1, 0, input, $5 "
            "FROM unnest($1::uuid[], $6::jsonb[]) WITH ORDINALITY AS x(id, input, ord)",
            ids,
            self.run.tenant_id,
            self.run.id,
            sid,
            now(),
            [dumps(args) for args in item_args],
        )
        for index, item_id in enumerate(ids):
            self.rows[(sid, index)] = StepRow(
                id=item_id, step_id=sid, map_index=index, kind="item", status=StepStatus.PENDING, version=1,
                attempts=0, current_attempt_id=None,
            )

    async def _complete_map(self, sid: str) -> None:
        outputs = await self.conn.fetchval(
            "SELECT coalesce(jsonb_agg(output ORDER BY map_index), '[]'::jsonb) FROM step_run "
            "WHERE run_id = $1 AND step_id = $2 AND map_index IS NOT NULL",
            self.run.id,
            sid,
        )
        await self._move(
            self.rows[(sid, None)], StepStatus.SUCCEEDED, "step_succeeded", output=outputs, finished_at=now()
        )
        self.rows[(sid, None)].output = outputs

    async def _settle_run(self, step_plan: Plan, paused: bool) -> None:
        target = RunStatus(step_plan.run_status)
        current = RunStatus(self.run.status)
        if target == current:
            return
        if paused and target not in RUN_TERMINAL:
            return
        if current == RunStatus.QUEUED and target == RunStatus.RUNNING and not self.claimed:
            return  # stays queued until a worker claims its first step
        if target == RunStatus.FAILED:
            await self._fail_run()
        elif target == RunStatus.SUCCEEDED:
            sinks = [step.id for step in self.definition.steps if not self.definition.dependents(step.id)]
            output = {
                sid: self.rows[(sid, None)].output
                for sid in sinks
                if self.rows[(sid, None)].status == StepStatus.SUCCEEDED
            }
            await set_run_status(self.tx, self.run, RunStatus.SUCCEEDED, output=output)
        else:
            await set_run_status(self.tx, self.run, target)

    async def _fail_run(self) -> None:
        """Fail the run: the first failed step's error becomes the run's; queued and waiting work stops."""
        failed = [row for (sid, idx), row in self.rows.items() if idx is None and row.status == StepStatus.FAILED]
        error: dict[str, Any] = {"message": "a step was cancelled"}
        if failed:
            step_error = await self.conn.fetchval("SELECT error FROM step_run WHERE id = $1", failed[0].id)
            error = {"step": failed[0].step_id, **(step_error or {})}
        await stop_steps(self.tx, self.run, self.rows.values(), (StepStatus.QUEUED, StepStatus.WAITING), "run failed")
        await set_run_status(self.tx, self.run, RunStatus.FAILED, error=error)


async def set_run_status(
    tx: UnitOfWork, run: RunRow, to: RunStatus, *, actor: str | None = None, **values: Any
) -> None:
    """Move the run (versioned), stamping start/finish times and telling long polls when it ends.

    ``actor`` (an operator action's principal) goes into the run event, not the row."""
    at = now()
    values["updated_at"] = at
    if to in (RunStatus.RUNNING, RunStatus.WAITING) and run.started_at is None:
        values["started_at"] = run.started_at = at
    if to in RUN_TERMINAL:
        values["finished_at"] = at
        tx.finished_runs.append(run.id)
    run.version = await transition_run(tx.conn, run.id, status=run.status, version=run.version, to=to, **values)
    data = {key: value for key, value in values.items() if key in ("error", "status_reason") and value is not None}
    if actor is not None:
        data["actor"] = actor
    tx.event(run.id, f"run_{to.value}", from_status=run.status, **data)
    run.status = to


async def stop_steps(
    tx: UnitOfWork, run: RunRow, rows: Iterable[StepRow], statuses: tuple[StepStatus, ...], reason: str
) -> None:
    """Cancel the run's steps in ``statuses``; their queued jobs are dropped and running ones aborted."""
    targets = [row for row in rows if row.status in statuses]
    if not targets:
        return
    at = now()
    waiting = [row.id for row in targets if row.status == StepStatus.WAITING]
    await transition_steps(
        tx.conn,
        [(row, {"finished_at": at, "lease_owner": None, "lease_expires_at": None}) for row in targets],
        StepStatus.CANCELLED,
    )
    for row in targets:
        tx.event(run.id, "step_cancelled", step_id=row.step_id, map_index=row.map_index, reason=reason)
    attempt_ids = [row.current_attempt_id for row in targets if row.current_attempt_id is not None]
    if attempt_ids:
        running_jobs = await tx.conn.fetch(
            "UPDATE step_attempt SET status = 'cancelled', finished_at = $2, error_class = 'cancelled', "
            "error_message = $3 WHERE id = ANY($1::uuid[]) AND status IN ('queued', 'running') "
            "RETURNING job_id, worker",
            attempt_ids,
            at,
            reason,
        )
        tx.aborts.extend(job for job, worker in running_jobs if worker is not None and job)
    if waiting:
        # Nobody should be asked to decide for a step that no longer waits.
        await cancel_approvals(tx.conn, waiting, decided_at=at)
    await tx.conn.execute("DELETE FROM outbox WHERE run_id = $1", run.id)


async def fail_step(tx: UnitOfWork, run: RunRow, step: StepRow, error_class: str, message: str) -> None:
    """Fail a waiting step (its gate was rejected or expired) with ``error_class`` and ``message``."""
    error = {"class": error_class, "message": message}
    step.version = await transition_step(
        tx.conn,
        step.id,
        status=step.status,
        version=step.version,
        to=StepStatus.FAILED,
        error=error,
        finished_at=now(),
        wait_deadline=None,
    )
    step.status = StepStatus.FAILED
    tx.event(run.id, "step_failed", step_id=step.step_id, map_index=step.map_index, error=error)
