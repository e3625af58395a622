"""OIDC access tokens as bearer credentials: JWTs verified against the identity provider's JWKS.

A token is accepted when its signature verifies with a key of the provider's JWKS under an allowed
algorithm (``oidc_algorithms``, public-key ones only: ``none`` and HMAC never verify), ``iss`` is the
configured issuer, ``aud`` names ``oidc_audience``, ``exp`` has not passed and ``nbf``/``iat`` are not in
the future (30 s leeway), and it has a ``sub``. No ``oidc_audience``: bearer JWTs are refused.

The JWKS (found through the discovery document) is cached for an hour. A token signed with an unknown
``kid`` (the provider rotated its keys) makes the cache fetch it again, at most once per
``refetch_cooldown_s``: a flood of made-up ``kid`` values costs the provider one request per cooldown.

The caller's tenant: header ``X-Steward-Tenant`` (name or id), or the only tenant they are a member of.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from typing import Any

import asyncpg
import httpx
from fastapi import FastAPI, Request
from joserfc import jwt
from joserfc.errors import (
    BadSignatureError,
    ExpiredTokenError,
    InvalidClaimError,
    InvalidKeyIdError,
    JoseError,
    MissingClaimError,
)
from joserfc.jwk import KeySet
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth.deps import InvalidCredentials, client_ip, user_agent
from app.auth.oidc import IdentityProviderUnavailable, allowed_algorithms, discovery_url
from app.auth.users import TenantAccess, find_or_create_user, groups_from_claims, tenants_of
from app.config import Settings
from app.context import Ctx
from app.db import bind_tenant
from app.errors import Forbidden

log = logging.getLogger(__name__)

TENANT_HEADER = "X-Steward-Tenant"
LEEWAY_S = 30
# Key types that carry public keys; symmetric ("oct") entries of a JWKS are never used.
_PUBLIC_KEY_TYPES = frozenset({"RSA", "EC", "OKP"})
_MAX_TOKEN_CHARS = 16_384


class JwksCache:
    """The provider's signing keys, fetched on first use, after ``max_age_s``, and on an unknown ``kid``."""

    def __init__(self, issuer: str, *, max_age_s: float = 3600.0, refetch_cooldown_s: float = 10.0,
                 timeout_s: float = 5.0) -> None:
        self.issuer = issuer
        self.max_age_s = max_age_s
        self.refetch_cooldown_s = refetch_cooldown_s
        self.timeout_s = timeout_s
        self.fetches = 0  # successful and failed attempts, for tests and metrics
        self._keys: KeySet | None = None
        self._kids: frozenset[str] = frozenset()
        self._jwks_uri: str | None = None
        self._fetched_at = 0.0  # monotonic time of the last successful fetch
        self._attempted_at = float("-inf")  # ... and of the last attempt
        self._lock = asyncio.Lock()

    async def keys_for(self, kid: str | None) -> KeySet:
        """Keys to verify a token whose header names ``kid``; may fetch the JWKS (see the module doc)."""
        now = time.monotonic()
        stale = self._keys is None or now - self._fetched_at >= self.max_age_s
        unknown = kid is not None and kid not in self._kids
        if stale or (unknown and now - self._attempted_at >= self.refetch_cooldown_s):
            await self._refresh(since=self._attempted_at)
        if self._keys is None:
            raise IdentityProviderUnavailable("the identity provider's signing keys cannot be fetched")
        return self._keys

    async def _refresh(self, since: float) -> None:
        async with self._lock:
            if self._attempted_at != since:  # another request fetched while we waited
                return
            self._attempted_at = time.monotonic()
            self.fetches += 1
            try:
                jwks = await self._fetch()
            except (httpx.HTTPError, ValueError, KeyError, JoseError) as exc:
                # Keep verifying with the keys we have; without any, the caller answers 503.
                log.warning("fetching the JWKS of %s failed: %r", self.issuer, exc)
                return
            keys = [key for key in jwks.get("keys", []) if isinstance(key, dict) and key.get("kty") in _PUBLIC_KEY_TYPES
                    and key.get("use", "sig") == "sig"]
            self._keys = KeySet.import_key_set({"keys": keys})
            self._kids = frozenset(str(key["kid"]) for key in keys if "kid" in key)
            self._fetched_at = time.monotonic()

    async def _fetch(self) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=self.timeout_s, follow_redirects=False) as http:
            if self._jwks_uri is None:
                response = await http.get(discovery_url(self.issuer))
                response.raise_for_status()
                metadata = response.json()
                if metadata.get("issuer") != self.issuer:
                    raise ValueError(f"discovery document names issuer {metadata.get('issuer')!r}")
                self._jwks_uri = str(metadata["jwks_uri"])
            response = await http.get(self._jwks_uri)
            response.raise_for_status()
            jwks = response.json()
        if not isinstance(jwks, dict):
            raise ValueError("the JWKS is not a JSON object")
        return jwks


def jwks_cache(app: FastAPI) -> JwksCache:
    """The app's JWKS cache (tests may replace ``app.state.jwks_cache`` with one of their own)."""
    cache: JwksCache | None = getattr(app.state, "jwks_cache", None)
    if cache is None:
        settings: Settings = app.state.settings
        assert settings.oidc_issuer is not None
        cache = app.state.jwks_cache = JwksCache(settings.oidc_issuer)
    return cache


def _header(token: str) -> dict[str, Any]:
    if len(token) > _MAX_TOKEN_CHARS or token.count(".") != 2:
        raise InvalidCredentials("invalid bearer token: not an API key or a signed JWT")
    encoded = token.split(".", 1)[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
    except ValueError:
        raise InvalidCredentials("invalid bearer token: not an API key or a signed JWT") from None
    if not isinstance(header, dict):
        raise InvalidCredentials("invalid bearer token: malformed JWT header")
    return header


async def verify_access_token(app: FastAPI, token: str) -> dict[str, Any]:
    """The claims of a valid access token; raises :class:`InvalidCredentials` (401) otherwise."""
    settings: Settings = app.state.settings
    if not settings.oidc_issuer or not settings.oidc_audience:
        raise InvalidCredentials("bearer JWTs are not accepted here (no OIDC issuer and audience configured)")
    algorithms = allowed_algorithms(settings)
    header = _header(token)
    alg = header.get("alg")
    if alg not in algorithms:
        raise InvalidCredentials(f"JWT signing algorithm {str(alg)[:20]!r} is not accepted")
    kid = header.get("kid")
    keys = await jwks_cache(app).keys_for(kid if isinstance(kid, str) else None)
    try:
        decoded = jwt.decode(token, keys, algorithms=algorithms)
    except InvalidKeyIdError:
        raise InvalidCredentials("JWT signed with a key the identity provider does not publish") from None
    except BadSignatureError:
        raise InvalidCredentials("JWT signature does not verify") from None
    except JoseError as exc:
        raise InvalidCredentials(f"invalid JWT: {exc.error}") from None
    registry = jwt.JWTClaimsRegistry(
        leeway=LEEWAY_S,
        iss={"essential": True, "value": settings.oidc_issuer},
        aud={"essential": True, "value": settings.oidc_audience},
        exp={"essential": True},
        sub={"essential": True},
    )
    try:
        registry.validate(decoded.claims)
    except ExpiredTokenError:
        raise InvalidCredentials("JWT has expired") from None
    except MissingClaimError as exc:
        raise InvalidCredentials(f"JWT lacks required claims: {exc.claim}") from None
    except InvalidClaimError as exc:
        raise InvalidCredentials(f"JWT claim {exc.claim!r} rejected: {exc.description}") from None
    return dict(decoded.claims)


async def _pick_tenant(pg: asyncpg.Pool[asyncpg.Record], request: Request, user_id: Any,
                       groups: list[str]) -> TenantAccess:
    wanted = request.headers.get(TENANT_HEADER)
    if wanted:
        access = await tenants_of(pg, user_id, groups, only=wanted.strip())
        if not access:
            raise Forbidden(f"you are not a member of tenant {wanted.strip()[:128]!r}")
        return access[0]
    tenants = await tenants_of(pg, user_id, groups)
    if not tenants:
        raise Forbidden("you are not a member of any tenant: ask a tenant admin to add you or map your groups")
    if len(tenants) > 1:
        names = ", ".join(tenant.name for tenant in tenants)
        raise Forbidden(f"you are a member of several tenants ({names}): name one in the {TENANT_HEADER} header")
    return tenants[0]


async def bearer_ctx(request: Request, db: AsyncSession, token: str) -> Ctx:
    """The caller of an OIDC access token, in the tenant it names; ``db`` is scoped to that tenant."""
    app: FastAPI = request.app
    settings: Settings = app.state.settings
    claims = await verify_access_token(app, token)
    pg: asyncpg.Pool[asyncpg.Record] = app.state.runtime.pg
    email, name = claims.get("email"), claims.get("name")
    user = await find_or_create_user(
        pg, str(claims["iss"]), str(claims["sub"]), email=email if isinstance(email, str) else None,
        name=name if isinstance(name, str) else None,
    )
    access = await _pick_tenant(pg, request, user.id, groups_from_claims(claims, settings.oidc_groups_claim))
    await bind_tenant(db, access.id)
    return Ctx(tenant_id=access.id, principal=user.principal, roles=access.roles, ip=client_ip(request),
               user_agent=user_agent(request))
