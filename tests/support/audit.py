"""The audit chain in tests: an owner connection, events appended and sealed the way the product does it,
tampering as an attacker holding the database could, and offline re-verification of an export."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from app.audit.chain import ChainRow, Entry, append, row_hash, seal_backlog
from app.pg import Conn


def entries(n: int, *, start: int = 1, at: Sequence[datetime] | None = None, **fields: Any) -> list[Entry]:
    """``n`` distinct entries: target ``thing:<i>``, data ``{"i": i}`` (override with ``fields``)."""
    out = []
    for k in range(n):
        i = start + k
        values: dict[str, Any] = {"actor": "user:alice", "action": "thing.do", "target": f"thing:{i}",
                                  "data": {"i": i, "nested": {"list": [1, "two", None]}}, **fields}
        if at is not None:
            values["at"] = at[k]
        out.append(Entry(**values))
    return out


async def add(conn: Conn, tenant_id: uuid.UUID, items: Sequence[Entry]) -> None:
    """Append ``items`` in one committed transaction, then seal them, as the product's actions and sealer do."""
    await add_unsealed(conn, tenant_id, items)
    await seal_backlog(conn, tenant_id)


async def add_unsealed(conn: Conn, tenant_id: uuid.UUID, items: Sequence[Entry]) -> None:
    """Append ``items`` in one committed transaction, as an action does (no sealer runs)."""
    async with conn.transaction():
        await append(conn, tenant_id, items)


async def rows(conn: Conn, tenant_id: uuid.UUID) -> list[asyncpg.Record]:
    """The tenant's rows: sealed ones in seq order, then unsealed ones in id (sealing) order."""
    return list(await conn.fetch("SELECT * FROM audit_event WHERE tenant_id = $1 ORDER BY seq, id", tenant_id))


async def tamper(conn: Conn, sql: str, *args: Any) -> str:
    """Run ``sql`` with triggers off (superuser only): what an attacker holding the database could do."""
    async with conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        status: str = await conn.execute(sql, *args)
    return status


def rehash(row: asyncpg.Record | dict[str, Any], **changes: Any) -> str:
    """The hash ``row`` would have with ``changes`` applied (as a forger recomputing it would)."""
    values = {k: row[k] for k in ("tenant_id", "seq", "at", "actor", "ip", "user_agent", "action", "target",
                                   "outcome", "data", "prev_hash")}
    values.update(changes)
    return row_hash(ChainRow(**values))


def line_row(line: dict[str, Any]) -> ChainRow:
    """An exported JSONL object as the ChainRow it was hashed from."""
    return ChainRow(
        tenant_id=uuid.UUID(line["tenant_id"]), seq=line["seq"], at=datetime.fromisoformat(line["at"]),
        actor=line["actor"], ip=line["ip"], user_agent=line["user_agent"], action=line["action"],
        target=line["target"], outcome=line["outcome"], data=line["data"], prev_hash=line["prev_hash"],
    )


def reverify_lines(text: str) -> list[dict[str, Any]]:
    """Parse a JSONL export and check it offline: each sealed row's hash recomputed, each link followed;
    unsealed rows (no seq, prev_hash, hash) only after every sealed one."""
    lines = [json.loads(line) for line in text.splitlines()]
    previous: dict[str, Any] | None = None
    for k, line in enumerate(lines):
        if line["seq"] is None:
            assert line["prev_hash"] is None and line["hash"] is None, f"line {k + 1} is half sealed"
            assert all(later["seq"] is None for later in lines[k:]), f"line {k + 1}: a sealed row after an unsealed one"
            continue
        assert row_hash(line_row(line)) == line["hash"], f"row {line['seq']} does not re-hash"
        if previous is not None and line["seq"] == previous["seq"] + 1:
            assert line["prev_hash"] == previous["hash"], f"row {line['seq']} does not link"
        previous = line
    return lines
