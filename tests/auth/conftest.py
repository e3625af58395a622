"""Sign-on fixtures: a real OpenID provider (tests/support/oidc.py) and apps using it.

The provider runs once per test process (xdist worker); its dashboard client redirects to ``APP_URL``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from app.config import Settings
from tests.support.oidc import (
    API_AUDIENCE,
    APP_URL,
    DASHBOARD_CLIENT,
    DASHBOARD_SECRET,
    OidcProvider,
    provider_config,
    running_provider,
)
from tests.support.signin import MakeOidcApp, app_client, running_app


@pytest.fixture(scope="session")
def oidc_provider() -> Iterator[OidcProvider]:
    """The provider for this test process, its dashboard client redirecting to :data:`APP_URL`."""
    with running_provider(provider_config(APP_URL)) as provider:
        yield provider


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def oidc_settings(settings: Settings, oidc_provider: OidcProvider) -> Settings:
    return settings.model_copy(update={
        "oidc_issuer": oidc_provider.issuer,
        "oidc_client_id": DASHBOARD_CLIENT,
        "oidc_client_secret": DASHBOARD_SECRET,
        "oidc_audience": API_AUDIENCE,
        "public_url": APP_URL,
    })


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def oidc_app(oidc_settings: Settings) -> AsyncIterator[FastAPI]:
    """The API and sign-on pages with the test provider configured (sessions: the default timeouts)."""
    async with running_app(oidc_settings) as application:
        yield application


@pytest.fixture
def make_oidc_app(oidc_settings: Settings) -> MakeOidcApp:
    """``async with make_oidc_app(session_idle_s=1.0) as app``: another app, settings overridden."""
    return lambda **update: running_app(oidc_settings.model_copy(update=update))


@pytest_asyncio.fixture(loop_scope="session")
async def app_http(oidc_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(oidc_app) as http:
        yield http


@pytest_asyncio.fixture(loop_scope="session")
async def idp_http() -> AsyncIterator[httpx.AsyncClient]:
    """The browser's side of the provider: real HTTP, cookies kept, redirects followed by hand."""
    async with httpx.AsyncClient(timeout=10) as http:
        yield http
