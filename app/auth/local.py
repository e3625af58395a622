"""The local admin: the one user who signs in without an identity provider (``make run``).

``steward bootstrap`` creates it (issuer ``local``, subject ``admin``) with an admin membership in the
bootstrapped tenant and prints its random password once; only an scrypt hash is stored. It can sign in
only while no identity provider is configured, and only from this machine (app/auth/web.py).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import uuid

from app.auth.users import LOCAL_ISSUER
from app.pg import Conn

LOCAL_ADMIN = "admin"
# scrypt cost: 2**15 x 8 x 1 takes about 0.1 s and 32 MiB per guess (OWASP's minimum is 2**17 x 8 x 1 / 5).
_N, _R, _P = 2**15, 8, 1
_MAXMEM = 64 * 1024 * 1024
_SALT_BYTES = 16
_KEY_BYTES = 32

_UPSERT_ADMIN = """
INSERT INTO app_user (id, issuer, subject, name) VALUES ($1, $2, $3, 'Local admin')
ON CONFLICT (issuer, subject) DO UPDATE SET subject = EXCLUDED.subject
RETURNING id, password_hash
"""
_SET_PASSWORD = "UPDATE app_user SET password_hash = $2 WHERE id = $1 AND password_hash IS NULL RETURNING id"
_GRANT_ADMIN = """
INSERT INTO membership (tenant_id, user_id, roles, created_by) VALUES ($1, $2, ARRAY['admin'], 'system')
ON CONFLICT (tenant_id, user_id) DO UPDATE SET
    roles = CASE WHEN 'admin' = ANY (membership.roles) THEN membership.roles
                 ELSE array_append(membership.roles, 'admin') END,
    updated_at = now()
"""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str) -> str:
    """``scrypt$N$r$p$<salt>$<key>`` with a random salt."""
    salt = secrets.token_bytes(_SALT_BYTES)
    key = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, maxmem=_MAXMEM, dklen=_KEY_BYTES)
    return f"scrypt${_N}${_R}${_P}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, stored: str | None) -> bool:
    """``password`` matches ``stored``; costs one scrypt even when nothing is stored (no timing hint)."""
    try:
        scheme, n, r, p, salt, key = (stored or "").split("$")
        params = (int(n), int(r), int(p), _unb64(salt), _unb64(key))
    except ValueError:
        scheme, params = "", (_N, _R, _P, b"\0" * _SALT_BYTES, b"")
    n_, r_, p_, salt_, expected = params
    actual = hashlib.scrypt(password.encode(), salt=salt_, n=n_, r=r_, p=p_, maxmem=_MAXMEM, dklen=_KEY_BYTES)
    return scheme == "scrypt" and bool(expected) and hmac.compare_digest(actual, expected)


async def verify_password_async(password: str, stored: str | None) -> bool:
    """:func:`verify_password` off the event loop (scrypt is deliberately slow)."""
    return await asyncio.to_thread(verify_password, password, stored)


async def ensure_local_admin(conn: Conn, tenant_id: uuid.UUID) -> str | None:
    """Make sure the local admin exists and is an admin of ``tenant_id``; return its new password when
    this call set one (print it once), None when it already had one.

    ``conn``: an asyncpg connection of the tables' owner (no row-level security), e.g. the CLI's.
    """
    async with conn.transaction():
        user = await conn.fetchrow(_UPSERT_ADMIN, uuid.uuid4(), LOCAL_ISSUER, LOCAL_ADMIN)
        assert user is not None
        password = None
        if user["password_hash"] is None:
            candidate = secrets.token_urlsafe(18)
            hashed = await asyncio.to_thread(hash_password, candidate)
            if await conn.fetchval(_SET_PASSWORD, user["id"], hashed) is not None:
                password = candidate
        await conn.execute(_GRANT_ADMIN, tenant_id, user["id"])
    return password
