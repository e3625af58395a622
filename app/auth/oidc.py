"""People and their tenants, and the OpenID Connect client the dashboard signs them in with.

- Users are found by ``(issuer, subject)``: the provider's issuer URL and the ID or access token's
  ``sub`` (``("local", "admin")`` for the bootstrap admin of app/auth/local.py).
- A user's roles in a tenant are the roles of their ``membership`` row there plus the roles the tenant's
  ``role_mapping`` (tenant settings: group name -> roles) gives the groups in their token. A user with no
  role in a tenant is not a member of it.
- The Authlib client reads the provider's discovery document once per process; it runs authorization
  code + PKCE (S256) and checks state, nonce and the ID token (signature against the provider's JWKS,
  issuer, audience, expiry), accepting only the ``oidc_algorithms`` the provider also advertises.

These lookups cross tenants, so they run on the engine's owner pool (no row-level security), never on
a request's tenant-scoped session.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

import asyncpg
from authlib.integrations.starlette_client import OAuth
from fastapi import FastAPI
from pydantic import ValidationError

from app.config import Settings
from app.engine.sql import Conn
from app.errors import AppError
from app.tenants.policy import ROLES, load_policy

log = logging.getLogger(__name__)

LOCAL_ISSUER = "local"
CLIENT_NAME = "steward"
# Signing algorithms that use a public key. HMAC ("HS256"...) would verify with a secret shared with the
# provider (or, in the classic attack, with the provider's *public* key used as the secret); "none" with
# nothing at all.
ASYMMETRIC_ALGORITHMS = frozenset({
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA", "Ed25519", "Ed448",
})

Db: TypeAlias = "asyncpg.Pool[asyncpg.Record] | Conn"


class IdentityProviderUnavailable(AppError):
    status = 503
    type = "identity-provider-unavailable"
    title = "Identity provider unavailable"


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


def oidc_configured(settings: Settings) -> bool:
    return bool(settings.oidc_issuer and settings.oidc_client_id)


def allowed_algorithms(settings: Settings) -> list[str]:
    """The configured ``oidc_algorithms`` that sign with a public key (``none`` and HMAC are dropped)."""
    configured = [alg.strip() for alg in settings.oidc_algorithms.split(",") if alg.strip()]
    refused = [alg for alg in configured if alg not in ASYMMETRIC_ALGORITHMS]
    if refused:
        log.warning("oidc_algorithms: ignoring %s (only public-key signatures are accepted)", ", ".join(refused))
    return [alg for alg in configured if alg in ASYMMETRIC_ALGORITHMS]


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
    try:
        return {group: list(roles) for group, roles in load_policy(policy).role_mapping.items()}
    except ValidationError:
        # A policy written before a settings change must not lock everyone out: read the mapping alone.
        log.warning("tenant settings do not validate; reading role_mapping on its own")
    raw = (policy or {}).get("role_mapping") or {}
    if not isinstance(raw, Mapping):
        return {}
    return {
        str(group): [role for role in roles if role in ROLES]
        for group, roles in raw.items()
        if isinstance(roles, list)
    }


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
# Tenants where the user has a membership row, or whose role_mapping names one of their groups; $3
# narrows to one tenant, by id or by name.
_TENANTS = """
SELECT t.id, t.name, t.policy, m.roles
FROM tenant t LEFT JOIN membership m ON m.tenant_id = t.id AND m.user_id = $1
WHERE (m.user_id IS NOT NULL
       OR (jsonb_typeof(t.policy -> 'role_mapping') = 'object' AND (t.policy -> 'role_mapping') ?| $2::text[]))
  AND ($3::text IS NULL OR t.id::text = $3 OR t.name = $3)
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
    rows = await db.fetch(_TENANTS, user_id, group_list, only)
    access = [TenantAccess(row["id"], row["name"], roles_in(row["policy"], row["roles"], group_list)) for row in rows]
    return [tenant for tenant in access if tenant.roles]


async def tenant_access(db: Db, user_id: uuid.UUID, groups: Iterable[str], tenant: uuid.UUID | str
                        ) -> TenantAccess | None:
    """The user's access to one tenant (id or name), or None when they are not a member of it."""
    found = await tenants_of(db, user_id, groups, only=str(tenant))
    return found[0] if found else None


# --- the Authlib client ----------------------------------------------------------------------------


def discovery_url(issuer: str) -> str:
    return issuer.rstrip("/") + "/.well-known/openid-configuration"


def oidc_client(app: FastAPI) -> Any:
    """The app's Authlib Starlette client (``StarletteOAuth2App``), made on first use."""
    client = getattr(app.state, "oidc_client", None)
    if client is None:
        settings: Settings = app.state.settings
        if not oidc_configured(settings):
            raise RuntimeError("no identity provider configured (STEWARD_OIDC_ISSUER, STEWARD_OIDC_CLIENT_ID)")
        assert settings.oidc_issuer is not None
        oauth = OAuth()
        client = oauth.register(
            CLIENT_NAME,
            client_id=settings.oidc_client_id,
            client_secret=settings.oidc_client_secret,
            server_metadata_url=discovery_url(settings.oidc_issuer),
            client_kwargs={"scope": settings.oidc_scopes, "code_challenge_method": "S256", "timeout": 10.0},
        )
        app.state.oidc_client = client
    return client


async def provider_metadata(app: FastAPI) -> dict[str, Any]:
    """The provider's discovery document (fetched once), checked against the configured issuer, with
    ``id_token_signing_alg_values_supported`` narrowed to our allowlist (Authlib verifies with those)."""
    client = oidc_client(app)
    settings: Settings = app.state.settings
    fresh = not client.server_metadata
    try:
        metadata = cast(dict[str, Any], await client.load_server_metadata())
    except Exception as exc:  # connection refused, timeout, bad JSON: all mean "cannot sign in now"
        client.server_metadata = {}
        log.warning("OIDC discovery at %s failed: %r", discovery_url(settings.oidc_issuer or ""), exc)
        raise IdentityProviderUnavailable("the identity provider cannot be reached; try again shortly") from None
    if fresh:
        if metadata.get("issuer") != settings.oidc_issuer:
            client.server_metadata = {}
            log.error("OIDC discovery names issuer %r, configured %r", metadata.get("issuer"), settings.oidc_issuer)
            raise IdentityProviderUnavailable("the identity provider's discovery document names another issuer")
        offered = metadata.get("id_token_signing_alg_values_supported") or ["RS256"]
        common = [alg for alg in allowed_algorithms(settings) if alg in offered]
        if not common:
            client.server_metadata = {}
            log.error("OIDC provider signs ID tokens with %s; oidc_algorithms allows none of them", offered)
            raise IdentityProviderUnavailable("the identity provider signs with no algorithm Steward accepts")
        metadata["id_token_signing_alg_values_supported"] = common
    return metadata
