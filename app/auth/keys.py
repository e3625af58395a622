"""API keys: ``stw_`` + 40 url-safe characters; only a SHA-256 digest is stored."""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "stw_"


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(30)


def hash_api_key(key: str) -> str:
    # Keys carry 240 random bits, so a fast unsalted digest is enough: nothing to brute-force.
    return hashlib.sha256(key.encode()).hexdigest()
