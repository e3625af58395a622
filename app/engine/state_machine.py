"""Run and step state machines: the allowed moves as data, and the only functions that write a status.

Every write is ``UPDATE … WHERE id = :id AND version = :v`` and bumps ``version``; no row back means
another transaction moved the row first (:class:`StaleTransition`), which callers re-plan from.
"""

from __future__ import annotations

import uuid
from enum import StrEnum
from functools import lru_cache
from typing import Any

from app.errors import Conflict
from app.pg import Conn, dumps, encode, versioned_update


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



RUN_MOVES: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.QUEUED: frozenset({
        RunStatus.RUNNING, RunStatus.WAITING, RunStatus.PAUSED, RunStatus.SUCCEEDED, RunStatus.FAILED,
        RunStatus.CANCELLED,
    }),
    RunStatus.RUNNING: frozenset({
        RunStatus.WAITING, RunStatus.PAUSED, RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED,
    }),
    RunStatus.WAITING: frozenset({
        RunStatus.RUNNING, RunStatus.PAUSED, RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED,
    }),
    # Steps in flight when a run is paused still finish, so a paused run can end.
    RunStatus.PAUSED: frozenset({RunStatus.RUNNING, RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED}),
    RunStatus.FAILED: frozenset({RunStatus.RUNNING}),  # retry from the failed step
    RunStatus.SUCCEEDED: frozenset(),
    RunStatus.CANCELLED: frozenset(),
}

STEP_MOVES: dict[StepStatus, frozenset[StepStatus]] = {
    StepStatus.PENDING: frozenset({
        StepStatus.QUEUED, StepStatus.RUNNING, StepStatus.WAITING, StepStatus.SUCCEEDED, StepStatus.FAILED,
        StepStatus.SKIPPED, StepStatus.CANCELLED,
    }),
    StepStatus.QUEUED: frozenset({StepStatus.RUNNING, StepStatus.CANCELLED}),
    # running -> queued: a transient failure whose next attempt waits out its backoff.
    # running -> waiting: the call it was about to make needs approval.
    StepStatus.RUNNING: frozenset({
        StepStatus.QUEUED, StepStatus.WAITING, StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.CANCELLED,
    }),
    # waiting -> queued: an approved call is dispatched again; waiting -> waiting: its deadline changed.
    StepStatus.WAITING: frozenset({
        StepStatus.QUEUED, StepStatus.WAITING, StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.CANCELLED,
    }),
    # A retried run puts its failed and cancelled steps back to pending; completed ones stay.
    StepStatus.FAILED: frozenset({StepStatus.PENDING}),
    StepStatus.CANCELLED: frozenset({StepStatus.PENDING}),
    StepStatus.SUCCEEDED: frozenset(),
    StepStatus.SKIPPED: frozenset(),
}

RUN_TERMINAL = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED})
STEP_TERMINAL = frozenset({StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.SKIPPED, StepStatus.CANCELLED})
STEP_DONE = frozenset({StepStatus.SUCCEEDED, StepStatus.SKIPPED})
STEP_ACTIVE = frozenset({StepStatus.QUEUED, StepStatus.RUNNING})


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
    conn: Conn, run_id: uuid.UUID, *, status: str, version: int, to: RunStatus, **values: Any
) -> int:
    """Move a run from ``status``/``version`` to ``to``; returns the new version."""
    check_run_move(status, to)
    return await _update(conn, "run", run_id, version, to.value, values)


async def transition_step(
    conn: Conn, step_run_id: uuid.UUID, *, status: str, version: int, to: StepStatus, **values: Any
) -> int:
    """Move a step run from ``status``/``version`` to ``to``; returns the new version."""
    check_step_move(status, to)
    return await _update(conn, "step_run", step_run_id, version, to.value, values)


async def _update(conn: Conn, table: str, row_id: uuid.UUID, version: int, to: str, values: dict[str, Any]) -> int:
    columns = tuple(sorted(values))
    args = [to, version + 1, *(encode(c, values[c]) for c in columns), row_id, version]
    new_version = await conn.fetchval(versioned_update(table, columns), *args)
    if new_version is None:
        raise StaleTransition(f"{table} {row_id} changed concurrently")
    return int(new_version)


# Types of the step_run columns that bulk transitions may set.
_STEP_COLUMN_TYPES = {
    "attempts": "int", "current_attempt_id": "uuid", "input": "jsonb", "output": "jsonb", "error": "jsonb",
    "finished_at": "timestamptz", "started_at": "timestamptz", "lease_owner": "text",
    "lease_expires_at": "timestamptz", "wait_deadline": "timestamptz",
}


async def transition_steps(conn: Conn, moves: list[tuple[Any, dict[str, Any]]], to: StepStatus) -> None:
    """Move many step rows (objects with ``id``, ``status``, ``version``) to ``to`` in one statement.

    Each move is checked and versioned like :func:`transition_step`; if any row changed concurrently
    the statement's effect is discarded with the transaction (:class:`StaleTransition`). On success
    the rows' ``status`` and ``version`` are updated in place.
    """
    if not moves:
        return
    for row, _ in moves:
        check_step_move(row.status, to)
    sql = bulk_moves_sql(1, 2, tuple(sorted(moves[0][1])))
    payload = [{"id": row.id, "version": row.version, **values} for row, values in moves]
    updated = await conn.fetch(sql, to.value, dumps(payload))
    if len(updated) != len(moves):
        raise StaleTransition(f"{len(moves) - len(updated)} of {len(moves)} steps changed concurrently")
    for row, _ in moves:
        row.status, row.version = to.value, row.version + 1


_FINISH_ATTEMPTS = """
WITH v AS (
    SELECT * FROM jsonb_to_recordset($1::jsonb) AS x(
        attempt_id uuid, status text, started_at timestamptz, finished_at timestamptz, error_class text,
        error_message text, step_run_id uuid, version int, step_status text, output jsonb, error jsonb,
        step_started_at timestamptz)
), attempt AS (
    UPDATE step_attempt a SET status = v.status, started_at = v.started_at, finished_at = v.finished_at,
        error_class = v.error_class, error_message = v.error_message
    FROM v WHERE a.id = v.attempt_id AND a.status = 'running' RETURNING a.id
), step AS (
    UPDATE step_run s SET status = v.step_status, version = s.version + 1, output = v.output, error = v.error,
        finished_at = v.finished_at, started_at = coalesce(v.step_started_at, s.started_at),
        lease_owner = NULL, lease_expires_at = NULL
    FROM v WHERE s.id = v.step_run_id AND s.version = v.version AND v.attempt_id IN (SELECT id FROM attempt)
    RETURNING s.id, s.version
)
SELECT step.version, s.id, s.step_id, s.map_index, s.kind, s.status, s.version, s.attempts,
    s.current_attempt_id, CASE WHEN s.map_index IS NULL THEN s.output END
FROM step_run s LEFT JOIN step ON step.id = s.id
WHERE s.run_id = $2
ORDER BY s.step_id, s.map_index
"""


# The same for a single attempt (a chain's every step): plain parameters plan and run cheaper than a
# JSON record set.
_FINISH_ATTEMPT = """
WITH attempt AS (
    UPDATE step_attempt SET status = $1, started_at = $2, finished_at = $3, error_class = $4, error_message = $5
    WHERE id = $6 AND status = 'running' RETURNING id
), step AS (
    UPDATE step_run SET status = $7, version = version + 1, output = $8, error = $9, finished_at = $3,
        started_at = coalesce($10, started_at), lease_owner = NULL, lease_expires_at = NULL
    WHERE id = $11 AND version = $12 AND EXISTS (SELECT 1 FROM attempt) RETURNING id, version
)
SELECT step.version, s.id, s.step_id, s.map_index, s.kind, s.status, s.version, s.attempts,
    s.current_attempt_id, CASE WHEN s.map_index IS NULL THEN s.output END
FROM step_run s LEFT JOIN step ON step.id = s.id
WHERE s.run_id = $13
ORDER BY s.step_id, s.map_index
"""


async def finish_attempts(conn: Conn, run_id: uuid.UUID, finished: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Close running attempts and move their steps out of ``running``, all in one statement.

    Each entry: ``attempt_id``, the attempt's ``status``/``started_at``/``finished_at``/``error_class``/
    ``error_message``, and the step's ``step_run_id``, ``version`` (as claimed), ``step_status``,
    ``output``, ``error``, ``step_started_at``. A step moves only if its attempt was still running and
    its version still matches. Returns the run's step rows as they were before the statement, each
    preceded by the new version of the steps this statement moved (None for the others).
    """
    for entry in finished:
        check_step_move(StepStatus.RUNNING, StepStatus(entry["step_status"]))
    if len(finished) == 1:
        (e,) = finished
        rows = await conn.fetch(
            _FINISH_ATTEMPT, e["status"], e["started_at"], e["finished_at"], e["error_class"], e["error_message"],
            e["attempt_id"], e["step_status"], encode("output", e["output"]), encode("error", e["error"]),
            e["step_started_at"], e["step_run_id"], e["version"], run_id,
        )
    else:
        rows = await conn.fetch(_FINISH_ATTEMPTS, dumps(finished), run_id)
    return [tuple(r) for r in rows]


def defer_step_move(deferred: list[tuple[Any, str, dict[str, Any]]], row: Any, to: StepStatus,
                    values: dict[str, Any]) -> None:
    """Check a step move now and leave its versioned write to the transaction's final flush.

    Saves a round trip on the hot path (a worker claiming the next step inline); the flush checks
    that every deferred row still had the version seen here and raises :class:`StaleTransition` if not.
    """
    check_step_move(row.status, to)
    deferred.append((row, to.value, values))
    row.status, row.version = to.value, row.version + 1


@lru_cache(maxsize=64)
def bulk_moves_sql(to_param: int, rows_param: int, columns: tuple[str, ...]) -> str:
    """A versioned UPDATE of many step rows to one status, setting the same columns, from a JSON record set.

    Used by :func:`transition_steps` and, as a CTE, by the flush of deferred moves.
    """
    sets = "".join(f", {c} = v.{c}" for c in columns)
    fields = "".join(f", {c} {_STEP_COLUMN_TYPES[c]}" for c in columns)
    return (
        f"UPDATE step_run s SET status = ${to_param}, version = s.version + 1{sets} "
        f"FROM jsonb_to_recordset(${rows_param}::jsonb) AS v(id uuid, version int{fields}) "
        "WHERE s.id = v.id AND s.version = v.version RETURNING s.id"
    )
