"""Authentication and authorisation dependencies for API routes.

``CurrentCtx`` authenticates the caller (``Authorization: Bearer stw_...``) and yields the
:class:`~app.context.Ctx` every service call takes; ``require_role("author")`` adds a role check on top.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth.keys import KEY_PREFIX, hash_api_key
from app.context import Ctx
from app.db import get_db
from app.engine.sql import driver
from app.errors import Forbidden, Unauthorized

_KEY_LOOKUP = "SELECT id, tenant_id, roles, revoked_at, expires_at FROM api_key WHERE key_hash = $1"

# auto_error=False: a missing header must become our problem+json 401, not FastAPI's own error.
_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer stw_...`")


class MissingCredentials(Unauthorized):
    headers = {"WWW-Authenticate": 'Bearer realm="steward"'}


class InvalidCredentials(Unauthorized):
    # RFC 6750 section 3: tell the client the token itself is the problem.
    headers = {"WWW-Authenticate": 'Bearer realm="steward", error="invalid_token"'}


async def get_ctx(
    request: Request,
    db: Annotated[AsyncSession, Depends(get_db)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Ctx:
    """The caller's tenant, principal and roles, from an API key (one indexed lookup by its hash)."""
    if credentials is None:
        raise MissingCredentials("missing bearer token: send `Authorization: Bearer <API key>`")
    token = credentials.credentials
    if not token.startswith(KEY_PREFIX):
        raise InvalidCredentials("invalid API key")
    # Every request runs this: a plain statement on the session's connection, no ORM object.
    api_key = await (await driver(db)).fetchrow(_KEY_LOOKUP, hash_api_key(token))
    if api_key is None:
        raise InvalidCredentials("invalid API key")
    if api_key["revoked_at"] is not None:
        raise InvalidCredentials("API key has been revoked")
    if api_key["expires_at"] is not None and api_key["expires_at"] <= datetime.now(UTC):
        raise InvalidCredentials("API key has expired")
    ctx = Ctx(tenant_id=api_key["tenant_id"], principal=f"key:{api_key['id']}", roles=frozenset(api_key["roles"]))
    request.state.ctx = ctx
    return ctx


CurrentCtx = Annotated[Ctx, Depends(get_ctx)]


def require_role(role: str) -> Callable[[Ctx], Awaitable[Ctx]]:
    """A dependency returning the caller's Ctx, or raising Forbidden unless it has ``role`` (or admin)."""

    async def check_role(ctx: CurrentCtx) -> Ctx:
        if not ctx.has(role):
            raise Forbidden(f"this action needs the '{role}' role")
        return ctx

    check_role.__name__ = f"require_{role}"
    return check_role
