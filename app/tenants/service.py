"""Tenants and who may act in them: members (people, with roles), API keys (service accounts), settings.

Routes, the CLI and the tests all go through these functions. Every change made on a caller's behalf
(``ctx``) is audited in the caller's transaction; the caller commits. The rule protected here: a tenant
always keeps an admin (a member or a live key), however its admins demote or revoke each other.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit.service import record as audit
from app.auth.keys import hash_api_key, new_api_key
from app.auth.users import LOCAL_ISSUER, find_or_create_user
from app.auth.users import Db as UserDb
from app.config import Settings
from app.context import Ctx
from app.errors import Conflict, NotFound
from app.pg import Conn, driver, dumps
from app.tenants.models import Tenant
from app.tenants.policy import ROLES, TenantPolicy, load_policy
from app.tenants.schemas import ApiKeyCreated, ApiKeyRead, MemberRead

ALL_ROLES = ROLES
MAX_KEYS_PER_TENANT = 1000


# --- tenants -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bootstrapped:
    tenant_id: uuid.UUID
    tenant_created: bool
    api_key: str


async def find_tenant(db: AsyncSession, name: str) -> uuid.UUID | None:
    """The id of the tenant called ``name``, if there is one."""
    return (await db.execute(select(Tenant.id).where(Tenant.name == name))).scalar_one_or_none()


async def get_or_create_tenant(db: AsyncSession, name: str) -> tuple[Tenant, bool]:
    tenant = (await db.execute(select(Tenant).where(Tenant.name == name))).scalar_one_or_none()
    if tenant is not None:
        return tenant, False
    tenant = Tenant(name=name)
    db.add(tenant)
    await db.flush()
    return tenant, True


async def bootstrap_tenant(db: AsyncSession, name: str) -> Bootstrapped:
    """Ensure the tenant exists and give it a new admin key (every call makes a new key)."""
    tenant, created = await get_or_create_tenant(db, name)
    key = await create_api_key(db, tenant.id, name="bootstrap admin", roles=ALL_ROLES)
    return Bootstrapped(tenant_id=tenant.id, tenant_created=created, api_key=key.key)


async def get_policy(db: AsyncSession, ctx: Ctx) -> TenantPolicy:
    """The tenant's guardrail settings (defaults for what was never set)."""
    conn = await driver(db)
    return load_policy(await conn.fetchval("SELECT policy FROM tenant WHERE id = $1", ctx.tenant_id))


async def put_policy(db: AsyncSession, ctx: Ctx, policy: TenantPolicy) -> TenantPolicy:
    """Replace the tenant's guardrail settings."""
    conn = await driver(db)
    stored = policy.model_dump(mode="json")
    await conn.execute("UPDATE tenant SET policy = $2::jsonb WHERE id = $1", ctx.tenant_id, dumps(stored))
    await audit(conn, ctx.tenant_id, ctx, "settings.update", "settings", data=stored)
    return policy


# --- members -----------------------------------------------------------------------------------------

_MEMBER_COLUMNS = (
    "m.user_id, u.issuer, u.subject, u.email, u.name, m.roles, m.created_by, m.created_at, m.updated_at, "
    "u.last_login_at FROM membership m JOIN app_user u ON u.id = m.user_id"
)


async def list_members(db: AsyncSession, ctx: Ctx, *, after: uuid.UUID | None, limit: int) -> list[MemberRead]:
    """The tenant's members by user id, after ``after`` (keyset pages)."""
    rows = await (await driver(db)).fetch(
        f"SELECT {_MEMBER_COLUMNS} WHERE m.tenant_id = $1 AND ($2::uuid IS NULL OR m.user_id > $2) "
        "ORDER BY m.user_id LIMIT $3",
        ctx.tenant_id, after, limit,
    )
    return [MemberRead(**dict(r)) for r in rows]


async def get_member(db: AsyncSession, ctx: Ctx, user_id: uuid.UUID) -> MemberRead:
    return await _member(await driver(db), ctx, user_id)


def member_issuer(issuer: str | None, settings: Settings) -> str:
    """The issuer a new member is added under: the one given, else the configured identity provider's,
    else local sign-in's."""
    return issuer or settings.oidc_issuer or LOCAL_ISSUER


async def add_member(
    db: AsyncSession,
    users: UserDb,
    ctx: Ctx,
    *,
    issuer: str,
    subject: str,
    roles: Sequence[str],
    email: str | None = None,
    name: str | None = None,
) -> MemberRead:
    """Make the user ``(issuer, subject)`` a member with ``roles``; Conflict if they are one already.

    Users are global (one person, several tenants) and invisible to a tenant until they are members: they
    are found or created through ``users`` (the engine's pool, outside row-level security).
    """
    user = await find_or_create_user(users, issuer, subject, email=email, name=name)
    conn = await driver(db)
    roles = sorted(set(roles))
    added = await conn.fetchval(
        "INSERT INTO membership (tenant_id, user_id, roles, created_by) VALUES ($1, $2, $3, $4) "
        "ON CONFLICT DO NOTHING RETURNING true",
        ctx.tenant_id, user.id, roles, ctx.principal,
    )
    if not added:
        raise Conflict(f"{issuer} user {subject!r} is a member already: PUT /api/v1/members/{user.id}")
    await audit(conn, ctx.tenant_id, ctx, "member.add", f"user:{user.id}",
                data={"issuer": issuer, "subject": subject, "roles": roles})
    return await _member(conn, ctx, user.id)


async def set_member_roles(db: AsyncSession, ctx: Ctx, user_id: uuid.UUID, roles: Sequence[str]) -> MemberRead:
    """Replace a member's roles; Conflict if that would take admin from the tenant's last admin."""
    conn = await driver(db)
    before = await _lock_member(conn, ctx, user_id)
    new_roles = sorted(set(roles))
    if "admin" in before and "admin" not in new_roles:
        await _keep_an_admin(conn, ctx, user=user_id)
    await conn.execute(
        "UPDATE membership SET roles = $3, updated_at = now() WHERE tenant_id = $1 AND user_id = $2",
        ctx.tenant_id, user_id, new_roles,
    )
    await audit(conn, ctx.tenant_id, ctx, "member.update", f"user:{user_id}", data={"from": before, "to": new_roles})
    return await _member(conn, ctx, user_id)


async def remove_member(db: AsyncSession, ctx: Ctx, user_id: uuid.UUID) -> None:
    """Remove a member; Conflict if they are the tenant's last admin."""
    conn = await driver(db)
    before = await _lock_member(conn, ctx, user_id)
    if "admin" in before:
        await _keep_an_admin(conn, ctx, user=user_id)
    await conn.execute("DELETE FROM membership WHERE tenant_id = $1 AND user_id = $2", ctx.tenant_id, user_id)
    await audit(conn, ctx.tenant_id, ctx, "member.remove", f"user:{user_id}", data={"roles": before})


async def _lock_member(conn: Conn, ctx: Ctx, user_id: uuid.UUID) -> list[str]:
    """The member's roles, their row locked until commit; NotFound if they are no member."""
    roles: list[str] | None = await conn.fetchval(
        "SELECT roles FROM membership WHERE tenant_id = $1 AND user_id = $2 FOR UPDATE", ctx.tenant_id, user_id
    )
    if roles is None:
        raise NotFound(f"no member {user_id}")
    return roles


async def _member(conn: Conn, ctx: Ctx, user_id: uuid.UUID) -> MemberRead:
    row = await conn.fetchrow(f"SELECT {_MEMBER_COLUMNS} WHERE m.tenant_id = $1 AND m.user_id = $2",
                              ctx.tenant_id, user_id)
    if row is None:
        raise NotFound(f"no member {user_id}")
    return MemberRead(**dict(row))


async def _keep_an_admin(conn: Conn, ctx: Ctx, *, user: uuid.UUID | None = None, key: uuid.UUID | None = None) -> None:
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


# --- API keys ----------------------------------------------------------------------------------------

_KEY_COLUMNS = "id, name, prefix, roles, created_at, created_by, expires_at, revoked_at, last_used_at"


async def list_api_keys(db: AsyncSession, ctx: Ctx, *, after: uuid.UUID | None, limit: int) -> list[ApiKeyRead]:
    """The tenant's API keys by id, after ``after`` (never the keys themselves)."""
    rows = await (await driver(db)).fetch(
        f"SELECT {_KEY_COLUMNS} FROM api_key WHERE tenant_id = $1 AND ($2::uuid IS NULL OR id > $2) "
        "ORDER BY id LIMIT $3",
        ctx.tenant_id, after, limit,
    )
    return [ApiKeyRead(**dict(r)) for r in rows]


async def create_api_key(
    db: AsyncSession,
    tenant_id: uuid.UUID,
    *,
    name: str,
    roles: Sequence[str],
    expires_at: datetime | None = None,
    actor: Ctx | None = None,
) -> ApiKeyCreated:
    """Create a key; the result holds it in clear, the only moment it exists outside its hash.

    At most :data:`MAX_KEYS_PER_TENANT` live keys per tenant (Conflict past that). Created on behalf of
    ``actor`` (an API caller), the key records who made it and the creation is audited; the CLI's
    bootstrap key has no actor.
    """
    conn = await driver(db)
    count = await conn.fetchval("SELECT count(*) FROM api_key WHERE tenant_id = $1 AND revoked_at IS NULL", tenant_id)
    if count >= MAX_KEYS_PER_TENANT:
        raise Conflict(f"the tenant has {MAX_KEYS_PER_TENANT} live API keys: revoke some first")
    key = new_api_key()
    roles = sorted(set(roles))
    row = await conn.fetchrow(
        f"INSERT INTO api_key (id, tenant_id, name, prefix, key_hash, roles, expires_at, created_by) "
        f"VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {_KEY_COLUMNS}",
        uuid.uuid4(), tenant_id, name, key[:10], hash_api_key(key), roles, expires_at,
        actor.principal if actor else None,
    )
    if actor is not None:
        await audit(conn, tenant_id, actor, "api_key.create", f"key:{row['id']}",
                    data={"name": name, "roles": roles, "expires_at": expires_at.isoformat() if expires_at else None})
    return ApiKeyCreated(**dict(row), key=key)


async def revoke_api_key(db: AsyncSession, ctx: Ctx, key_id: uuid.UUID) -> None:
    """Revoke a key (it stops working at once); a revoked key stays so. Conflict for the last admin."""
    conn = await driver(db)
    row = await conn.fetchrow(
        "SELECT roles, revoked_at FROM api_key WHERE tenant_id = $1 AND id = $2 FOR UPDATE", ctx.tenant_id, key_id
    )
    if row is None:
        raise NotFound(f"no API key {key_id}")
    if row["revoked_at"] is not None:
        return
    if "admin" in row["roles"]:
        await _keep_an_admin(conn, ctx, key=key_id)
    await conn.execute("UPDATE api_key SET revoked_at = now() WHERE id = $1", key_id)
    await audit(conn, ctx.tenant_id, ctx, "api_key.revoke", f"key:{key_id}", data={"roles": row["roles"]})
