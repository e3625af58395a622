"""The ``Retry-After`` hint of a refused HTTP call, as seconds to wait: one parser for model servers and tools.

RFC 9110 section 10.2.3 allows a delay in seconds (``delta-seconds``) or an HTTP-date (IMF-fixdate, and the
obsolete RFC 850 and asctime forms recipients must still accept). A hint that is neither (a negative or
signed number, NaN, infinity, exponent notation, a number too large for a float, words) is no hint: the
caller falls back to its own backoff. A valid hint is capped, so a server cannot park a call for a year.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

# Longer than any caller waits anyway (the engine caps at retry_backoff_max_s, agents at seconds).
MAX_RETRY_AFTER_S = 3600.0
# delta-seconds is 1*DIGIT; a fraction is accepted too, as some servers (and retry-after-ms) send one.
_DELAY = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def retry_after_seconds(value: str | None, *, milliseconds: bool = False) -> float | None:
    """Seconds from now that ``value`` asks to wait, within ``[0, MAX_RETRY_AFTER_S]``; None for no valid hint.

    ``milliseconds`` reads a delay in milliseconds (``retry-after-ms``), which has no date form. A date in
    the past means "now" (0).
    """
    if value is None:
        return None
    text = value.strip()
    if _DELAY.fullmatch(text):
        seconds = float(text) / (1000 if milliseconds else 1)
        return min(seconds, MAX_RETRY_AFTER_S) if math.isfinite(seconds) else None
    if milliseconds or not text:
        return None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # asctime and "-0000" carry no zone: HTTP-dates are GMT
        when = when.replace(tzinfo=UTC)
    return min(max(0.0, (when - datetime.now(UTC)).total_seconds()), MAX_RETRY_AFTER_S)
