"""Tests about per-hour budget windows must not straddle the top of an hour."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime


async def clear_of_the_hour_boundary(*, margin_s: float) -> None:
    """Return at once, or (less than ``margin_s`` before the top of the hour) once the new hour has begun."""
    now = datetime.now(UTC)
    left = 3600 - (now.minute * 60 + now.second + now.microsecond / 1e6)
    if left < margin_s:
        await asyncio.sleep(left + 0.5)  # waiting for the condition itself: the clock's next hour
