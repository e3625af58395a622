"""Canonical JSON: one encoding wherever a value is hashed or compared by its bytes.

Keys sorted, no whitespace, non-ASCII kept as UTF-8 (the audit chain's row format: changing it would
break every stored chain). Values JSON cannot encode are an error, not silently stringified, so two
different values never share a hash; callers that hash loosely typed data pass ``default=str``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any


def canonical_json(value: Any, *, default: Callable[[Any], Any] | None = None) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=default).encode()


def digest(value: Any, *, default: Callable[[Any], Any] | None = None) -> str:
    """The SHA-256 (hex) of ``value``'s canonical JSON."""
    return hashlib.sha256(canonical_json(value, default=default)).hexdigest()
