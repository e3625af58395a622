"""The audit log as exported: filters, the JSONL and CSV encodings, and the export's consistent snapshot.

Export columns are those of the chain (docs/security.md, "Audit log"): ids as strings, ``at`` in the chain's
format, so every sealed line can be re-hashed with :func:`app.audit.chain.row_hash`. Sealed rows come first,
in ``seq`` order; rows not sealed yet follow in ``id`` (sealing) order with ``seq``, ``prev_hash`` and
``hash`` null. ``GET /api/v1/audit/export`` and ``steward audit export`` both write the bytes of
:func:`open_export`.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncGenerator, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from app.audit.chain import format_at
from app.audit.verify import Unsealed, unsealed
from app.errors import Invalid
from app.pg import Conn

ExportFormat = Literal["jsonl", "csv"]
MEDIA_TYPES: dict[str, str] = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}

# Rows per cursor fetch, and per chunk of a streamed export.
BATCH = 500

COLUMNS = ("id", "tenant_id", "seq", "at", "actor", "ip", "user_agent", "action", "target", "outcome", "data",
           "prev_hash", "hash")
SELECT = f"SELECT {', '.join(COLUMNS)} FROM audit_event"


# --- filters --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Filters:
    """Which events: ``since <= at < until``, and exact ``actor`` / ``action`` / ``target``."""

    since: datetime | None = None
    until: datetime | None = None
    actor: str | None = None
    action: str | None = None
    target: str | None = None

    def sql(self, tenant_id: uuid.UUID) -> tuple[str, list[Any]]:
        """The WHERE clause (``$1`` is the tenant) and its arguments."""
        clauses = ["tenant_id = $1"]
        args: list[Any] = [tenant_id]
        for column, op, value in (("at", ">=", self.since), ("at", "<", self.until), ("actor", "=", self.actor),
                                  ("action", "=", self.action), ("target", "=", self.target)):
            if value is not None:
                args.append(value)
                clauses.append(f"{column} {op} ${len(args)}")
        return " AND ".join(clauses), args


def utc(at: datetime | None) -> datetime | None:
    """Times without an offset are taken as UTC."""
    return at.replace(tzinfo=UTC) if at is not None and at.tzinfo is None else at


def make_filters(since: datetime | None, until: datetime | None, actor: str | None = None,
                 action: str | None = None, target: str | None = None) -> Filters:
    since, until = utc(since), utc(until)
    if since is not None and until is not None and since > until:
        raise Invalid("`since` is after `until`",
                      errors=[{"pointer": "/query/since", "message": "must not be after `until`"}])
    return Filters(since, until, actor or None, action or None, target or None)


# --- export formats -------------------------------------------------------------------------------------


def export_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row as exported: every column, ids as strings, ``at`` in the chain's format."""
    return {
        "id": str(row["id"]), "tenant_id": str(row["tenant_id"]), "seq": row["seq"], "at": format_at(row["at"]),
        "actor": row["actor"], "ip": row["ip"], "user_agent": row["user_agent"], "action": row["action"],
        "target": row["target"], "outcome": row["outcome"], "data": row["data"], "prev_hash": row["prev_hash"],
        "hash": row["hash"],
    }


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def jsonl_line(row: Mapping[str, Any]) -> str:
    return _compact(export_record(row)) + "\n"


def csv_line(values: Iterable[str | None]) -> str:
    """RFC 4180, every value quoted; an empty unquoted field is a null (so null and "" stay apart)."""
    return ",".join("" if v is None else '"' + v.replace('"', '""') + '"' for v in values) + "\r\n"


def csv_row(row: Mapping[str, Any]) -> str:
    record = export_record(row)
    record["seq"] = None if record["seq"] is None else str(record["seq"])
    record["data"] = _compact(record["data"])
    return csv_line(record[c] for c in COLUMNS)


class Export:
    """One export from open cursors (read one after the other), as encoded chunks of :data:`BATCH` rows;
    ``rows`` counts those sent."""

    def __init__(self, cursors: list[Any], fmt: ExportFormat) -> None:
        self.cursors = cursors
        self.fmt = fmt
        self.rows = 0

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        if self.fmt == "csv":
            yield csv_line(COLUMNS).encode()
        line = jsonl_line if self.fmt == "jsonl" else csv_row
        for cursor in self.cursors:
            while batch := await cursor.fetch(BATCH):
                self.rows += len(batch)
                yield "".join(map(line, batch)).encode()


async def open_export(conn: Conn, tenant_id: uuid.UUID, filters: Filters, fmt: ExportFormat) -> Export:
    """Open the export's cursors: sealed rows in seq order, then unsealed ones in id order (each on its
    index); ``conn`` must be in a transaction (REPEATABLE READ for a snapshot consistent with the head)."""
    where, args = filters.sql(tenant_id)
    sealed = await conn.cursor(f"{SELECT} WHERE {where} AND seq IS NOT NULL ORDER BY seq", *args)
    unsealed = await conn.cursor(f"{SELECT} WHERE {where} AND seq IS NULL ORDER BY id", *args)
    return Export([sealed, unsealed], fmt)


def export_filename(tenant: str, fmt: ExportFormat, at: datetime) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", tenant).strip("-.") or "tenant"
    return f"audit-{safe}-{at.astimezone(UTC).strftime('%Y%m%dT%H%M%SZ')}.{fmt}"


# --- a tenant's export ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """An export opened on a snapshot: the tenant's name, its chain head and unsealed rows then (all of the
    tenant's, whatever the filters), and the rows to send."""

    tenant_name: str | None
    head_seq: int
    head_hash: str
    unsealed: Unsealed
    export: Export


async def open_snapshot(conn: Conn, tenant_id: uuid.UUID, filters: Filters, fmt: ExportFormat) -> Snapshot:
    """Start a read-only REPEATABLE READ transaction on ``conn`` and open the export in it, so the head
    reported is the head of exactly the rows sent. The caller closes ``conn`` (which ends the snapshot)."""
    await conn.transaction(isolation="repeatable_read", readonly=True).start()
    name = await conn.fetchval("SELECT name FROM tenant WHERE id = $1", tenant_id)
    head = await conn.fetchrow("SELECT seq, hash FROM audit_head WHERE tenant_id = $1", tenant_id)
    pending = await unsealed(conn, tenant_id)
    export = await open_export(conn, tenant_id, filters, fmt)
    return Snapshot(name, head["seq"] if head else 0, head["hash"] if head else "", pending, export)
