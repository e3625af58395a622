"""Tenants and their API keys."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth.keys import hash_api_key, new_api_key
from app.tenants.models import ApiKey, Tenant
from app.tenants.policy import ROLES

ALL_ROLES = ROLES


@dataclass(frozen=True)
class Bootstrapped:
    tenant_id: UUID
    tenant_created: bool
    api_key: str


async def get_or_create_tenant(db: AsyncSession, name: str) -> tuple[Tenant, bool]:
    tenant = (await db.execute(select(Tenant).where(Tenant.name == name))).scalar_one_or_none()
    if tenant is not None:
        return tenant, False
    tenant = Tenant(name=name)
    db.add(tenant)
    await db.flush()
    return tenant, True


async def create_api_key(
    db: AsyncSession, tenant_id: UUID, *, name: str, roles: list[str] | tuple[str, ...]
) -> str:
    """Create a key and return it in clear: the only moment it exists outside its hash."""
    key = new_api_key()
    db.add(
        ApiKey(tenant_id=tenant_id, name=name, prefix=key[:10], key_hash=hash_api_key(key), roles=list(roles))
    )
    await db.flush()
    return key


async def bootstrap_tenant(db: AsyncSession, name: str) -> Bootstrapped:
    """Ensure the tenant exists and give it a new admin key (every call makes a new key)."""
    tenant, created = await get_or_create_tenant(db, name)
    key = await create_api_key(db, tenant.id, name="bootstrap admin", roles=ALL_ROLES)
    return Bootstrapped(tenant_id=tenant.id, tenant_created=created, api_key=key)
