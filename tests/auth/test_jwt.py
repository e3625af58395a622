"""OIDC access tokens as bearer credentials, verified against the real provider's JWKS.

Good tokens come from the provider's token endpoint (client_credentials with a resource indicator).
Tokens with claims the provider would never issue (expired, not yet valid, foreign issuer) are signed
with the test key the provider publishes in its JWKS (``tests.support.oidc.TEST_KEY``), so only the claim under
test is wrong.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from joserfc import jwt
from joserfc.jwk import RSAKey
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.auth.jwt import JwksCache, jwks_cache
from tests.support.oidc import API_AUDIENCE, NOBODY, OTHER_AUDIENCE, ROBOT, SOLO, TEST_KEY, TEST_KID, OidcProvider
from tests.support.signin import MakeOidcApp, app_client, grant, map_groups, user_id_of
from tests.support.tenants import MakeTenant, TenantKey

SessionMaker = async_sessionmaker[AsyncSession]
URL = "/api/v1/runs"


def b64(data: bytes | dict[str, Any]) -> str:
    raw = json.dumps(data).encode() if isinstance(data, dict) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def claims(provider: OidcProvider, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": provider.issuer, "sub": ROBOT, "aud": API_AUDIENCE, "iat": now, "exp": now + 300,
            "groups": ["robots"], **overrides}


def signed(body: dict[str, Any], *, kid: str = TEST_KID, key: RSAKey = TEST_KEY) -> str:
    return jwt.encode({"alg": "PS256", "kid": kid, "typ": "at+jwt"}, body, key, algorithms=["PS256"])


@pytest.fixture
async def robots_tenant(make_tenant: MakeTenant, sessionmaker: SessionMaker) -> TenantKey:
    """A tenant giving the `robots` group (the robot client's tokens carry it) the operator role."""
    tenant = await make_tenant()
    await map_groups(sessionmaker, tenant.tenant_id, {"robots": ["operator"]})
    return tenant


async def call(http: httpx.AsyncClient, token: str, tenant: TenantKey | str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"}
    if tenant is not None:
        headers["X-Steward-Tenant"] = tenant if isinstance(tenant, str) else tenant.name
    return await http.get(URL, headers=headers)


def assert_invalid_token(response: httpx.Response, detail: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    assert detail in response.json()["detail"], response.json()["detail"]


# --- accepted ----------------------------------------------------------------------------------------------


async def test_provider_token_is_accepted(app_http: httpx.AsyncClient, oidc_provider: OidcProvider,
                                          robots_tenant: TenantKey, sessionmaker: SessionMaker) -> None:
    token = await oidc_provider.client_credentials(ROBOT)
    by_name = await call(app_http, token, robots_tenant)
    assert by_name.status_code == 200, by_name.text
    by_id = await call(app_http, token, str(robots_tenant.tenant_id))
    assert by_id.status_code == 200, by_id.text
    # The caller is a user found by (iss, sub); its roles come from its groups: operator may start runs,
    # not write workflows.
    await user_id_of(sessionmaker, oidc_provider.issuer, ROBOT)
    denied = await app_http.post("/api/v1/workflows", headers={
        "Authorization": f"Bearer {token}", "X-Steward-Tenant": robots_tenant.name,
    }, json={"name": "x", "definition": {"steps": [{"id": "a", "tool": "echo"}]}})
    assert denied.status_code == 403, denied.text


async def test_tenant_comes_from_the_header_or_the_only_membership(
    app_http: httpx.AsyncClient, oidc_provider: OidcProvider, make_tenant: MakeTenant, sessionmaker: SessionMaker,
    robots_tenant: TenantKey,
) -> None:
    solo_tenant = await make_tenant()
    await grant(sessionmaker, solo_tenant.tenant_id, oidc_provider.issuer, SOLO, ["viewer"])
    solo = await oidc_provider.client_credentials(SOLO)
    assert (await call(app_http, solo)).status_code == 200

    elsewhere = await call(app_http, solo, robots_tenant)
    assert elsewhere.status_code == 403
    assert "not a member of tenant" in elsewhere.json()["detail"]
    missing = await call(app_http, solo, f"no-such-tenant-{secrets.token_hex(3)}")
    assert missing.status_code == 403  # same answer as "exists, not yours": names do not leak

    nobody = await call(app_http, await oidc_provider.client_credentials(NOBODY))
    assert nobody.status_code == 403
    assert "not a member of any tenant" in nobody.json()["detail"]

    second = await make_tenant()
    await map_groups(sessionmaker, second.tenant_id, {"robots": ["viewer"]})
    several = await call(app_http, await oidc_provider.client_credentials(ROBOT))
    assert several.status_code == 403
    assert "X-Steward-Tenant" in several.json()["detail"]


# --- refused ---------------------------------------------------------------------------------------------


async def test_tampered_tokens_are_refused(app_http: httpx.AsyncClient, oidc_provider: OidcProvider,
                                           robots_tenant: TenantKey) -> None:
    token = await oidc_provider.client_credentials(ROBOT)
    header, payload, signature = token.split(".")
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    assert_invalid_token(await call(app_http, f"{header}.{payload}.{flipped}", robots_tenant), "signature")

    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body["groups"] = ["admins"]
    assert_invalid_token(await call(app_http, f"{header}.{b64(body)}.{signature}", robots_tenant), "signature")
    assert_invalid_token(await call(app_http, "not-a-jwt", robots_tenant), "not an API key or a signed JWT")


async def test_token_for_another_audience_is_refused(app_http: httpx.AsyncClient, oidc_provider: OidcProvider,
                                                     robots_tenant: TenantKey) -> None:
    token = await oidc_provider.client_credentials(ROBOT, resource=OTHER_AUDIENCE)
    assert_invalid_token(await call(app_http, token, robots_tenant), "aud")


async def test_claims_are_checked(app_http: httpx.AsyncClient, oidc_provider: OidcProvider,
                                  robots_tenant: TenantKey) -> None:
    now = int(time.time())
    assert (await call(app_http, signed(claims(oidc_provider)), robots_tenant)).status_code == 200
    cases = {
        "expired": (claims(oidc_provider, exp=now - 120, iat=now - 900), "expired"),
        "not yet valid": (claims(oidc_provider, nbf=now + 600), "nbf"),
        "issued in the future": (claims(oidc_provider, iat=now + 600), "iat"),
        "other issuer": (claims(oidc_provider, iss="https://evil.example"), "iss"),
        "other audience": (claims(oidc_provider, aud=["https://a.example", "https://b.example"]), "aud"),
        "no exp": ({k: v for k, v in claims(oidc_provider).items() if k != "exp"}, "exp"),
        "no sub": ({k: v for k, v in claims(oidc_provider).items() if k != "sub"}, "sub"),
    }
    for name, (body, detail) in cases.items():
        response = await call(app_http, signed(body), robots_tenant)
        assert response.status_code == 401, name
        assert detail in response.json()["detail"], (name, response.json()["detail"])
    # A list audience naming us is fine.
    listed = claims(oidc_provider, aud=["https://a.example", API_AUDIENCE])
    assert (await call(app_http, signed(listed), robots_tenant)).status_code == 200


async def test_alg_none_is_refused(app_http: httpx.AsyncClient, oidc_provider: OidcProvider,
                                   robots_tenant: TenantKey) -> None:
    body = b64(claims(oidc_provider))
    for alg in ("none", "None", "NONE"):
        unsigned = f"{b64({'alg': alg, 'typ': 'JWT'})}.{body}."
        assert_invalid_token(await call(app_http, unsigned, robots_tenant), "algorithm")
    # Even with a kid the provider publishes.
    unsigned = f"{b64({'alg': 'none', 'kid': TEST_KID})}.{body}."
    assert_invalid_token(await call(app_http, unsigned, robots_tenant), "algorithm")


async def test_hmac_signed_with_the_public_key_is_refused(app_http: httpx.AsyncClient, oidc_provider: OidcProvider,
                                                           robots_tenant: TenantKey) -> None:
    """The classic key-confusion attack: HS256 with the provider's public key as the shared secret."""
    jwks = await oidc_provider.jwks()
    provider_key = next(key for key in jwks["keys"] if key["kid"] != TEST_KID)
    public_pem = RSAKey.import_key(provider_key).as_pem(private=False)
    for secret in (public_pem, public_pem.strip(), json.dumps(provider_key).encode()):
        head = b64({"alg": "HS256", "kid": provider_key["kid"], "typ": "JWT"})
        body = b64(claims(oidc_provider))
        mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
        assert_invalid_token(await call(app_http, f"{head}.{body}.{b64(mac)}", robots_tenant), "algorithm")


async def test_bearer_jwts_are_refused_without_an_audience(make_oidc_app: MakeOidcApp, oidc_provider: OidcProvider,
                                                           robots_tenant: TenantKey) -> None:
    async with make_oidc_app(oidc_audience=None) as application, app_client(application) as http:
        token = await oidc_provider.client_credentials(ROBOT)
        assert_invalid_token(await call(http, token, robots_tenant), "not accepted")


# --- keys ------------------------------------------------------------------------------------------------


async def test_rotated_keys_are_fetched_again(oidc_app: FastAPI, app_http: httpx.AsyncClient,
                                              oidc_provider: OidcProvider, robots_tenant: TenantKey) -> None:
    shared = jwks_cache(oidc_app)
    cache = oidc_app.state.jwks_cache = JwksCache(oidc_provider.issuer, refetch_cooldown_s=0.3)
    try:
        old = await oidc_provider.client_credentials(ROBOT)
        assert (await call(app_http, old, robots_tenant)).status_code == 200
        assert cache.fetches == 1
        oidc_provider.restart()  # a fresh signing key, a new kid
        new = await oidc_provider.client_credentials(ROBOT)
        assert new.split(".")[0] != old.split(".")[0]
        await asyncio.sleep(0.3)
        assert (await call(app_http, new, robots_tenant)).status_code == 200
        assert cache.fetches == 2
        # The old key is gone from the JWKS: its tokens stop verifying.
        await asyncio.sleep(0.3)
        assert_invalid_token(await call(app_http, old, robots_tenant), "does not publish")
    finally:
        oidc_app.state.jwks_cache = shared


async def test_unknown_kids_refetch_at_most_once_per_cooldown(oidc_app: FastAPI, app_http: httpx.AsyncClient,
                                                              oidc_provider: OidcProvider,
                                                              robots_tenant: TenantKey) -> None:
    shared = jwks_cache(oidc_app)
    cache = oidc_app.state.jwks_cache = JwksCache(oidc_provider.issuer, refetch_cooldown_s=60)
    try:
        assert (await call(app_http, signed(claims(oidc_provider)), robots_tenant)).status_code == 200
        forged = [signed(claims(oidc_provider), kid=f"unknown-{n}") for n in range(20)]
        responses = await asyncio.gather(*(call(app_http, token, robots_tenant) for token in forged))
        for response in responses:
            assert_invalid_token(response, "does not publish")
        assert cache.fetches == 1
        # Known keys keep working meanwhile.
        assert (await call(app_http, signed(claims(oidc_provider)), robots_tenant)).status_code == 200
    finally:
        oidc_app.state.jwks_cache = shared
