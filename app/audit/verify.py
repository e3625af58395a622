"""Verifying a tenant's audit chain: every hash recomputed, every link, the sequence and the head checked.

Rows are streamed in ``seq`` order through a server-side cursor inside one REPEATABLE READ transaction,
so the rows and the head come from the same snapshot (appends running meanwhile are simply not seen) and
memory stays constant however long the chain is.

The first row kept may start after seq 1 with a ``prev_hash`` that is not the genesis hash only because
retention deleted the rows before it (app/audit/retention.py); it is accepted as the chain's anchor and
reported as ``anchored_at_seq``. Everything after it must link up to the head.

Rows not sealed yet (written by committed actions, not chained by a sealer yet: app/audit/chain.py) have
nothing to check; they are counted, with the time of the oldest, from the same snapshot.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from app.audit.chain import GENESIS, ChainRow, format_at, row_hash
from app.pg import Conn

BATCH = 500

Reason = Literal["hash_mismatch", "prev_hash_mismatch", "missing_rows", "head_mismatch"]

_HEAD = "SELECT seq, hash FROM audit_head WHERE tenant_id = $1"
_ROWS = (
    "SELECT id, seq, at, actor, ip, user_agent, action, target, outcome, data, prev_hash, hash "
    "FROM audit_event WHERE tenant_id = $1 AND seq IS NOT NULL ORDER BY seq"
)
# The unsealed rows: how many, and the oldest one's time and age (the partial index answers this).
UNSEALED = """
SELECT count(*) AS n, min(at) AS oldest_at, extract(epoch FROM clock_timestamp() - min(at))::float8 AS oldest_age_s
FROM audit_event WHERE tenant_id = $1 AND seq IS NULL
"""


@dataclass(frozen=True)
class Broken:
    """The first broken link: where (``seq``; ``id`` of the row, None when the row is missing) and why."""

    seq: int
    id: str | None
    reason: Reason
    detail: str


@dataclass(frozen=True)
class Head:
    seq: int
    hash: str


@dataclass(frozen=True)
class Unsealed:
    """Rows committed but not chained yet: how many, and the oldest one's ``at`` and age then."""

    rows: int = 0
    oldest_at: datetime | None = None
    oldest_age_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "oldest_at": None if self.oldest_at is None else format_at(self.oldest_at),
                "oldest_age_s": self.oldest_age_s}


async def unsealed(conn: Conn, tenant_id: uuid.UUID) -> Unsealed:
    row = await conn.fetchrow(UNSEALED, tenant_id)
    assert row is not None
    return Unsealed(int(row["n"]), row["oldest_at"], row["oldest_age_s"])


@dataclass(frozen=True)
class Verification:
    """What :func:`verify_chain` found. ``rows``, ``last_seq``: sealed rows read (all of them unless broken);
    ``unsealed``: the rows not sealed yet."""

    rows: int
    first_seq: int | None
    last_seq: int | None
    anchored_at_seq: int | None
    head: Head | None
    broken: Broken | None
    unsealed: Unsealed = Unsealed()

    @property
    def ok(self) -> bool:
        return self.broken is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "rows": self.rows,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "anchored_at_seq": self.anchored_at_seq,
            "head": None if self.head is None else {"seq": self.head.seq, "hash": self.head.hash},
            "broken": None if self.broken is None else {
                "seq": self.broken.seq, "id": self.broken.id, "reason": self.broken.reason,
                "detail": self.broken.detail,
            },
            "unsealed": self.unsealed.as_dict(),
        }


class ChainWalk:
    """Checks rows fed in ``seq`` order (DB records or parsed export lines with ``at`` as a datetime)."""

    def __init__(self, tenant_id: uuid.UUID, head: Head | None) -> None:
        self.tenant_id = tenant_id
        self.head = head
        self.rows = 0
        self.first_seq: int | None = None
        self.anchored_at_seq: int | None = None
        self._last_seq: int | None = None
        self._last_id: str | None = None
        self._last_hash = GENESIS
        # The first row past the head's seq, if any: such rows are not sealed by the head.
        self._past_head: tuple[int, str] | None = None

    @property
    def last_seq(self) -> int | None:
        return self._last_seq

    def add(self, row: Mapping[str, Any]) -> Broken | None:
        """Check one row against the previous one; the first broken link found, or None."""
        seq, row_id = int(row["seq"]), str(row["id"])
        self.rows += 1
        broken = self._link(seq, row_id, str(row["prev_hash"]))
        if broken is None:
            computed = row_hash(ChainRow(
                tenant_id=self.tenant_id, seq=seq, at=row["at"], actor=row["actor"], ip=row["ip"],
                user_agent=row["user_agent"], action=row["action"], target=row["target"],
                outcome=row["outcome"], data=row["data"], prev_hash=row["prev_hash"],
            ))
            if computed != row["hash"]:
                broken = Broken(seq, row_id, "hash_mismatch",
                                f"row {seq} (id {row_id}) was altered: its content hashes to {computed}, "
                                f"not to its stored hash {row['hash']}")
        if self.head is not None and seq > self.head.seq and self._past_head is None:
            self._past_head = (seq, row_id)
        self._last_seq, self._last_id, self._last_hash = seq, row_id, str(row["hash"])
        return broken

    def _link(self, seq: int, row_id: str, prev_hash: str) -> Broken | None:
        if self._last_seq is None:
            self.first_seq = seq
            if seq > 1:
                # Retention deleted what came before: this row's prev_hash cannot be checked here.
                self.anchored_at_seq = seq
                return None
            if prev_hash != GENESIS:
                return Broken(seq, row_id, "prev_hash_mismatch",
                              f"row {seq} (id {row_id}) opens the chain but its prev_hash is not the genesis hash")
            return None
        if seq != self._last_seq + 1:
            first = self._last_seq + 1
            span = f"row {first} is" if first == seq - 1 else f"rows {first}..{seq - 1} are"
            return Broken(first, None, "missing_rows",
                          f"{span} missing: row {self._last_seq} is followed by row {seq} (id {row_id})")
        if prev_hash != self._last_hash:
            return Broken(seq, row_id, "prev_hash_mismatch",
                          f"row {seq} (id {row_id}) does not link to row {self._last_seq}: its prev_hash is "
                          f"{prev_hash}, row {self._last_seq} hashes to {self._last_hash}")
        return None

    def finish(self) -> Broken | None:
        """Check the end of the chain against the head (rows deleted at the end show up only here)."""
        head, last = self.head, self._last_seq
        if last is None:
            if head is None or head.seq == 0:
                return None
            return Broken(head.seq, None, "head_mismatch",
                          f"the chain has no rows but its head is at row {head.seq}")
        if head is None:
            return Broken(last, self._last_id, "head_mismatch", f"the chain has rows up to {last} but no head")
        if last < head.seq:
            span = f"row {head.seq} is" if last + 1 == head.seq else f"rows {last + 1}..{head.seq} are"
            return Broken(last + 1, None, "head_mismatch",
                          f"{span} missing: the head is at row {head.seq}, the last row is {last}")
        if self._past_head is not None:
            seq, row_id = self._past_head
            return Broken(seq, row_id, "head_mismatch",
                          f"rows {seq}..{last} come after the head (row {head.seq}): they are not sealed by it")
        if head.hash != self._last_hash:
            return Broken(last, self._last_id, "head_mismatch",
                          f"the head records hash {head.hash} for row {last}, the row has {self._last_hash}")
        return None

    def result(self, broken: Broken | None, pending: Unsealed | None = None) -> Verification:
        return Verification(self.rows, self.first_seq, self._last_seq, self.anchored_at_seq, self.head, broken,
                            pending or Unsealed())


async def verify_chain(conn: Conn, tenant_id: uuid.UUID) -> Verification:
    """Recompute and check the tenant's whole chain; report the first broken link.

    ``conn`` must not be in a transaction: the check runs in a REPEATABLE READ one of its own so the head
    and the rows are read from one snapshot. It filters on ``tenant_id`` itself, so an owner connection
    (no row-level security) and one bound to the tenant both work.
    """
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        row = await conn.fetchrow(_HEAD, tenant_id)
        walk = ChainWalk(tenant_id, None if row is None else Head(int(row["seq"]), str(row["hash"])))
        pending = await unsealed(conn, tenant_id)
        cursor = await conn.cursor(_ROWS, tenant_id)
        while batch := await cursor.fetch(BATCH):
            for record in batch:
                broken = walk.add(record)
                if broken is not None:
                    return walk.result(broken, pending)
    return walk.result(walk.finish(), pending)
