"""People and their tenants: users found by ``(issuer, subject)``, and their roles in each tenant.

- ``issuer`` is the identity provider's issuer URL and ``subject`` the ID or access token's ``sub``
  (``("local", "admin")`` for the bootstrap admin of app/auth/local.py).
- A user's roles in a tenant are the roles of their ``membership`` row there plus the roles the tenant's
  ``role_mapping`` (tenant settings: group name -> roles) gives the groups in their token. A user with no
  role in a tenant is not a member of it.

These lookups cross tenants, so they run on the engine's owner pool (no row-level security), never on
a request's tenant-scoped session.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import asyncpg

from app.pg import Conn
from app.tenants.policy import ROLES, load_policy

log = logging.getLogger(__name__)

LOCAL_ISSUER = "local"

Db: TypeAlias = "asyncpg.Pool[asyncpg.Record] | Conn"


@dataclass(frozen=True)
class User:
    id: uuid.UUID
    issuer: str
    subject: str
    email: str | None
    name: str | None

    @property
    def principal(self) -> str:
        return f"user:{self.id}"


@dataclass(frozen=True)
class TenantAccess:
    """A tenant a user may act in, with their roles there (never empty)."""

    id: uuid.UUID
    name: str
    roles: frozenset[str]


# --- claims and roles ------------------------------------------------------------------------------


def groups_from_claims(claims: Mapping[str, Any], claim: str) -> list[str]:
    """The groups in ``claims[claim]``; a dotted ``claim`` walks nested objects (``realm_access.roles``)."""
    value: Any = claims
    for part in claim.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, str)]
    return []


def role_mapping(policy: dict[str, Any] | None) -> dict[str, list[str]]:
    """A tenant's group -> roles mapping (tenant settings ``role_mapping``)."""
    return {group: list(roles) for group, roles in load_policy(policy).role_mapping.items()}


def roles_in(policy: dict[str, Any] | None, granted: Iterable[str] | None, groups: Iterable[str]) -> frozenset[str]:
    """Membership roles ∪ the roles the tenant maps the user's groups to."""
    mapping = role_mapping(policy)
    roles = {role for role in granted or () if role in ROLES}
    for group in groups:
        roles.update(mapping.get(group, ()))
    return frozenset(roles)


# --- users and tenants -----------------------------------------------------------------------------

_USER_COLUMNS = "id, issuer, subject, email, name"
_FIND_USER = f"SELECT {_USER_COLUMNS} FROM app_user WHERE issuer = $1 AND subject = $2"
_GET_USER = f"SELECT {_USER_COLUMNS} FROM app_user WHERE id = $1"
_INSERT_USER = f"""
INSERT INTO app_user (id, issuer, subject, email, name) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (issuer, subject) DO NOTHING RETURNING {_USER_COLUMNS}
"""
_SIGN_IN_USER = f"""
INSERT INTO app_user (id, issuer, subject, email, name, last_login_at) VALUES ($1, $2, $3, $4, $5, now())
ON CONFLICT (issuer, subject) DO UPDATE SET
    email = COALESCE(EXCLUDED.email, app_user.email), name = COALESCE(EXCLUDED.name, app_user.name),
    last_login_at = now()
RETURNING {_USER_COLUMNS}
"""
# Tenants where the user has a membership row, or whose role_mapping names one of their groups; $3 (an
# id) or $4 (a name) narrows to one tenant, found by its index (sessions ask this on every request).
_TENANTS = """
SELECT t.id, t.name, t.policy, m.roles
FROM tenant t LEFT JOIN membership m ON m.tenant_id = t.id AND m.user_id = $1
WHERE (m.user_id IS NOT NULL
       OR (jsonb_typeof(t.policy -> 'role_mapping') = 'object' AND (t.policy -> 'role_mapping') ?| $2::text[]))
  AND ($3::uuid IS NULL OR t.id = $3) AND ($4::text IS NULL OR t.name = $4)
ORDER BY t.name
"""


def _user(row: asyncpg.Record) -> User:
    return User(id=row["id"], issuer=row["issuer"], subject=row["subject"], email=row["email"], name=row["name"])


async def get_user(db: Db, user_id: uuid.UUID) -> User | None:
    row = await db.fetchrow(_GET_USER, user_id)
    return _user(row) if row else None


async def find_or_create_user(db: Db, issuer: str, subject: str, *, email: str | None = None,
                              name: str | None = None) -> User:
    """The user ``(issuer, subject)``, created on first sight (bearer tokens: no write when known)."""
    row = await db.fetchrow(_FIND_USER, issuer, subject)
    if row is None:
        row = await db.fetchrow(_INSERT_USER, uuid.uuid4(), issuer, subject, email, name)
        if row is None:  # created concurrently
            row = await db.fetchrow(_FIND_USER, issuer, subject)
    assert row is not None
    return _user(row)


async def sign_in_user(db: Db, issuer: str, subject: str, *, email: str | None, name: str | None) -> User:
    """Create or refresh the user from the provider's claims and stamp ``last_login_at``."""
    row = await db.fetchrow(_SIGN_IN_USER, uuid.uuid4(), issuer, subject, email, name)
    assert row is not None
    return _user(row)


async def tenants_of(db: Db, user_id: uuid.UUID, groups: Iterable[str], *, only: str | None = None
                     ) -> list[TenantAccess]:
    """Tenants the user is a member of (non-empty roles), by name; ``only``: that tenant (id or name)."""
    group_list = list(groups)
    tenant_id, name = _id_or_name(only)
    rows = await db.fetch(_TENANTS, user_id, group_list, tenant_id, name)
    access = [TenantAccess(row["id"], row["name"], roles_in(row["policy"], row["roles"], group_list)) for row in rows]
    return [tenant for tenant in access if tenant.roles]


def _id_or_name(tenant: str | None) -> tuple[uuid.UUID | None, str | None]:
    if tenant is None:
        return None, None
    try:
        return uuid.UUID(tenant), None
    except ValueError:
        return None, tenant


async def tenant_access(db: Db, user_id: uuid.UUID, groups: Iterable[str], tenant: uuid.UUID | str
                        ) -> TenantAccess | None:
    """The user's access to one tenant (id or name), or None when they are not a member of it."""
    found = await tenants_of(db, user_id, groups, only=str(tenant))
    return found[0] if found else None
