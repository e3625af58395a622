"""Run and step state machines: the allowed moves as data, and the only functions that write a status.

Every write is ``UPDATE … WHERE id = :id AND version = :v`` and bumps ``version``; no row back means
another transaction moved the row first (:class:`StaleTransition`), which callers re-plan from.
"""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Any

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import Conflict
from app.runs.models import Run, StepRun


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    WAITING = "waiting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class StepStatus(StrEnum):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


R, S = RunStatus, StepStatus

RUN_MOVES: dict[RunStatus, frozenset[RunStatus]] = {
    R.QUEUED: frozenset({R.RUNNING, R.WAITING, R.PAUSED, R.SUCCEEDED, R.FAILED, R.CANCELLED}),
    R.RUNNING: frozenset({R.WAITING, R.PAUSED, R.SUCCEEDED, R.FAILED, R.CANCELLED}),
    R.WAITING: frozenset({R.RUNNING, R.PAUSED, R.SUCCEEDED, R.FAILED, R.CANCELLED}),
    # Steps in flight when a run is paused still finish, so a paused run can end.
    R.PAUSED: frozenset({R.RUNNING, R.WAITING, R.SUCCEEDED, R.FAILED, R.CANCELLED}),
    R.FAILED: frozenset({R.RUNNING}),  # retry from the failed step
    R.SUCCEEDED: frozenset(),
    R.CANCELLED: frozenset(),
}

STEP_MOVES: dict[StepStatus, frozenset[StepStatus]] = {
    S.PENDING: frozenset({S.QUEUED, S.RUNNING, S.WAITING, S.SUCCEEDED, S.FAILED, S.SKIPPED, S.CANCELLED}),
    S.QUEUED: frozenset({S.RUNNING, S.FAILED, S.CANCELLED}),
    # running -> queued: a transient failure whose next attempt waits out its backoff.
    S.RUNNING: frozenset({S.QUEUED, S.SUCCEEDED, S.FAILED, S.CANCELLED}),
    S.WAITING: frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED}),
    # A retried run puts its failed and cancelled steps back to pending; completed ones stay.
    S.FAILED: frozenset({S.PENDING}),
    S.CANCELLED: frozenset({S.PENDING}),
    S.SUCCEEDED: frozenset(),
    S.SKIPPED: frozenset(),
}

RUN_TERMINAL = frozenset({R.SUCCEEDED, R.FAILED, R.CANCELLED})
STEP_TERMINAL = frozenset({S.SUCCEEDED, S.FAILED, S.SKIPPED, S.CANCELLED})
STEP_DONE = frozenset({S.SUCCEEDED, S.SKIPPED})
STEP_ACTIVE = frozenset({S.QUEUED, S.RUNNING})


class IllegalTransition(Conflict):
    type = "illegal-transition"
    title = "Not allowed in the current state"


class StaleTransition(Conflict):
    type = "stale-transition"
    title = "Changed concurrently"


def check_run_move(current: str, to: RunStatus) -> None:
    if to not in RUN_MOVES[RunStatus(current)]:
        raise IllegalTransition(f"a {current} run cannot become {to}", status_now=current)


def check_step_move(current: str, to: StepStatus) -> None:
    if to not in STEP_MOVES[StepStatus(current)]:
        raise IllegalTransition(f"a {current} step cannot become {to}", status_now=current)


async def transition_run(
    db: AsyncSession, run_id: uuid.UUID, *, status: str, version: int, to: RunStatus, **values: Any
) -> int:
    """Move a run from ``status``/``version`` to ``to``; returns the new version."""
    check_run_move(status, to)
    stmt = (
        update(Run)
        .where(Run.id == run_id, Run.version == version)
        .values(status=to.value, version=version + 1, **values)
        .returning(Run.version)
        .execution_options(synchronize_session=False)
    )
    new_version = (await db.execute(stmt)).scalar_one_or_none()
    if new_version is None:
        raise StaleTransition(f"run {run_id} changed concurrently")
    return int(new_version)


async def transition_step(
    db: AsyncSession, step_run_id: uuid.UUID, *, status: str, version: int, to: StepStatus, **values: Any
) -> int:
    """Move a step run from ``status``/``version`` to ``to``; returns the new version."""
    check_step_move(status, to)
    stmt = (
        update(StepRun)
        .where(StepRun.id == step_run_id, StepRun.version == version)
        .values(status=to.value, version=version + 1, **values)
        .returning(StepRun.version)
        .execution_options(synchronize_session=False)
    )
    new_version = (await db.execute(stmt)).scalar_one_or_none()
    if new_version is None:
        raise StaleTransition(f"step run {step_run_id} changed concurrently")
    return int(new_version)
