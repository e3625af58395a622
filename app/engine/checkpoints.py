"""Agent checkpoints: each completed model turn and tool call of an agent step, written as it completes.

A checkpoint is written in one transaction with the run events and audit notes of what it records,
and only while the writer still holds the step (its attempt is the step's current one and the step
is running): a worker whose lease expired and whose step was taken over is fenced off and stops. A
worker resuming the step replays the checkpoints instead of calling the model or the tool again.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

from app.engine.advance import Claimed
from app.engine.attempts import AuditNote, record_notes
from app.engine.unit_of_work import UnitOfWork
from app.pg import Conn, dumps


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    # "model" | "tool" | "note" (a message the agent added, e.g. an output correction) | "reset" (a retry
    # started the conversation afresh)
    kind: str
    call_id: str | None
    data: dict[str, Any]


class Fenced(Exception):
    """The step is no longer this attempt's to work on (cancelled, timed out, or taken over)."""


_HELD = (
    "SELECT 1 FROM step_run WHERE id = $1 AND status = 'running' AND current_attempt_id = $2 FOR UPDATE"
)


async def load(conn: Conn, step_run_id: uuid.UUID) -> list[Checkpoint]:
    rows = await conn.fetch(
        "SELECT seq, kind, call_id, data FROM agent_checkpoint WHERE step_run_id = $1 ORDER BY seq", step_run_id
    )
    return [Checkpoint(**row) for row in rows]


async def save(
    tx: UnitOfWork,
    claimed: Claimed,
    checkpoint: Checkpoint,
    events: list[tuple[str, dict[str, Any]]],
    audits: list[AuditNote],
) -> None:
    """Write one checkpoint with its events and audit notes; :class:`Fenced` if the step moved on."""
    if await tx.conn.fetchval(_HELD, claimed.step_run_id, claimed.attempt_id) is None:
        raise Fenced(f"step run {claimed.step_run_id} is no longer held by attempt {claimed.attempt_id}")
    try:
        await tx.conn.execute(
            "INSERT INTO agent_checkpoint (step_run_id, seq, tenant_id, run_id, kind, call_id, data) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)",
            claimed.step_run_id, checkpoint.seq, claimed.tenant_id, claimed.run_id, checkpoint.kind,
            checkpoint.call_id, dumps(checkpoint.data),
        )
    except asyncpg.UniqueViolationError as exc:
        raise Fenced(f"checkpoint {checkpoint.seq} of step run {claimed.step_run_id} was written by another worker") \
            from exc
    tx.tenant_id = claimed.tenant_id
    await record_notes(tx, claimed, events, audits)


async def restart_conversations(tx: UnitOfWork, step_run_ids: list[uuid.UUID]) -> None:
    """Mark where the conversations of retried model steps start afresh (a ``reset`` checkpoint)."""
    if not step_run_ids:
        return
    await tx.conn.execute(
        "INSERT INTO agent_checkpoint (step_run_id, seq, tenant_id, run_id, kind, data) "
        "SELECT s.id, coalesce(max(c.seq) + 1, 0), s.tenant_id, s.run_id, 'reset', '{}'::jsonb "
        "FROM step_run s LEFT JOIN agent_checkpoint c ON c.step_run_id = s.id "
        "WHERE s.id = ANY($1::uuid[]) GROUP BY s.id, s.tenant_id, s.run_id",
        step_run_ids,
    )
