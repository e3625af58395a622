"""Who may act in a tenant: members (people, with roles) and API keys (service accounts). Admins only.

Roles a member holds here come on top of the roles their identity-provider groups give through the
tenant's ``role_mapping`` setting. Every change is audited; an API key is shown once, when created.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.audit.service import record as audit
from app.auth.deps import require
from app.auth.keys import hash_api_key, new_api_key
from app.auth.users import find_or_create_user
from app.context import Ctx
from app.db import Db
from app.engine.runtime import Runtime
from app.errors import Conflict, Invalid, NotFound
from app.http import AppSettings, JsonRoute, api_responses, problem_responses
from app.pagination import Cursor, Limit, keyset, page_size
from app.pg import driver
from app.tenants.policy import Role

router = APIRouter(prefix="/api/v1", tags=["access"], responses=api_responses(404), route_class=JsonRoute)
MEMBER_PAGES = keyset("members", uuid.UUID)
KEY_PAGES = keyset("api-keys", uuid.UUID)

Reader = Annotated[Ctx, Depends(require("members:read"))]
Admin = Annotated[Ctx, Depends(require("members:write"))]
Roles = Annotated[list[Role], Field(min_length=1, max_length=6)]

MAX_KEY_LIFETIME_DAYS = 3650
MAX_KEYS_PER_TENANT = 1000


# --- members -----------------------------------------------------------------------------------------


class MemberWrite(BaseModel):
    model_config = ConfigDict(extra="forbid")
    roles: Roles


class MemberAdd(MemberWrite):
    subject: str = Field(min_length=1, max_length=255, description="The user's `sub` at the identity provider")
    issuer: str | None = Field(
        default=None, max_length=255, description="The identity provider (default: the configured one, else `local`)"
    )
    email: str | None = Field(default=None, max_length=320)
    name: str | None = Field(default=None, max_length=255)


class MemberRead(BaseModel):
    user_id: uuid.UUID
    issuer: str
    subject: str
    email: str | None
    name: str | None
    roles: list[str]
    created_by: str | None
    created_at: datetime
    updated_at: datetime
    last_login_at: datetime | None


class MemberPage(BaseModel):
    items: list[MemberRead]
    next_cursor: str | None


_MEMBER_COLUMNS = (
    "m.user_id, u.issuer, u.subject, u.email, u.name, m.roles, m.created_by, m.created_at, m.updated_at, "
    "u.last_login_at FROM membership m JOIN app_user u ON u.id = m.user_id"
)


@router.get("/members", response_model=MemberPage, summary="The tenant's members, by user id")
async def list_members(
    ctx: Reader, db: Db, settings: AppSettings, limit: Limit = None, cursor: Cursor = None
) -> MemberPage:
    size = page_size(limit, settings)
    after = MEMBER_PAGES.after(cursor)
    rows = await (await driver(db)).fetch(
        f"SELECT {_MEMBER_COLUMNS} WHERE m.tenant_id = $1 AND ($2::uuid IS NULL OR m.user_id > $2) "
        "ORDER BY m.user_id LIMIT $3",
        ctx.tenant_id, after, size + 1,
    )
    items, next_cursor = MEMBER_PAGES.page(rows, size, lambda r: (r["user_id"],))
    return MemberPage(items=[MemberRead(**dict(r)) for r in items], next_cursor=next_cursor)


@router.post(
    "/members",
    status_code=201,
    response_model=MemberRead,
    summary="Add a member (by identity)",
    responses=problem_responses(409),
)
async def add_member(body: MemberAdd, request: Request, ctx: Admin, db: Db, settings: AppSettings) -> MemberRead:
    runtime: Runtime = request.app.state.runtime
    issuer = body.issuer or settings.oidc_issuer or "local"
    # Users are global (one person, several tenants) and invisible to a tenant until they are members:
    # found or created on the engine's pool, outside row-level security.
    user = await find_or_create_user(runtime.pg, issuer, body.subject, email=body.email, name=body.name)
    user_id = user.id
    conn = await driver(db)
    added = await conn.fetchval(
        "INSERT INTO membership (tenant_id, user_id, roles, created_by) VALUES ($1, $2, $3, $4) "
        "ON CONFLICT DO NOTHING RETURNING true",
        ctx.tenant_id, user_id, sorted(set(body.roles)), ctx.principal,
    )
    if not added:
        raise Conflict(f"{issuer} user {body.subject!r} is a member already: PUT /api/v1/members/{user_id}")
    await audit(conn, ctx.tenant_id, ctx, "member.add", f"user:{user_id}",
                data={"issuer": issuer, "subject": body.subject, "roles": sorted(set(body.roles))})
    member = await _member(conn, ctx, user_id)
    await db.commit()
    return member


@router.get("/members/{user_id}", response_model=MemberRead, summary="A member")
async def get_member(user_id: uuid.UUID, ctx: Reader, db: Db) -> MemberRead:
    return await _member(await driver(db), ctx, user_id)


@router.put(
    "/members/{user_id}",
    response_model=MemberRead,
    summary="Replace a member's roles",
    responses=problem_responses(409),
)
async def put_member(user_id: uuid.UUID, body: MemberWrite, ctx: Admin, db: Db) -> MemberRead:
    conn = await driver(db)
    before = await conn.fetchval(
        "SELECT roles FROM membership WHERE tenant_id = $1 AND user_id = $2 FOR UPDATE", ctx.tenant_id, user_id
    )
    if before is None:
        raise NotFound(f"no member {user_id}")
    roles = sorted(set(body.roles))
    if "admin" in before and "admin" not in roles:
        await _keep_an_admin(conn, ctx, user=user_id)
    await conn.execute(
        "UPDATE membership SET roles = $3, updated_at = now() WHERE tenant_id = $1 AND user_id = $2",
        ctx.tenant_id, user_id, roles,
    )
    await audit(conn, ctx.tenant_id, ctx, "member.update", f"user:{user_id}", data={"from": before, "to": roles})
    member = await _member(conn, ctx, user_id)
    await db.commit()
    return member


@router.delete("/members/{user_id}", status_code=204, summary="Remove a member", responses=problem_responses(409))
async def delete_member(user_id: uuid.UUID, ctx: Admin, db: Db) -> Response:
    conn = await driver(db)
    before = await conn.fetchval(
        "SELECT roles FROM membership WHERE tenant_id = $1 AND user_id = $2 FOR UPDATE", ctx.tenant_id, user_id
    )
    if before is None:
        raise NotFound(f"no member {user_id}")
    if "admin" in before:
        await _keep_an_admin(conn, ctx, user=user_id)
    await conn.execute("DELETE FROM membership WHERE tenant_id = $1 AND user_id = $2", ctx.tenant_id, user_id)
    await audit(conn, ctx.tenant_id, ctx, "member.remove", f"user:{user_id}", data={"roles": before})
    await db.commit()
    return Response(status_code=204)


async def _keep_an_admin(conn: Any, ctx: Ctx, *, user: uuid.UUID | None = None, key: uuid.UUID | None = None) -> None:
    """Refuse to take admin from the last admin standing (members and live keys both count).

    The tenant row is locked first: two admins demoting or revoking each other at once take turns, and
    the second sees the first's change.
    """
    await conn.execute("SELECT 1 FROM tenant WHERE id = $1 FOR UPDATE", ctx.tenant_id)
    others = await conn.fetchval(
        "SELECT (SELECT count(*) FROM membership WHERE tenant_id = $1 AND user_id IS DISTINCT FROM $2"
        "        AND 'admin' = ANY(roles))"
        " + (SELECT count(*) FROM api_key WHERE tenant_id = $1 AND id IS DISTINCT FROM $3 AND revoked_at IS NULL"
        "    AND 'admin' = ANY(roles) AND (expires_at IS NULL OR expires_at > now()))",
        ctx.tenant_id, user, key,
    )
    if not others:
        raise Conflict("this is the tenant's last admin: make someone else admin first")


async def _member(conn: Any, ctx: Ctx, user_id: uuid.UUID) -> MemberRead:
    row = await conn.fetchrow(f"SELECT {_MEMBER_COLUMNS} WHERE m.tenant_id = $1 AND m.user_id = $2",
                              ctx.tenant_id, user_id)
    if row is None:
        raise NotFound(f"no member {user_id}")
    return MemberRead(**dict(row))


# --- API keys ----------------------------------------------------------------------------------------


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)
    roles: Roles
    expires_in_days: float | None = Field(
        default=None, gt=0, le=MAX_KEY_LIFETIME_DAYS, description="Lifetime; omit for a key that does not expire"
    )
    expires_at: datetime | None = Field(default=None, description="Or an exact expiry (with a time zone)")

    @model_validator(mode="after")
    def _one_expiry(self) -> ApiKeyCreate:
        if self.expires_in_days is not None and self.expires_at is not None:
            raise ValueError("give expires_in_days or expires_at, not both")
        if self.expires_at is not None and self.expires_at.tzinfo is None:
            raise ValueError("expires_at needs a time zone")
        return self


class ApiKeyRead(BaseModel):
    id: uuid.UUID
    name: str
    prefix: str = Field(description="The key's first characters, to tell keys apart")
    roles: list[str]
    created_at: datetime
    created_by: str | None
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


class ApiKeyCreated(ApiKeyRead):
    key: str = Field(description="The key itself: shown this once, stored only as a hash")


class ApiKeyPage(BaseModel):
    items: list[ApiKeyRead]
    next_cursor: str | None


_KEY_COLUMNS = "id, name, prefix, roles, created_at, created_by, expires_at, revoked_at, last_used_at"


@router.get("/api-keys", response_model=ApiKeyPage, summary="The tenant's API keys (never the keys themselves)")
async def list_api_keys(
    ctx: Reader, db: Db, settings: AppSettings, limit: Limit = None, cursor: Cursor = None
) -> ApiKeyPage:
    size = page_size(limit, settings)
    rows = await (await driver(db)).fetch(
        f"SELECT {_KEY_COLUMNS} FROM api_key WHERE tenant_id = $1 AND ($2::uuid IS NULL OR id > $2) "
        "ORDER BY id LIMIT $3",
        ctx.tenant_id, KEY_PAGES.after(cursor), size + 1,
    )
    items, next_cursor = KEY_PAGES.page(rows, size, lambda r: (r["id"],))
    return ApiKeyPage(items=[ApiKeyRead(**dict(r)) for r in items], next_cursor=next_cursor)


@router.post(
    "/api-keys",
    status_code=201,
    response_model=ApiKeyCreated,
    summary="Create an API key",
    responses=problem_responses(409),
)
async def create_api_key(body: ApiKeyCreate, ctx: Admin, db: Db, settings: AppSettings) -> ApiKeyCreated:
    expires_at = body.expires_at
    if body.expires_in_days is not None:
        expires_at = datetime.now(UTC) + timedelta(days=body.expires_in_days)
    if expires_at is not None and expires_at <= datetime.now(UTC):
        raise Invalid("the key would be expired already",
                      errors=[{"pointer": "/body/expires_at", "message": "must be in the future"}])
    conn = await driver(db)
    count = await conn.fetchval(
        "SELECT count(*) FROM api_key WHERE tenant_id = $1 AND revoked_at IS NULL", ctx.tenant_id
    )
    if count >= MAX_KEYS_PER_TENANT:
        raise Conflict(f"the tenant has {MAX_KEYS_PER_TENANT} live API keys: revoke some first")
    key = new_api_key()
    roles = sorted(set(body.roles))
    row = await conn.fetchrow(
        f"INSERT INTO api_key (id, tenant_id, name, prefix, key_hash, roles, expires_at, created_by) "
        f"VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {_KEY_COLUMNS}",
        uuid.uuid4(), ctx.tenant_id, body.name, key[:10], hash_api_key(key), roles, expires_at, ctx.principal,
    )
    await audit(conn, ctx.tenant_id, ctx, "api_key.create", f"key:{row['id']}",
                data={"name": body.name, "roles": roles, "expires_at": expires_at.isoformat() if expires_at else None})
    await db.commit()
    return ApiKeyCreated(**dict(row), key=key)


@router.delete(
    "/api-keys/{key_id}",
    status_code=204,
    summary="Revoke an API key (it stops working at once)",
    responses=problem_responses(409),
)
async def revoke_api_key(key_id: Annotated[uuid.UUID, Path()], ctx: Admin, db: Db) -> Response:
    conn = await driver(db)
    row = await conn.fetchrow(
        "SELECT roles, revoked_at FROM api_key WHERE tenant_id = $1 AND id = $2 FOR UPDATE", ctx.tenant_id, key_id
    )
    if row is None:
        raise NotFound(f"no API key {key_id}")
    if row["revoked_at"] is None:
        if "admin" in row["roles"]:
            await _keep_an_admin(conn, ctx, key=key_id)
        await conn.execute("UPDATE api_key SET revoked_at = now() WHERE id = $1", key_id)
        await audit(conn, ctx.tenant_id, ctx, "api_key.revoke", f"key:{key_id}", data={"roles": row["roles"]})
        await db.commit()
    return Response(status_code=204)

