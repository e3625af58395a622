"""``advance()``: load a run's steps, ask the planner what follows, apply it through the state machine.

Callers hold the run row lock (:func:`lock_run`) for the whole transaction, so moves of one run are
serialised; every step write is still versioned, and a lost race reloads and re-plans.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.engine.models import Outbox
from app.engine.planner import Plan, StepView, plan
from app.engine.state_machine import (
    RUN_TERMINAL,
    RunStatus,
    StaleTransition,
    StepStatus,
    transition_run,
    transition_step,
)
from app.engine.tx import Job, Tx
from app.runs.models import Run, StepAttempt, StepRun
from app.workflows.definition import Definition, StepDef, parse_definition
from app.workflows.models import WorkflowVersion

S = StepStatus
MAX_PASSES = 50


def now() -> datetime:
    return datetime.now(UTC)


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


@dataclass(frozen=True)
class Claimer:
    """A worker ready to run the next step itself instead of sending it through the queue."""

    worker_id: str
    job_id: str


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

    @property
    def idempotency_key(self) -> str:
        key = f"{self.run_id}:{self.step_id}"
        return key if self.map_index is None else f"{key}:{self.map_index}"


RUN_COLUMNS = (
    Run.id,
    Run.tenant_id,
    Run.status,
    Run.version,
    Run.priority,
    Run.input,
    Run.workflow_version_id,
    Run.started_at,
)


async def lock_run(db: AsyncSession, run_id: uuid.UUID, tenant_id: uuid.UUID | None = None) -> RunRow | None:
    """Lock a run's row for this transaction; every engine move of the run happens under it."""
    stmt = select(*RUN_COLUMNS).where(Run.id == run_id).with_for_update()
    if tenant_id is not None:
        stmt = stmt.where(Run.tenant_id == tenant_id)
    row = (await db.execute(stmt)).one_or_none()
    return RunRow(*row) if row is not None else None


async def lock(tx: Tx, run_id: uuid.UUID, tenant_id: uuid.UUID | None = None) -> RunRow | None:
    """:func:`lock_run`, also telling ``tx`` whose events it is writing."""
    run = await lock_run(tx.db, run_id, tenant_id)
    if run is not None:
        tx.tenant_id = run.tenant_id
    return run


_definitions: OrderedDict[uuid.UUID, Definition] = OrderedDict()


async def load_definition(db: AsyncSession, workflow_version_id: uuid.UUID) -> Definition:
    """Parsed definition of a version; versions are immutable, so parse once per process."""
    cached = _definitions.get(workflow_version_id)
    if cached is not None:
        _definitions.move_to_end(workflow_version_id)
        return cached
    raw = (
        await db.execute(select(WorkflowVersion.definition).where(WorkflowVersion.id == workflow_version_id))
    ).scalar_one()
    # Stored definitions passed validation under whatever limits applied then; don't re-apply limits.
    definition = parse_definition(raw, max_steps=1_000_000, max_map_items=10**9, max_map_concurrency=10**6)
    _definitions[workflow_version_id] = definition
    if len(_definitions) > 512:
        _definitions.popitem(last=False)
    return definition


async def load_steps(db: AsyncSession, run_id: uuid.UUID) -> dict[tuple[str, int | None], StepRow]:
    # Item outputs stay in the database until their map completes: a map of thousands would
    # otherwise be read back on every item's completion.
    stmt = (
        select(
            StepRun.id,
            StepRun.step_id,
            StepRun.map_index,
            StepRun.kind,
            StepRun.status,
            StepRun.version,
            StepRun.attempts,
            StepRun.current_attempt_id,
            StepRun.output,
        )
        .where(StepRun.run_id == run_id)
        .order_by(StepRun.step_id, StepRun.map_index)
    )
    rows: dict[tuple[str, int | None], StepRow] = {}
    for r in await db.execute(stmt):
        row = StepRow(*r)
        if row.map_index is not None:
            row.output = None
        rows[(row.step_id, row.map_index)] = row
    return rows


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
    step: StepDef, settings: Settings, attempt_n: int, retry_after: float | None, rand: float
) -> float:
    """Exponential backoff for the attempt after ``attempt_n``; ``rand`` in [0, 1) drives the jitter."""
    base = step.retry.backoff_base_s if step.retry else settings.retry_backoff_base_s
    cap = step.retry.backoff_max_s if step.retry else settings.retry_backoff_max_s
    jitter = step.retry.jitter if step.retry else True
    delay = min(cap, base * (2 ** (attempt_n - 1)))
    if jitter:
        # "Equal jitter": keep half, randomise half, so retries spread without collapsing to zero.
        delay = delay / 2 + delay / 2 * rand
    if retry_after is not None:
        delay = max(delay, min(retry_after, settings.retry_backoff_max_s))
    return float(delay)


def max_attempts(step: StepDef, settings: Settings) -> int:
    return step.retry.max_attempts if step.retry else settings.retry_max_attempts


def step_timeout(step: StepDef, settings: Settings) -> float:
    return step.timeout_s if step.timeout_s is not None else settings.step_timeout_s


@dataclass
class Advance:
    """Applies plans for one locked run inside one transaction."""

    tx: Tx
    run: RunRow
    definition: Definition
    settings: Settings
    claimer: Claimer | None = None
    claimed: Claimed | None = None
    rows: dict[tuple[str, int | None], StepRow] = field(default_factory=dict)

    @property
    def db(self) -> AsyncSession:
        return self.tx.db

    async def run_plan(self) -> Claimed | None:
        """Plan and apply until nothing changes; returns the step claimed for ``claimer``, if any."""
        if RunStatus(self.run.status) in RUN_TERMINAL:
            return None
        passes = 0
        while passes < MAX_PASSES:
            passes += 1
            self.rows = await load_steps(self.db, self.run.id)
            try:
                p = plan(self.definition, self.run.input, views(self.definition, self.rows))
                await self._apply(p)
            except StaleTransition:
                continue  # someone moved a row first: plan again from what is there now
            if not p.complete_maps:
                return self.claimed
            # A completed map's output is now stored: plan again for the steps that need it.
        raise StaleTransition(f"run {self.run.id} kept changing while being planned")

    async def _apply(self, p: Plan) -> None:
        paused = self.run.status == RunStatus.PAUSED
        for sid in p.skip:
            await self._move(self.rows[(sid, None)], S.SKIPPED, "step_skipped", finished_at=now())
        for sid, error in p.fail:
            await self._move(self.rows[(sid, None)], S.FAILED, "step_failed", error=error, finished_at=now())
        for sid in p.complete_maps:
            await self._complete_map(sid)
        if not paused:
            for sid, args in p.start:
                await self._start(self.rows[(sid, None)], args)
            for sid in p.wait:
                await self._wait(sid)
            for sid, item_args in p.expand:
                await self._expand(sid, item_args)
            for sid in p.reopen:
                await self._move(self.rows[(sid, None)], S.RUNNING, "map_reopened")
            for sid, index in p.start_items:
                await self._start(self.rows[(sid, index)], None)
        await self._settle_run(p, paused)

    async def _move(
        self,
        row: StepRow,
        to: StepStatus,
        event: str | None,
        data: dict[str, Any] | None = None,
        **values: Any,
    ) -> None:
        row.version = await transition_step(
            self.db, row.id, status=row.status, version=row.version, to=to, **values
        )
        row.status = to
        if event:
            if "error" in values:
                data = {**(data or {}), "error": values["error"]}
            self.tx.event(self.run.id, event, step_id=row.step_id, map_index=row.map_index, **(data or {}))

    async def _start(self, row: StepRow, args: Any) -> None:
        """Queue a tool step or map item, or hand it straight to the claiming worker."""
        if args is None:
            args = (await self.db.execute(select(StepRun.input).where(StepRun.id == row.id))).scalar_one()
        attempt_id = uuid.uuid4()
        n = row.attempts + 1
        started = now()
        inline = self.claimer is not None and self.claimed is None
        if inline:
            assert self.claimer is not None
            await self._move(
                row,
                S.RUNNING,
                "step_started",
                attempts=n,
                current_attempt_id=attempt_id,
                input=args,
                lease_owner=self.claimer.worker_id,
                started_at=started,
                lease_expires_at=started + timedelta(seconds=self.settings.lease_s),
                data={"attempt": n, "worker": self.claimer.worker_id},
            )
            self._add_attempt(
                row,
                attempt_id,
                n,
                "running",
                started_at=started,
                job_id=self.claimer.job_id,
                worker=self.claimer.worker_id,
            )
            self.claimed = self._claimed(row, attempt_id, n, args, self.claimer)
        else:
            await self._move(
                row,
                S.QUEUED,
                "step_queued",
                {"attempt": n},
                attempts=n,
                current_attempt_id=attempt_id,
                input=args,
            )
            self._add_attempt(row, attempt_id, n, "queued")
            self.tx.enqueue(
                self.run.id, Job("step", str(attempt_id), queue_name(self.settings, self.run.priority))
            )
        row.attempts = n
        row.current_attempt_id = attempt_id

    def _add_attempt(self, row: StepRow, attempt_id: uuid.UUID, n: int, status: str, **values: Any) -> None:
        self.tx.attempts.append(
            {
                "id": attempt_id,
                "tenant_id": self.run.tenant_id,
                "run_id": self.run.id,
                "step_run_id": row.id,
                "n": n,
                "status": status,
                "queued_at": now(),
                "job_id": values.pop("job_id", str(attempt_id)),
                "worker": None,
                "not_before": None,
                "started_at": None,
                **values,
            }
        )

    def _claimed(self, row: StepRow, attempt_id: uuid.UUID, n: int, args: Any, claimer: Claimer) -> Claimed:
        return Claimed(
            run_id=self.run.id,
            tenant_id=self.run.tenant_id,
            workflow_version_id=self.run.workflow_version_id,
            priority=self.run.priority,
            step_run_id=row.id,
            step_version=row.version,
            step_id=row.step_id,
            map_index=row.map_index,
            attempt_id=attempt_id,
            attempt_n=n,
            args=args,
            job_id=claimer.job_id,
            worker_id=claimer.worker_id,
        )

    async def _wait(self, sid: str) -> None:
        spec = self.definition.step(sid).wait
        assert spec is not None
        deadline = now() + timedelta(seconds=spec.timeout_s) if spec.timeout_s is not None else None
        row = self.rows[(sid, None)]
        await self._move(row, S.WAITING, "step_waiting", wait_deadline=deadline, started_at=now())
        if deadline is not None:
            job = Job(
                "wait_timeout",
                f"wt:{row.id}:{row.version}",
                queue_name(self.settings, self.run.priority),
                not_before=deadline,
            )
            self.tx.enqueue(self.run.id, job)

    async def _expand(self, sid: str, item_args: list[Any]) -> None:
        parent = self.rows[(sid, None)]
        if len(item_args) > self.settings.max_map_items:
            error = {
                "class": "map_too_large",
                "message": f"map has {len(item_args)} items; the limit is {self.settings.max_map_items}",
            }
            await self._move(parent, S.FAILED, "step_failed", error=error, finished_at=now())
            return
        await self._move(parent, S.RUNNING, "map_expanded", started_at=now())
        self.tx.events[-1]["data"]["items"] = len(item_args)
        if not item_args:
            await self._complete_map(sid)
            return
        values = [
            {
                "id": uuid.uuid4(),
                "tenant_id": self.run.tenant_id,
                "run_id": self.run.id,
                "step_id": sid,
                "map_index": i,
                "kind": "item",
                "status": S.PENDING.value,
                "version": 1,
                "attempts": 0,
                "input": args,
            }
            for i, args in enumerate(item_args)
        ]
        await self.db.execute(insert(StepRun), values)
        for v in values:
            self.rows[(sid, v["map_index"])] = StepRow(
                v["id"], sid, v["map_index"], "item", S.PENDING, 1, 0, None
            )

    async def _complete_map(self, sid: str) -> None:
        outputs = (
            (
                await self.db.execute(
                    select(StepRun.output)
                    .where(
                        StepRun.run_id == self.run.id, StepRun.step_id == sid, StepRun.map_index.is_not(None)
                    )
                    .order_by(StepRun.map_index)
                )
            )
            .scalars()
            .all()
        )
        await self._move(
            self.rows[(sid, None)], S.SUCCEEDED, "step_succeeded", output=list(outputs), finished_at=now()
        )
        self.rows[(sid, None)].output = list(outputs)

    async def _settle_run(self, p: Plan, paused: bool) -> None:
        target = RunStatus(p.run_status)
        current = RunStatus(self.run.status)
        if target == current:
            return
        if paused and target not in RUN_TERMINAL:
            return
        if current == RunStatus.QUEUED and target == RunStatus.RUNNING and self.claimed is None:
            return  # stays queued until a worker claims its first step
        if target == RunStatus.FAILED:
            await self._fail_run()
        elif target == RunStatus.SUCCEEDED:
            sinks = [s.id for s in self.definition.steps if not self.definition.dependents(s.id)]
            output = {
                sid: self.rows[(sid, None)].output
                for sid in sinks
                if self.rows[(sid, None)].status == S.SUCCEEDED
            }
            await set_run_status(self.tx, self.run, RunStatus.SUCCEEDED, output=output)
        else:
            await set_run_status(self.tx, self.run, target)

    async def _fail_run(self) -> None:
        """Fail the run: the first failed step's error becomes the run's; queued and waiting work stops."""
        failed = [
            (sid, row) for (sid, idx), row in self.rows.items() if idx is None and row.status == S.FAILED
        ]
        error_row = (
            (
                await self.db.execute(
                    select(StepRun.step_id, StepRun.error).where(StepRun.id == failed[0][1].id)
                )
            ).one()
            if failed
            else None
        )
        await stop_steps(self.tx, self.run, self.rows.values(), (S.QUEUED, S.WAITING), "run failed")
        error = (
            {"step": error_row[0], **(error_row[1] or {})}
            if error_row
            else {"message": "a step was cancelled"}
        )
        await set_run_status(self.tx, self.run, RunStatus.FAILED, error=error)


async def set_run_status(tx: Tx, run: RunRow, to: RunStatus, **values: Any) -> None:
    """Move the run (versioned), stamping start/finish times and telling long polls when it ends."""
    t = now()
    values["updated_at"] = t
    if to in (RunStatus.RUNNING, RunStatus.WAITING) and run.started_at is None:
        values["started_at"] = run.started_at = t
    if to in RUN_TERMINAL:
        values["finished_at"] = t
        tx.finished_runs.append(run.id)
    run.version = await transition_run(tx.db, run.id, status=run.status, version=run.version, to=to, **values)
    data = {k: v for k, v in values.items() if k in ("error",)}
    tx.event(run.id, f"run_{to.value}", from_status=run.status, **data)
    run.status = to


async def stop_steps(tx: Tx, run: RunRow, rows: Any, statuses: tuple[StepStatus, ...], reason: str) -> None:
    """Cancel the run's steps in ``statuses``; their queued jobs are dropped and running ones aborted."""
    targets = [r for r in rows if r.status in statuses]
    if not targets:
        return
    t = now()
    for row in targets:
        row.version = await transition_step(
            tx.db,
            row.id,
            status=row.status,
            version=row.version,
            to=S.CANCELLED,
            finished_at=t,
            lease_owner=None,
            lease_expires_at=None,
        )
        row.status = S.CANCELLED
        tx.event(run.id, "step_cancelled", step_id=row.step_id, map_index=row.map_index, reason=reason)
    attempt_ids = [r.current_attempt_id for r in targets if r.current_attempt_id is not None]
    if attempt_ids:
        running_jobs = (
            await tx.db.execute(
                update(StepAttempt)
                .where(StepAttempt.id.in_(attempt_ids), StepAttempt.status.in_(("queued", "running")))
                .values(status="cancelled", finished_at=t, error_class="cancelled", error_message=reason)
                .returning(StepAttempt.job_id, StepAttempt.worker)
            )
        ).all()
        tx.aborts.extend(job for job, worker in running_jobs if worker is not None and job)
    await tx.db.execute(delete(Outbox).where(Outbox.run_id == run.id))


def request_hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
