"""Dashboard sessions: a signed cookie naming a server-side ``web_session`` row.

The cookie carries a random 256-bit token and an HMAC of it (keyed from the first of the secret keys,
``STEWARD_SECRET_KEYS``; older keys still verify); the row is keyed by the token's SHA-256, so neither a
leaked table nor a forged cookie yields a live session. Cookie flags: HttpOnly, SameSite=Lax, Path=/,
Secure unless Steward is reached on a loopback address over plain HTTP.

A session ends ``session_idle_s`` after its last request, ``session_absolute_s`` after sign-in, or at
sign-out. Its active tenant is switched by the user; their roles there are worked out on every request
(membership ∪ roles mapped from the groups kept from sign-in), so revoking a membership takes effect at
once.

Requests authenticated by the cookie that change state (anything but GET, HEAD, OPTIONS) must carry the
session's CSRF token: header ``X-CSRF-Token`` or form field ``csrf_token``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import math
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import asyncpg
from fastapi import FastAPI, Request
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import Response

from app.auth.deps import client_ip, user_agent
from app.auth.users import User, tenant_access
from app.config import Settings
from app.context import Ctx
from app.db import bind_tenant
from app.errors import Forbidden, Invalid
from app.pg import Conn, dumps
from app.vault.crypto import load_keys

log = logging.getLogger(__name__)

COOKIE = "steward_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})
# last_seen_at is written at most this often per session (and at most every tenth of the idle timeout).
TOUCH_INTERVAL_S = 60.0
_SIGNATURE_LABEL = b"steward/session-cookie/v1"
# Forms are small, but the runs list's bulk form names up to 500 runs (app/runs/service.py BULK_MAX).
_MAX_FORM_FIELDS = 1000

_COLUMNS = "id_hash, user_id, tenant_id, csrf_token, claims, id_token, created_at, last_seen_at, expires_at"
_GET = f"SELECT {_COLUMNS} FROM web_session WHERE id_hash = $1"
_INSERT = f"""
INSERT INTO web_session (id_hash, user_id, tenant_id, csrf_token, claims, id_token, ip, user_agent,
                         created_at, last_seen_at, expires_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10)
RETURNING {_COLUMNS}
"""
_TOUCH = "UPDATE web_session SET last_seen_at = $2 WHERE id_hash = $1"
_DELETE = "DELETE FROM web_session WHERE id_hash = $1"
_SET_TENANT = "UPDATE web_session SET tenant_id = $2 WHERE id_hash = $1"
_PURGE = "DELETE FROM web_session WHERE expires_at < $1 OR last_seen_at < $2"


@dataclass(frozen=True)
class WebSession:
    id_hash: str
    user_id: uuid.UUID
    tenant_id: uuid.UUID | None
    csrf_token: str
    claims: dict[str, Any] = field(repr=False)
    id_token: str | None = field(repr=False)
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime

    @property
    def groups(self) -> list[str]:
        groups = self.claims.get("groups") or []
        return [group for group in groups if isinstance(group, str)]

    @property
    def principal(self) -> str:
        return f"user:{self.user_id}"

    def idle_expires_at(self, settings: Settings) -> datetime:
        return min(self.last_seen_at + timedelta(seconds=settings.session_idle_s), self.expires_at)


def _session(row: asyncpg.Record) -> WebSession:
    return WebSession(**{key: row[key] for key in row.keys()})


# --- where the request comes from -------------------------------------------------------------------


def is_loopback_host(host: str | None) -> bool:
    """``host`` (a name or an address, without port) is this machine."""
    if not host:
        return False
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_request(request: Request) -> bool:
    """Both the peer address and the Host header are loopback (a local proxy forwarding public traffic
    connects from loopback but keeps the public Host)."""
    peer = request.client.host if request.client else None
    host = urlsplit("//" + request.headers.get("host", "")).hostname
    return is_loopback_host(peer) and is_loopback_host(host)


def external_url(request: Request, path: str) -> str:
    """``path`` under ``public_url`` when set, else under the address the request came to."""
    settings: Settings = request.app.state.settings
    base = settings.public_url or str(request.base_url)
    return base.rstrip("/") + path


def cookie_secure(request: Request) -> bool:
    """Cookies get the Secure flag unless Steward is reached over plain HTTP on a loopback address."""
    url = urlsplit(external_url(request, "/"))
    return url.scheme == "https" or not is_loopback_host(url.hostname)


# --- the cookie -------------------------------------------------------------------------------------


def _signing_keys(app: FastAPI) -> list[bytes]:
    keys: list[bytes] | None = getattr(app.state, "session_signing_keys", None)
    if keys is None:
        settings: Settings = app.state.settings
        keys = [
            hmac.new(base64.urlsafe_b64decode(key + "=" * (-len(key) % 4)), _SIGNATURE_LABEL, hashlib.sha256).digest()
            for key in load_keys(settings.secret_keys, settings.data_dir)
        ]
        app.state.session_signing_keys = keys
    return keys


def _mac(key: bytes, token: str) -> str:
    return base64.urlsafe_b64encode(hmac.new(key, token.encode(), hashlib.sha256).digest()).rstrip(b"=").decode()


def sign(app: FastAPI, token: str) -> str:
    return f"{token}.{_mac(_signing_keys(app)[0], token)}"


def unsign(app: FastAPI, value: str) -> str | None:
    """The token in a signed cookie value, or None when the signature does not verify."""
    token, _, mac = value.partition(".")
    if not token or not mac or len(value) > 256:
        return None
    if any(hmac.compare_digest(mac, _mac(key, token)) for key in _signing_keys(app)):
        return token
    return None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def set_session_cookie(response: Response, request: Request, value: str) -> None:
    settings: Settings = request.app.state.settings
    response.set_cookie(COOKIE, value, max_age=math.ceil(settings.session_absolute_s), path="/", httponly=True,
                        samesite="lax", secure=cookie_secure(request))


def clear_session_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="lax", secure=cookie_secure(request))


# --- sessions ---------------------------------------------------------------------------------------


async def create_session(conn: Conn, request: Request, *, user: User, tenant_id: uuid.UUID,
                         claims: dict[str, Any], id_token: str | None) -> tuple[str, WebSession]:
    """Insert a new session (a fresh token: no fixation) and return the cookie value and the row."""
    settings: Settings = request.app.state.settings
    now = datetime.now(UTC)
    await conn.execute(_PURGE, now, now - timedelta(seconds=settings.session_idle_s))
    token = secrets.token_urlsafe(32)
    row = await conn.fetchrow(
        _INSERT, hash_token(token), user.id, tenant_id, secrets.token_urlsafe(32), dumps(claims), id_token,
        client_ip(request), user_agent(request), now, now + timedelta(seconds=settings.session_absolute_s),
    )
    assert row is not None
    return sign(request.app, token), _session(row)


async def current_session(request: Request) -> WebSession | None:
    """The live session named by the request's cookie (once per request), or None.

    A session past its idle or absolute timeout is deleted here; a live one has ``last_seen_at`` moved on.
    """
    if hasattr(request.state, "web_session"):
        cached: WebSession | None = request.state.web_session
        return cached
    session = await _load_session(request)
    request.state.web_session = session
    return session


async def _load_session(request: Request) -> WebSession | None:
    value = request.cookies.get(COOKIE)
    token = unsign(request.app, value) if value else None
    if token is None:
        return None
    settings: Settings = request.app.state.settings
    pg: asyncpg.Pool[asyncpg.Record] = request.app.state.runtime.pg
    row = await pg.fetchrow(_GET, hash_token(token))
    if row is None:
        return None
    session = _session(row)
    now = datetime.now(UTC)
    if now >= session.expires_at or now >= session.last_seen_at + timedelta(seconds=settings.session_idle_s):
        await pg.execute(_DELETE, session.id_hash)
        return None
    if (now - session.last_seen_at).total_seconds() >= min(TOUCH_INTERVAL_S, settings.session_idle_s / 10):
        await pg.execute(_TOUCH, session.id_hash, now)
        session = WebSession(**{**session.__dict__, "last_seen_at": now})
    return session


async def delete_session(conn: Conn, session: WebSession) -> None:
    await conn.execute(_DELETE, session.id_hash)


async def set_active_tenant(conn: Conn, session: WebSession, tenant_id: uuid.UUID) -> None:
    await conn.execute(_SET_TENANT, session.id_hash, tenant_id)


# --- CSRF -------------------------------------------------------------------------------------------


async def form_fields(request: Request) -> dict[str, str]:
    """The fields of an ``application/x-www-form-urlencoded`` body (first value of each); else empty."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/x-www-form-urlencoded":
        return {}
    body = (await request.body()).decode("utf-8", errors="replace")
    try:
        pairs = parse_qsl(body, keep_blank_values=True, max_num_fields=_MAX_FORM_FIELDS)
    except ValueError as exc:  # more fields than any form of ours has: an answer, not a 500
        raise Invalid("too many form fields", errors=[
            {"pointer": "/form", "message": f"at most {_MAX_FORM_FIELDS} fields"}]) from exc
    fields: dict[str, str] = {}
    for name, value in pairs:
        fields.setdefault(name, value)
    return fields


async def check_csrf(request: Request, session: WebSession) -> None:
    """Raise 403 unless the request carries the session's CSRF token (header or form field)."""
    sent = request.headers.get(CSRF_HEADER) or (await form_fields(request)).get(CSRF_FIELD)
    if not sent or not hmac.compare_digest(sent.encode(), session.csrf_token.encode()):
        raise Forbidden("missing or wrong CSRF token: send the form's csrf_token field or the X-CSRF-Token header")


# --- the dependency get_ctx calls --------------------------------------------------------------------


async def session_ctx(request: Request, db: AsyncSession) -> Ctx | None:
    """The signed-in user in their active tenant, with ``db`` scoped to it; None without a live session."""
    session = await current_session(request)
    if session is None:
        return None
    if request.method not in SAFE_METHODS:
        await check_csrf(request, session)
    if session.tenant_id is None:
        raise Forbidden("signed in, but not a member of any tenant: sign in again or ask an admin")
    access = await tenant_access(request.app.state.runtime.pg, session.user_id, session.groups, session.tenant_id)
    if access is None:
        raise Forbidden("you are no longer a member of this tenant: switch tenant or sign in again")
    await bind_tenant(db, access.id)
    return Ctx(tenant_id=access.id, principal=session.principal, roles=access.roles, ip=client_ip(request),
               user_agent=user_agent(request))
