"""The OpenID Connect client the dashboard signs people in with (users and roles: app/auth/users.py).

- The Authlib client reads the provider's discovery document once per process; it runs authorization
  code + PKCE (S256) and checks state, nonce and the ID token (signature against the provider's JWKS,
  issuer, audience, expiry), accepting only the ``oidc_algorithms`` the provider also advertises.
  Issuer and audience are checked only because we ask (:func:`id_token_claims_options`): Authlib alone
  checks ``aud`` through ``azp`` only.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import httpx
import httpx2
from authlib.integrations.starlette_client import OAuth
from fastapi import FastAPI

from app.config import Settings
from app.errors import AppError

log = logging.getLogger(__name__)

CLIENT_NAME = "steward"
# Signing algorithms that use a public key. HMAC ("HS256"...) would verify with a secret shared with the
# provider (or, in the classic attack, with the provider's *public* key used as the secret); "none" with
# nothing at all.
ASYMMETRIC_ALGORITHMS = frozenset({
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA", "Ed25519", "Ed448",
})

# Authlib's client talks httpx2 (installed with Steward), whose errors are not httpx's.
HTTP_ERRORS: tuple[type[Exception], ...] = (httpx.HTTPError, httpx2.HTTPError)


class IdentityProviderUnavailable(AppError):
    status = 503
    type = "identity-provider-unavailable"
    title = "Identity provider unavailable"


def oidc_configured(settings: Settings) -> bool:
    return bool(settings.oidc_issuer and settings.oidc_client_id)


def allowed_algorithms(settings: Settings) -> list[str]:
    """The configured ``oidc_algorithms`` that sign with a public key (``none`` and HMAC are dropped)."""
    configured = [alg.strip() for alg in settings.oidc_algorithms.split(",") if alg.strip()]
    refused = [alg for alg in configured if alg not in ASYMMETRIC_ALGORITHMS]
    if refused:
        log.warning("oidc_algorithms: ignoring %s (only public-key signatures are accepted)", ", ".join(refused))
    return [alg for alg in configured if alg in ASYMMETRIC_ALGORITHMS]


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


def id_token_claims_options(settings: Settings) -> dict[str, Any]:
    """The ID token must name our issuer and list our client id among its audiences (OIDC Core 3.1.3.7).

    Authlib, left to itself, checks ``iss`` but not ``aud``: a token for another client carrying
    ``azp`` = our client id would sign in. A fresh dict per call: Authlib pops keys from it.
    """
    return {
        "iss": {"essential": True, "values": [settings.oidc_issuer]},
        "aud": {"essential": True, "values": [settings.oidc_client_id]},
    }


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
