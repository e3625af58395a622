"""Audit retention: delete each tenant's events older than ``audit_retention_days``.

Retention cuts the oldest part of each chain and nothing else, so what is kept still verifies: the first
row kept becomes the chain's anchor (``anchored_at_seq`` in app/audit/verify.py). Rows go in ``seq``
order, and a row is deleted only when every row before it is older than the cutoff as well (``at`` can
run a few microseconds out of ``seq`` order under concurrent appends), so no gap ever opens inside the
chain. The chain's last row is never deleted: an emptied chain would look exactly like a deleted one.
Only sealed rows are deleted (the trigger refuses the others). Each tenant whose rows were deleted gets an
``audit.retention`` event in its own chain, naming the last seq deleted, sealed at once, so the anchor is
explained by a sealed row.

Deletes run as the tables' owner in transactions of at most :data:`BATCH` rows, each one setting
``steward.audit_retention`` so the append-only trigger lets them through.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING

from app.audit.chain import Entry, append, format_at, seal_backlog
from app.pg import Conn

if TYPE_CHECKING:
    from app.runtime import Runtime

log = logging.getLogger(__name__)

BATCH = 10_000
# The reconciler applies retention at most this often, across all worker processes.
INTERVAL_S = 3600
# Rows one reconciler pass deletes at most; a longer backlog carries on at the next pass (seconds later).
PASS_MAX_ROWS = 100_000
ACTOR = "system"

_CUTOFF = "SELECT now() - make_interval(days => $1)"
# Tenants with an expired row before their chain's last one (the (tenant_id, at) index answers this).
_TENANTS = """
SELECT h.tenant_id FROM audit_head h
WHERE EXISTS (SELECT 1 FROM audit_event e WHERE e.tenant_id = h.tenant_id AND e.at < $1 AND e.seq < h.seq)
ORDER BY h.tenant_id
"""
# The oldest $3 rows; of those, the ones before the first young row and before the head row.
_DELETE = """
WITH batch AS MATERIALIZED (
    SELECT seq, at FROM audit_event WHERE tenant_id = $1 AND seq IS NOT NULL ORDER BY seq LIMIT $3
), keep AS (
    SELECT least(min(seq) FILTER (WHERE at >= $2), (SELECT seq FROM audit_head WHERE tenant_id = $1)) AS seq
    FROM batch
), deleted AS (
    DELETE FROM audit_event e USING batch b, keep k
    WHERE e.tenant_id = $1 AND e.seq = b.seq AND b.seq < k.seq
    RETURNING e.seq
)
SELECT count(*) AS n, max(seq) AS through FROM deleted
"""


async def apply_retention(conn: Conn, days: int, *, max_rows: int | None = None) -> int:
    """Delete every tenant's events older than ``days`` (a prefix of each chain); the rows deleted.

    ``conn``: an owner connection outside any transaction. Stops after about ``max_rows`` when given.
    """
    cutoff = await conn.fetchval(_CUTOFF, days)
    total = 0
    for record in await conn.fetch(_TENANTS, cutoff):
        if max_rows is not None and total >= max_rows:
            break
        tenant_id: uuid.UUID = record["tenant_id"]
        deleted, through = 0, 0
        while max_rows is None or total < max_rows:
            size = BATCH if max_rows is None else min(BATCH, max_rows - total)
            async with conn.transaction():
                await conn.execute("SET LOCAL steward.audit_retention = 'on'")
                row = await conn.fetchrow(_DELETE, tenant_id, cutoff, size)
            n = int(row["n"])
            total += n
            deleted += n
            through = max(through, int(row["through"] or 0))
            if n < size:
                break
        if deleted:
            async with conn.transaction():
                await append(conn, tenant_id, [Entry(ACTOR, "audit.retention", None, data={
                    "deleted": deleted, "through_seq": through, "older_than": format_at(cutoff), "days": days,
                })])
            await seal_backlog(conn, tenant_id)  # unless a sealer is at it already
            log.info("audit retention: tenant %s: deleted %d events up to seq %d", tenant_id, deleted, through)
    return total


async def retention_pass(runtime: Runtime) -> int | None:
    """The reconciler's hook: apply retention when ``audit_retention_days`` is set and the last run (by any
    worker) is an hour old; the rows deleted, or None when it did not run."""
    days = runtime.settings.audit_retention_days
    if days is None:
        return None
    key = f"{runtime.settings.queue_prefix}:audit-retention"
    if not await runtime.redis.set(key, "1", nx=True, ex=INTERVAL_S):
        return None
    async with runtime.pg.acquire() as conn:
        deleted = await apply_retention(conn, days, max_rows=PASS_MAX_ROWS)
    if deleted >= PASS_MAX_ROWS:
        # More may be left: carry on at the next pass instead of holding up the reconciler's other work.
        await runtime.redis.delete(key)
    return deleted
