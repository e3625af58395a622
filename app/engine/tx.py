"""A unit of engine work: one database transaction plus what it hands on after commit.

Events and outbox rows are collected while the engine applies transitions and written in one
multi-row insert each just before commit; the outbox rows are relayed to arq only after commit.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import AsyncSession

from app.engine.models import Outbox
from app.runs.models import RunEvent, StepAttempt

QUEUES = ("high", "normal", "low")


@dataclass(frozen=True)
class Job:
    """An arq job to enqueue: ``run_step(attempt_id)`` or ``fire_wait_timeout(step_run_id)``."""

    kind: str
    job_id: str
    queue: str
    not_before: datetime | None = None


@dataclass
class Tx:
    db: AsyncSession
    # The tenant of the run being worked on; set when the run is locked.
    tenant_id: uuid.UUID | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    outbox: list[dict[str, Any]] = field(default_factory=list)
    # Jobs to (re-)send after commit: new outbox rows, plus existing ones a resume re-sends.
    jobs: list[Job] = field(default_factory=list)
    # arq jobs to abort after commit (a cancelled run's running steps).
    aborts: list[str] = field(default_factory=list)
    finished_runs: list[uuid.UUID] = field(default_factory=list)

    def event(
        self,
        run_id: uuid.UUID,
        type_: str,
        *,
        step_id: str | None = None,
        map_index: int | None = None,
        **data: Any,
    ) -> None:
        self.events.append(
            {
                "tenant_id": self.tenant_id,
                "run_id": run_id,
                "step_id": step_id,
                "map_index": map_index,
                "type": type_,
                "data": data,
            }
        )

    def enqueue(self, run_id: uuid.UUID, job: Job) -> None:
        self.outbox.append(
            {
                "tenant_id": self.tenant_id,
                "run_id": run_id,
                "kind": job.kind,
                "job_id": job.job_id,
                "queue": job.queue,
                "not_before": job.not_before,
            }
        )
        self.jobs.append(job)

    async def flush(self) -> None:
        """Write the collected events and outbox rows; call once, right before commit."""
        if self.attempts:
            await self.db.execute(insert(StepAttempt), self.attempts)
            self.attempts = []
        if self.events:
            await self.db.execute(insert(RunEvent), self.events)
            self.events = []
        if self.outbox:
            await self.db.execute(insert(Outbox), self.outbox)
            self.outbox = []
        for run_id in self.finished_runs:
            # Long polls wake on this; delivered only if the transaction commits.
            await self.db.execute(text("SELECT pg_notify('steward_run_done', :id)"), {"id": str(run_id)})
