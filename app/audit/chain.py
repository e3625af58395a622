"""The audit log's hash chain: one chain per tenant, each row sealing the one before it.

A row's hash is SHA-256 over its canonical serialization: the JSON object of its fields below, keys
sorted, no whitespace, UTF-8, ``at`` as ``YYYY-MM-DDTHH:MM:SS.ffffffZ``. ``prev_hash`` is the hash of
the tenant's previous row (``seq - 1``), or 64 zeros for the first. Anyone holding an export can
re-compute it (docs/security.md spells the format out).

Writers lock the tenant's ``audit_head`` row, append after it and move it, all in the transaction of
the action they record: concurrent writers queue on that row, so the chain cannot fork, and a rolled
back action leaves neither its row nor a gap.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from app.canonical import canonical_json
from app.clock import now
from app.pg import Conn, dumps

GENESIS = "0" * 64
FORMAT_VERSION = 1

# Keys whose values never belong in the audit log, whatever the caller passed.
_SECRET_KEYS = ("password", "secret", "token", "api_key", "apikey", "authorization", "cookie", "credential")
REDACTED = "[redacted]"


@dataclass(frozen=True)
class Entry:
    """One audit event before it joins the chain."""

    actor: str
    action: str
    target: str | None
    outcome: str = "ok"
    data: dict[str, Any] = field(default_factory=dict)
    ip: str | None = None
    user_agent: str | None = None
    at: datetime = field(default_factory=now)


@dataclass(frozen=True)
class ChainRow:
    tenant_id: uuid.UUID
    seq: int
    at: datetime
    actor: str
    ip: str | None
    user_agent: str | None
    action: str
    target: str | None
    outcome: str
    data: Any
    prev_hash: str


def format_at(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical(row: ChainRow) -> bytes:
    body = {
        "v": FORMAT_VERSION,
        "tenant_id": str(row.tenant_id),
        "seq": row.seq,
        "at": format_at(row.at),
        "actor": row.actor,
        "ip": row.ip,
        "user_agent": row.user_agent,
        "action": row.action,
        "target": row.target,
        "outcome": row.outcome,
        "data": row.data,
        "prev_hash": row.prev_hash,
    }
    return canonical_json(body)


def row_hash(row: ChainRow) -> str:
    return hashlib.sha256(canonical(row)).hexdigest()


def redact_secret_keys(value: Any) -> Any:
    """Replace values under secret-looking keys, at any depth (a net under the callers' own care)."""
    if isinstance(value, dict):
        return {k: REDACTED if _secret_key(k) else redact_secret_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_secret_keys(v) for v in value]
    return value


def as_jsonb(value: Any) -> Any:
    """``value`` as it reads back from a JSONB column: JSONB keeps numbers as ``numeric``, which has no
    exponent notation and no negative zero (``1e+20`` comes back as ``100000000000000000000``)."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)  # not JSON at all; JSONB would refuse it
        if value == 0:
            return 0.0
        text = repr(value)
        return int(Decimal(text)) if "e+" in text else value
    if isinstance(value, dict):
        return {k: as_jsonb(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_jsonb(v) for v in value]
    return value


def _secret_key(key: Any) -> bool:
    lowered = str(key).lower().replace("-", "_")
    # "max_tokens" and friends are counts, "api_key_secret" the *name* of a secret: not credentials.
    if "tokens" in lowered or lowered.endswith(("_secret_name", "api_key_secret")):
        return False
    return any(marker in lowered for marker in _SECRET_KEYS)


# Locks the head (creating it on a tenant's first event): concurrent appenders wait here.
_LOCK_HEAD = """
INSERT INTO audit_head (tenant_id, seq, hash) VALUES ($1, 0, $2)
ON CONFLICT (tenant_id) DO UPDATE SET seq = audit_head.seq
RETURNING seq, hash
"""

_INSERT_ROWS = """
INSERT INTO audit_event (tenant_id, seq, at, actor, ip, user_agent, action, target, outcome, data, prev_hash, hash)
SELECT $1, x.seq, x.at, x.actor, x.ip, x.user_agent, x.action, x.target, x.outcome, x.data, x.prev_hash, x.hash
FROM jsonb_to_recordset($2::jsonb) AS x(seq bigint, at timestamptz, actor text, ip text, user_agent text,
                                        action text, target text, outcome text, data jsonb, prev_hash text, hash text)
"""

# After _LOCK_HEAD: append and move the head.
_APPEND = f"""
WITH rows AS ({_INSERT_ROWS})
UPDATE audit_head SET seq = $3, hash = $4 WHERE tenant_id = $1
"""

# One round trip when this process guessed the head right: the head moves to the new rows and they
# are inserted. Guessed wrong (another writer came first; the UPDATE waits for its commit): the head is
# left as it is, but locked, and returned, so the rows are chained after it by one more statement.
_APPEND_IF_HEAD = f"""
WITH head AS (
    UPDATE audit_head SET seq = CASE WHEN seq = $5 AND hash = $6 THEN $3 ELSE seq END,
                          hash = CASE WHEN seq = $5 AND hash = $6 THEN $4 ELSE hash END
    WHERE tenant_id = $1 RETURNING seq, hash
), rows AS ({_INSERT_ROWS.rstrip()} WHERE EXISTS (SELECT FROM head WHERE seq = $3 AND hash = $4))
SELECT seq, hash FROM head
"""

# The head each tenant's chain had when this process last wrote it (a guess: checked by _APPEND_IF_HEAD).
_heads: dict[uuid.UUID, tuple[int, str]] = {}
_MAX_HEADS = 10_000


async def append(conn: Conn, tenant_id: uuid.UUID, entries: Sequence[Entry]) -> None:
    """Chain ``entries`` onto the tenant's log, in order, inside the caller's transaction."""
    if not entries:
        return
    known = _heads.get(tenant_id)
    head = None
    if known is not None:
        rows, seq, digest = _chain(tenant_id, entries, *known)
        head = await conn.fetchrow(_APPEND_IF_HEAD, tenant_id, dumps(rows), seq, digest, *known)
        if head is not None and (head["seq"], head["hash"]) == (seq, digest):
            _remember(tenant_id, seq, digest)
            return
    if head is None:  # no guess, or the tenant has no chain yet
        head = await conn.fetchrow(_LOCK_HEAD, tenant_id, GENESIS)
        assert head is not None
    rows, seq, digest = _chain(tenant_id, entries, int(head["seq"]), str(head["hash"]))
    await conn.execute(_APPEND, tenant_id, dumps(rows), seq, digest)
    _remember(tenant_id, seq, digest)


def _remember(tenant_id: uuid.UUID, seq: int, digest: str) -> None:
    # Remembered before commit: a rollback leaves the guess ahead of the table, which the next append
    # finds out (and corrects) with one wasted statement.
    if len(_heads) >= _MAX_HEADS:
        _heads.clear()
    _heads[tenant_id] = (seq, digest)


def _chain(
    tenant_id: uuid.UUID, entries: Sequence[Entry], seq: int, prev: str
) -> tuple[list[dict[str, Any]], int, str]:
    """The rows of ``entries`` chained after (``seq``, ``prev``), and the new head."""
    rows = []
    for entry in entries:
        seq += 1
        # The stored JSONB must read back as what was hashed: round-trip the data through JSON, then
        # write numbers as PostgreSQL will give them back.
        data = as_jsonb(json.loads(dumps(redact_secret_keys(entry.data))))
        row = ChainRow(tenant_id, seq, entry.at, entry.actor, entry.ip, entry.user_agent, entry.action,
                       entry.target, entry.outcome, data, prev)
        prev = row_hash(row)
        rows.append({"seq": seq, "at": format_at(entry.at), "actor": entry.actor, "ip": entry.ip,
                     "user_agent": entry.user_agent, "action": entry.action, "target": entry.target,
                     "outcome": entry.outcome, "data": data, "prev_hash": row.prev_hash, "hash": prev})
    return rows, seq, prev
