"""Authentication and authorisation dependencies for API routes.

``CurrentCtx`` authenticates the caller and yields the :class:`~app.context.Ctx` every service call
takes, with the request's database session scoped to the caller's tenant (row-level security).
Credentials, in order: ``Authorization: Bearer stw_...`` (an API key), ``Authorization: Bearer <JWT>``
(an OIDC access token, app/auth/jwt.py), the dashboard's session cookie (app/auth/sessions.py).
``require("runs:operate")`` adds a permission check from app/auth/permissions.py on top.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit.service import record
from app.auth.keys import KEY_PREFIX, hash_api_key
from app.auth.permissions import PERMISSIONS, allowed
from app.context import Ctx
from app.db import get_db
from app.errors import Forbidden, Unauthorized
from app.logs import bind
from app.pg import driver

log = logging.getLogger(__name__)

# Runs as the tables' owner: finds the key by its hash and scopes the transaction to its tenant.
_KEY_LOOKUP = "SELECT id, tenant_id, roles, revoked_at, expires_at FROM steward_api_key_auth($1)"
_TOUCH_KEY = (
    "UPDATE api_key SET last_used_at = now() WHERE id = $1 "
    "AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')"
)

# auto_error=False: a missing header must become our problem+json 401, not FastAPI's own error.
_bearer = HTTPBearer(
    auto_error=False, description="An API key (`Bearer stw_...`) or an OIDC access token (a JWT)"
)


class MissingCredentials(Unauthorized):
    headers = {"WWW-Authenticate": 'Bearer realm="steward"'}


class InvalidCredentials(Unauthorized):
    # RFC 6750 section 3: tell the client the token itself is the problem.
    headers = {"WWW-Authenticate": 'Bearer realm="steward", error="invalid_token"'}


def client_ip(request: Request) -> str | None:
    return request.client.host if request.client else None


def user_agent(request: Request) -> str | None:
    agent = request.headers.get("user-agent")
    return agent[:512] if agent else None


async def _api_key_ctx(request: Request, db: AsyncSession, token: str) -> Ctx:
    conn = await driver(db)
    api_key = await conn.fetchrow(_KEY_LOOKUP, hash_api_key(token))
    if api_key is None:
        raise InvalidCredentials("invalid API key")
    if api_key["revoked_at"] is not None:
        raise InvalidCredentials("API key has been revoked")
    if api_key["expires_at"] is not None and api_key["expires_at"] <= datetime.now(UTC):
        raise InvalidCredentials("API key has expired")
    # The lookup set the tenant for this transaction; later transactions of the session set it again.
    db.sync_session.info["tenant_id"] = api_key["tenant_id"]
    await _touch(request, api_key["id"])
    return Ctx(tenant_id=api_key["tenant_id"], principal=f"key:{api_key['id']}", roles=frozenset(api_key["roles"]),
               ip=client_ip(request), user_agent=user_agent(request))


# Keys used in the last minute, by id: last_used_at is written at most once a minute per key and process.
_recently_touched: dict[uuid.UUID, float] = {}


async def _touch(request: Request, key_id: uuid.UUID) -> None:
    """Record the key's last use on the engine's pool (its own transaction: a GET commits nothing)."""
    now = datetime.now(UTC).timestamp()
    if now - _recently_touched.get(key_id, 0.0) < 60:
        return
    if len(_recently_touched) > 10_000:
        _recently_touched.clear()
    _recently_touched[key_id] = now
    await request.app.state.runtime.pg.execute(_TOUCH_KEY, key_id)


async def get_ctx(
    request: Request,
    db: Annotated[AsyncSession, Depends(get_db)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Ctx:
    """The caller's tenant, principal and roles; the request's session is scoped to that tenant."""
    if credentials is not None:
        token = credentials.credentials
        if token.startswith(KEY_PREFIX):
            ctx = await _api_key_ctx(request, db, token)
        else:
            from app.auth.jwt import bearer_ctx

            ctx = await bearer_ctx(request, db, token)
    else:
        from app.auth.sessions import session_ctx

        session = await session_ctx(request, db)
        if session is None:
            raise MissingCredentials("missing credentials: send `Authorization: Bearer <API key or token>`, or sign in")
        ctx = session
    request.state.ctx = ctx
    bind(tenant=ctx.tenant_id, principal=ctx.principal)  # on this request's log records
    from app.ratelimit import check_rate

    await check_rate(request, ctx)
    return ctx


CurrentCtx = Annotated[Ctx, Depends(get_ctx)]


def require(permission: str) -> Callable[[Request, Ctx], Awaitable[Ctx]]:
    """A dependency returning the caller's Ctx, or raising 403 unless a role of theirs holds ``permission``.

    A refusal is audited (``access.denied``) in a transaction of its own: the request's is rolled back.
    """
    if permission not in PERMISSIONS:
        raise ValueError(f"unknown permission {permission!r}")

    async def check_permission(request: Request, ctx: CurrentCtx) -> Ctx:
        if not allowed(ctx.roles, permission):
            route = getattr(request.scope.get("route"), "path", request.url.path)
            async with request.app.state.runtime.pg.acquire() as conn, conn.transaction():
                await record(conn, ctx.tenant_id, ctx, "access.denied", f"{request.method} {route}",
                             outcome="denied", data={"permission": permission, "roles": sorted(ctx.roles)})
            holders = ", ".join(sorted(PERMISSIONS[permission][1] | {"admin"}))
            raise Forbidden(f"this action needs the '{permission}' permission (roles: {holders})",
                            permission=permission)
        return ctx

    check_permission.__name__ = f"require_{permission.replace(':', '_')}"
    check_permission.permission = permission  # type: ignore[attr-defined]  # read by the route-walk test
    return check_permission
