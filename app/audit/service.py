"""Writing audit events: one row per action, in the transaction of the action it records."""

from __future__ import annotations

import uuid
from typing import Any

from app.engine.sql import Conn, dumps

_INSERT = (
    "INSERT INTO audit_event (tenant_id, actor, action, target, outcome, data) VALUES ($1, $2, $3, $4, $5, $6::jsonb)"
)


async def record(
    conn: Conn,
    tenant_id: uuid.UUID,
    actor: str,
    action: str,
    target: str | None,
    *,
    outcome: str = "ok",
    data: dict[str, Any] | None = None,
) -> None:
    """Append an audit event. ``data`` must already be redacted: no secret values, no writeOnly fields."""
    await conn.execute(_INSERT, tenant_id, actor, action, target, outcome, dumps(data or {}))
