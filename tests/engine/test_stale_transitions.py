"""Two writers, one row: versioned transitions against the real database.

Both writers read the same run or step row (status and version), then both try to move it. The first
to update holds the row until it commits; the second's ``UPDATE ... WHERE version = :v`` waits for that
commit, then finds the version changed and matches nothing. Exactly one move lands, the other raises
:class:`StaleTransition`, and the row carries the winner's status and version.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import httpx
import pytest
import pytest_asyncio

from app.engine.state_machine import (
    RunStatus,
    StaleTransition,
    StepStatus,
    defer_step_move,
    transition_run,
    transition_step,
    transition_steps,
)
from app.engine.unit_of_work import UnitOfWork
from app.pg import Conn
from tests.support.db import connect
from tests.support.runs import create_workflow, name, start_run
from tests.support.tenants import TenantKey

# How long the loser may take to reach the winner's row lock (a safety bound: it gets there at once).
LOCK_WAIT_S = 10.0


@dataclass
class Row:
    """What a writer read: the fields the engine's step rows carry into a transition."""

    id: uuid.UUID
    status: str
    version: int


Move = Callable[[Conn, Row], Awaitable[int | None]]


@pytest_asyncio.fixture(loop_scope="session")
async def conns(database_url: str) -> AsyncIterator[tuple[Conn, Conn, Conn]]:
    """Two writers and an observer (autocommit, so each look at pg_stat_activity is fresh)."""
    opened = [await connect(database_url) for _ in range(3)]
    try:
        yield opened[0], opened[1], opened[2]
    finally:
        for conn in opened:
            await conn.close()


@pytest_asyncio.fixture(loop_scope="session")
async def waiting_run(client: httpx.AsyncClient, tenant: TenantKey) -> uuid.UUID:
    """A committed run whose one step waits for a signal: run and step both ``waiting``, nobody moving them."""
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [{"id": "w", "wait": {"signal": "go"}}])
    run = await start_run(client, tenant.headers, workflow)
    assert run["status"] == "waiting", run
    return uuid.UUID(run["id"])


async def read(conn: Conn, table: str, run_id: uuid.UUID) -> Row:
    key = "id" if table == "run" else "run_id"
    row = await conn.fetchrow(f"SELECT id, status, version FROM {table} WHERE {key} = $1", run_id)
    assert row is not None
    return Row(row["id"], row["status"], row["version"])


async def blocked_on_a_lock(observer: Conn, pid: int) -> None:
    """Wait until backend ``pid`` waits for a lock (the winner's row lock)."""
    deadline = asyncio.get_running_loop().time() + LOCK_WAIT_S
    while True:
        if await observer.fetchval("SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", pid) == "Lock":
            return
        assert asyncio.get_running_loop().time() < deadline, f"backend {pid} never waited for the row lock"
        await asyncio.sleep(0.005)


async def race(conns: tuple[Conn, Conn, Conn], row: Row, first: Move, second: Move) -> tuple[int | None, Exception]:
    """``first`` moves ``row`` and holds it; ``second`` tries from the same read and waits on the lock;
    ``first`` commits. The winner's result, and what the loser raised."""
    winner, loser, observer = conns
    async with winner.transaction():
        won = await first(winner, Row(row.id, row.status, row.version))
        tx = loser.transaction()
        await tx.start()
        attempt = asyncio.create_task(second(loser, Row(row.id, row.status, row.version)))
        try:
            await blocked_on_a_lock(observer, loser.get_server_pid())
        except BaseException:
            attempt.cancel()
            raise
    try:
        await attempt
    except StaleTransition as exc:
        return won, exc
    finally:
        await tx.rollback()
    raise AssertionError("the second writer's move landed too")


# --- the run row ----------------------------------------------------------------------------------------


def run_move(to: RunStatus) -> Move:
    async def move(conn: Conn, row: Row) -> int | None:
        return await transition_run(conn, row.id, status=row.status, version=row.version, to=to)

    return move


async def test_two_writers_move_one_run_and_only_the_first_lands(
    conns: tuple[Conn, Conn, Conn], waiting_run: uuid.UUID
) -> None:
    writer = conns[0]
    before = await read(writer, "run", waiting_run)
    won, lost = await race(conns, before, run_move(RunStatus.PAUSED), run_move(RunStatus.CANCELLED))
    assert won == before.version + 1
    assert isinstance(lost, StaleTransition) and lost.status == 409
    assert await read(writer, "run", waiting_run) == Row(before.id, "paused", before.version + 1)


async def test_a_writer_that_read_before_a_commit_is_stale_after_it(
    conns: tuple[Conn, Conn, Conn], waiting_run: uuid.UUID
) -> None:
    # No overlap at all: the second writer moves after the first committed, from what it read before.
    first, second, _ = conns
    before = await read(first, "run", waiting_run)
    async with first.transaction():
        await run_move(RunStatus.PAUSED)(first, before)
    with pytest.raises(StaleTransition):
        async with second.transaction():
            await run_move(RunStatus.CANCELLED)(second, before)
    assert await read(second, "run", waiting_run) == Row(before.id, "paused", before.version + 1)


# --- the step row: each of the engine's write paths loses the same way -----------------------------------


async def one(conn: Conn, row: Row) -> int | None:
    return await transition_step(conn, row.id, status=row.status, version=row.version, to=StepStatus.FAILED,
                                 error={"class": "wait_timeout", "message": "test"})


async def bulk(conn: Conn, row: Row) -> int | None:
    await transition_steps(conn, [(row, {})], StepStatus.CANCELLED)
    return row.version


async def deferred(conn: Conn, row: Row) -> int | None:
    # The worker's hot path: the move is checked now and written by the unit of work's flush.
    tx = UnitOfWork(conn)
    defer_step_move(tx.deferred, row, StepStatus.QUEUED, {})
    await tx.flush()
    return row.version


@pytest.mark.parametrize("loser", [one, bulk, deferred], ids=["transition_step", "transition_steps", "flush"])
async def test_two_writers_move_one_step_and_only_the_first_lands(
    conns: tuple[Conn, Conn, Conn], waiting_run: uuid.UUID, loser: Move
) -> None:
    writer = conns[0]
    before = await read(writer, "step_run", waiting_run)
    assert before.status == "waiting"

    async def succeed(conn: Conn, row: Row) -> int | None:
        return await transition_step(conn, row.id, status=row.status, version=row.version, to=StepStatus.SUCCEEDED,
                                     output={"signal": "go"})

    won, lost = await race(conns, before, succeed, loser)
    assert won == before.version + 1
    assert isinstance(lost, StaleTransition)
    after = await writer.fetchrow("SELECT status, version, output, error FROM step_run WHERE id = $1", before.id)
    assert (after["status"], after["version"]) == ("succeeded", before.version + 1)
    assert after["output"] == {"signal": "go"} and after["error"] is None
