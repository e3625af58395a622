"""The audit log's hash chain: one chain per tenant, each row sealing the one before it.

A row's hash is SHA-256 over its canonical serialization: the JSON object of its fields below, keys
sorted, no whitespace, UTF-8, ``at`` as ``YYYY-MM-DDTHH:MM:SS.ffffffZ``. ``prev_hash`` is the hash of
the tenant's previous row (``seq - 1``), or 64 zeros for the first. Anyone holding an export can
re-compute it (docs/security.md spells the format out).

Writing and sealing are apart, so that a busy tenant's actions do not queue on its chain:

- :func:`append` inserts the rows *unsealed* (``seq``, ``prev_hash``, ``hash`` NULL) in the transaction of
  the action they record: a rolled back action leaves no row, a committed one always has its row. It
  takes no lock beyond its own rows', and notifies :data:`CHANNEL` (delivered at commit) as a wake-up.
- :func:`seal_tenant` chains a tenant's committed unsealed rows, in ``id`` order, after its
  ``audit_head``, in a short transaction of its own holding that head's row lock: sealers of one tenant
  never run at once (a second one skips the tenant), so the chain cannot fork, and it has no gaps since
  only committed rows are ever sealed. The workers' sealer (app/audit/sealer.py) calls it.

The append-only trigger refuses every UPDATE of ``audit_event`` but the sealing one (NULL to values of
those three columns, nothing else changed), and every DELETE but retention's of sealed rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from app.canonical import canonical_json
from app.clock import now
from app.outage import is_database_outage
from app.pg import Conn, dumps

log = logging.getLogger(__name__)


GENESIS = "0" * 64
FORMAT_VERSION = 1
# Notified by every transaction that appended audit rows: the sealers' wake-up (a hint; they also poll).
CHANNEL = "steward_audit_unsealed"
# Rows one sealing transaction chains at most (the head's lock is held for that long).
SEAL_BATCH = 1000

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


_INSERT = f"""
WITH rows AS (
    INSERT INTO audit_event (tenant_id, at, actor, ip, user_agent, action, target, outcome, data)
    SELECT $1, x.at, x.actor, x.ip, x.user_agent, x.action, x.target, x.outcome, x.data
    FROM jsonb_to_recordset($2::jsonb) AS x(at timestamptz, actor text, ip text, user_agent text, action text,
                                            target text, outcome text, data jsonb)
)
SELECT pg_notify('{CHANNEL}', '')
"""


async def append(conn: Conn, tenant_id: uuid.UUID, entries: Sequence[Entry]) -> None:
    """Insert ``entries``, in order and unsealed, inside the caller's transaction (a sealer chains them
    once it has committed)."""
    if not entries:
        return
    rows = [{"at": format_at(e.at), "actor": e.actor, "ip": e.ip, "user_agent": e.user_agent, "action": e.action,
             "target": e.target, "outcome": e.outcome,
             # Numbers as PostgreSQL will give them back, and nothing JSONB would refuse.
             "data": as_jsonb(json.loads(dumps(redact_secret_keys(e.data))))} for e in entries]
    await conn.execute(_INSERT, tenant_id, dumps(rows))


# --- sealing ----------------------------------------------------------------------------------------------

# The head, locked; no row when another sealer holds it (or the tenant has no head yet).
_LOCK_HEAD = "SELECT seq, hash FROM audit_head WHERE tenant_id = $1 FOR UPDATE SKIP LOCKED"
# A tenant's first head: created and held by this transaction (nothing when another one has it).
_NEW_HEAD = """
INSERT INTO audit_head (tenant_id, seq, hash) VALUES ($1, 0, $2) ON CONFLICT (tenant_id) DO NOTHING
RETURNING seq, hash
"""
_UNSEALED = """
SELECT id, at, actor, ip, user_agent, action, target, outcome, data FROM audit_event
WHERE tenant_id = $1 AND seq IS NULL ORDER BY id LIMIT $2
"""
_SEAL = """
WITH sealed AS (
    UPDATE audit_event e SET seq = x.seq, prev_hash = x.prev_hash, hash = x.hash
    FROM jsonb_to_recordset($2::jsonb) AS x(id bigint, seq bigint, prev_hash text, hash text)
    WHERE e.id = x.id AND e.tenant_id = $1 AND e.seq IS NULL
    RETURNING e.id
)
UPDATE audit_head SET seq = $3, hash = $4 WHERE tenant_id = $1 RETURNING (SELECT count(*) FROM sealed)
"""
TENANTS_UNSEALED = "SELECT DISTINCT tenant_id FROM audit_event WHERE seq IS NULL"


class SealConflict(Exception):
    """Rows to seal were sealed meanwhile by someone not holding the head (the transaction rolls back)."""


async def seal_tenant(conn: Conn, tenant_id: uuid.UUID, *, limit: int = SEAL_BATCH) -> int | None:
    """Chain up to ``limit`` of the tenant's committed unsealed rows (``id`` order) after its head, in a
    transaction of its own; the rows sealed, or None when another sealer holds the tenant's head."""
    async with conn.transaction():
        head = await conn.fetchrow(_LOCK_HEAD, tenant_id)
        if head is None:
            head = await conn.fetchrow(_NEW_HEAD, tenant_id, GENESIS)
            if head is None:
                return None
        records = await conn.fetch(_UNSEALED, tenant_id, limit)
        if not records:
            return 0
        seq, prev = int(head["seq"]), str(head["hash"])
        sealed = []
        for r in records:
            seq += 1
            digest = row_hash(ChainRow(tenant_id, seq, r["at"], r["actor"], r["ip"], r["user_agent"], r["action"],
                                       r["target"], r["outcome"], r["data"], prev))
            sealed.append({"id": r["id"], "seq": seq, "prev_hash": prev, "hash": digest})
            prev = digest
        count = await conn.fetchval(_SEAL, tenant_id, dumps(sealed), seq, prev)
        if count != len(sealed):
            raise SealConflict(f"tenant {tenant_id}: {len(sealed) - (count or 0)} of {len(sealed)} rows were "
                               "sealed by someone not holding the head")
    return len(sealed)


async def seal_backlog(conn: Conn, tenant_id: uuid.UUID) -> int:
    """Seal the tenant's committed unsealed rows, batch after batch, unless another sealer holds its head;
    the rows sealed."""
    total = 0
    while n := await seal_tenant(conn, tenant_id):
        total += n
        if n < SEAL_BATCH:
            break
    return total


async def seal_pending(conn: Conn) -> int:
    """Seal every tenant's committed unsealed rows (``conn``: an owner connection outside any transaction);
    the rows sealed. Tenants another sealer holds are left to it; a tenant whose rows cannot be sealed
    (its chain tampered with) is logged and left for the next pass, the others are sealed all the same."""
    total = 0
    for record in await conn.fetch(TENANTS_UNSEALED):
        tenant_id = record["tenant_id"]
        try:
            total += await seal_backlog(conn, tenant_id)
        except Exception as exc:
            if is_database_outage(exc):
                raise
            log.exception("audit sealer: could not seal the rows of tenant %s", tenant_id)
    return total
