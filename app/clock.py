"""The one clock: timezone-aware UTC ``datetime`` values, as Postgres ``timestamptz`` stores them."""

from __future__ import annotations

from datetime import UTC, datetime


def now() -> datetime:
    """The current time in UTC (microsecond precision: what Postgres keeps, so a row read back hashes
    and compares as it was written)."""
    return datetime.now(UTC)
