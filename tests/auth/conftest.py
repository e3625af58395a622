"""Sign-on fixtures: a real OpenID provider (npm ``oidc-provider``, tests/oidc/provider.mjs) and apps using it.

The provider runs as a node subprocess on a free 127.0.0.1 port, one per test process (xdist worker),
with a fresh RSA signing key per start (``restart()`` rotates it). It also publishes a PS256 key the
tests hold (``TEST_KEY``), so tests can mint tokens with claims of their choosing (expired, future
``nbf``...) that verify against the provider's JWKS; the provider never signs with it.

Accounts: any login id works at the provider's login form; ``"<name>~<group>~<group>"`` signs in a user
in those groups (see :func:`new_account`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import select
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from joserfc.jwk import RSAKey
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings

ROOT = Path(__file__).resolve().parents[2]
OIDC_DIR = ROOT / "tests" / "oidc"
# The in-process app's address (httpx ASGI transport: nothing listens there, but it is what the provider
# redirects to and what the app believes it is reached at).
APP_URL = "http://127.0.0.1:8000"
API_AUDIENCE = "https://api.steward.test"
OTHER_AUDIENCE = "https://other.steward.test"
DASHBOARD_CLIENT = "steward-dashboard"
DASHBOARD_SECRET = secrets.token_urlsafe(24)
# client_credentials clients: `robot` carries groups ["robots"], `solo` and `nobody` carry none.
ROBOT, SOLO, NOBODY = "robot", "solo", "nobody"
CLIENT_SECRET = secrets.token_urlsafe(24)
TEST_KID = "steward-test-key"
TEST_KEY = RSAKey.generate_key(2048, parameters={"kid": TEST_KID, "alg": "PS256", "use": "sig"}, private=True)
START_TIMEOUT_S = 20.0


# --- the provider ------------------------------------------------------------------------------------


def _npm_ci() -> None:
    """Install tests/oidc/node_modules from package-lock.json once (a lock: xdist workers start together)."""
    marker = OIDC_DIR / "node_modules" / "oidc-provider" / "package.json"
    if marker.exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("npm is needed for the OpenID provider of tests/auth (apt-get install -y nodejs npm)")
    with open(OIDC_DIR / ".npm-ci.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.exists():
            subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=OIDC_DIR, check=True,
                           timeout=600)


def provider_config(app_url: str) -> dict[str, Any]:
    """Clients: the dashboard (code + PKCE, redirecting to ``app_url``) and three client_credentials ones."""
    machine = {"client_secret": CLIENT_SECRET, "grant_types": ["client_credentials"], "redirect_uris": [],
               "response_types": []}
    return {
        "clients": [
            {
                "client_id": DASHBOARD_CLIENT,
                "client_secret": DASHBOARD_SECRET,
                "redirect_uris": [f"{app_url}/auth/callback"],
                "post_logout_redirect_uris": [f"{app_url}/auth/login"],
                "grant_types": ["authorization_code"],
                "response_types": ["code"],
            },
            {"client_id": ROBOT, **machine},
            {"client_id": SOLO, **machine},
            {"client_id": NOBODY, **machine},
        ],
        "resources": [API_AUDIENCE, OTHER_AUDIENCE],
        "clientGroups": {ROBOT: ["robots"]},
        "extraKeys": [TEST_KEY.as_dict(private=True)],
    }


class OidcProvider:
    """A running ``node provider.mjs``; ``issuer`` is its URL."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.port = 0
        self.issuer = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()

    def start(self) -> None:
        node = shutil.which("node")
        if node is None:
            pytest.fail("node is needed for the OpenID provider of tests/auth")
        _npm_ci()
        env = {**os.environ, "OIDC_PROVIDER_CONFIG": json.dumps(self.config)}
        self._proc = subprocess.Popen([node, str(OIDC_DIR / "provider.mjs"), str(self.port)], cwd=OIDC_DIR, env=env,
                                      stdout=subprocess.PIPE, stderr=self._log)
        assert self._proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        line = b""
        while not line.startswith(b"READY "):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._proc.poll() is not None:
                self._log.seek(0)
                self.stop()
                pytest.fail(f"the OpenID provider did not start: {self._log.read().decode(errors='replace')[-2000:]}")
            if select.select([self._proc.stdout], [], [], remaining)[0]:
                line = self._proc.stdout.readline()
        self.issuer = line.decode().split()[1]
        self.port = int(self.issuer.rsplit(":", 1)[1])

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None

    def restart(self) -> None:
        """Stop and start again on the same port: same issuer, a fresh signing key, no sessions."""
        self.stop()
        self.start()

    async def client_credentials(self, client_id: str = ROBOT, resource: str = API_AUDIENCE) -> str:
        """A JWT access token from the provider's token endpoint (client_credentials + resource indicator)."""
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.post(
                f"{self.issuer}/token", auth=(client_id, CLIENT_SECRET),
                data={"grant_type": "client_credentials", "resource": resource, "scope": "api"},
            )
        assert response.status_code == 200, response.text
        token: str = response.json()["access_token"]
        return token

    async def jwks(self) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.get(f"{self.issuer}/jwks")
        response.raise_for_status()
        keys: dict[str, Any] = response.json()
        return keys


@contextlib.contextmanager
def running_provider(config: dict[str, Any]) -> Iterator[OidcProvider]:
    provider = OidcProvider(config)
    provider.start()
    try:
        yield provider
    finally:
        provider.stop()


@pytest.fixture(scope="session")
def oidc_provider() -> Iterator[OidcProvider]:
    """The provider for this test process, its dashboard client redirecting to :data:`APP_URL`."""
    with running_provider(provider_config(APP_URL)) as provider:
        yield provider


# --- apps using it ----------------------------------------------------------------------------------


@asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[FastAPI]:
    """``create_app(settings)`` with its lifespan running."""
    from app.main import create_app

    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


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


MakeOidcApp = Callable[..., AbstractAsyncContextManager[FastAPI]]


@pytest.fixture
def make_oidc_app(oidc_settings: Settings) -> MakeOidcApp:
    """``async with make_oidc_app(session_idle_s=1.0) as app``: another app, settings overridden."""
    return lambda **update: running_app(oidc_settings.model_copy(update=update))


def app_client(application: FastAPI, base_url: str = APP_URL,
               client: tuple[str, int] = ("127.0.0.1", 50000)) -> httpx.AsyncClient:
    """An in-process client keeping its own cookies, as a browser would."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=application, client=client), base_url=base_url)


@pytest_asyncio.fixture(loop_scope="session")
async def app_http(oidc_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(oidc_app) as http:
        yield http


@pytest_asyncio.fixture(loop_scope="session")
async def idp_http() -> AsyncIterator[httpx.AsyncClient]:
    """The browser's side of the provider: real HTTP, cookies kept, redirects followed by hand."""
    async with httpx.AsyncClient(timeout=10) as http:
        yield http


# --- signing in by hand -------------------------------------------------------------------------------


def new_account(*groups: str) -> str:
    """A login id the provider has never seen, in ``groups``."""
    return "~".join([f"user-{secrets.token_hex(4)}", *groups])


class _Form(HTMLParser):
    """The first form of a page: its action and its inputs' names and values."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self._done = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "form" and self.action is None:
            self.action = attributes.get("action") or ""
        elif tag == "input" and self.action is not None and not self._done and attributes.get("name"):
            self.fields[str(attributes["name"])] = attributes.get("value") or ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._done = True


def first_form(html: str) -> _Form:
    form = _Form()
    form.feed(html)
    assert form.action is not None, html[:500]
    return form


async def authorize(app_http: httpx.AsyncClient, idp_http: httpx.AsyncClient, login: str,
                    next_: str = "/") -> str:
    """Start sign-in at the app and get through the provider's login and consent pages; the callback
    URL the provider sends the browser back to."""
    response = await app_http.get("/auth/oidc/start", params={"next": next_})
    assert response.status_code == 302, response.text
    url = response.headers["location"]
    for _ in range(12):
        if url.startswith(str(app_http.base_url)):
            return url
        response = await idp_http.get(url)
        if response.status_code in (302, 303):
            url = urljoin(url, response.headers["location"])
            continue
        assert response.status_code == 200, response.text
        form = first_form(response.text)
        fields = dict(form.fields)
        if fields.get("prompt") == "login":
            fields.update(login=login, password="anything")
        response = await idp_http.post(urljoin(url, form.action or url), data=fields)
        assert response.status_code in (302, 303), response.text
        url = urljoin(url, response.headers["location"])
    raise AssertionError("the provider never sent the browser back")


async def browser_login(app_http: httpx.AsyncClient, idp_http: httpx.AsyncClient, login: str,
                        next_: str = "/") -> httpx.Response:
    """The whole sign-in: the app's answer to the provider's redirect back (303 to ``next_`` on success)."""
    callback = await authorize(app_http, idp_http, login, next_)
    return await app_http.get(callback)


async def csrf_token(app_http: httpx.AsyncClient) -> str:
    response = await app_http.get("/auth/me")
    assert response.status_code == 200, response.text
    token: str = response.json()["csrf_token"]
    return token


# --- data ---------------------------------------------------------------------------------------------


async def map_groups(sessionmaker: async_sessionmaker[AsyncSession], tenant_id: uuid.UUID,
                     mapping: dict[str, list[str]]) -> None:
    """Set the tenant's ``role_mapping`` (group -> roles)."""
    async with sessionmaker() as db, db.begin():
        await db.execute(
            text("UPDATE tenant SET policy = policy || jsonb_build_object('role_mapping', CAST(:m AS jsonb)) "
                 "WHERE id = :t"),
            {"m": json.dumps(mapping), "t": tenant_id},
        )


async def grant(sessionmaker: async_sessionmaker[AsyncSession], tenant_id: uuid.UUID, issuer: str, subject: str,
                roles: Sequence[str]) -> uuid.UUID:
    """Make the user (created if new) a member of the tenant with ``roles``; their id."""
    async with sessionmaker() as db, db.begin():
        user_id = (await db.execute(
            text("INSERT INTO app_user (id, issuer, subject) VALUES (:id, :iss, :sub) "
                 "ON CONFLICT (issuer, subject) DO UPDATE SET subject = EXCLUDED.subject RETURNING id"),
            {"id": uuid.uuid4(), "iss": issuer, "sub": subject},
        )).scalar_one()
        await db.execute(
            text("INSERT INTO membership (tenant_id, user_id, roles) VALUES (:t, :u, :r) "
                 "ON CONFLICT (tenant_id, user_id) DO UPDATE SET roles = EXCLUDED.roles"),
            {"t": tenant_id, "u": user_id, "r": list(roles)},
        )
    assert isinstance(user_id, uuid.UUID)
    return user_id


async def audit_events(sessionmaker: async_sessionmaker[AsyncSession], tenant_id: uuid.UUID,
                       action: str) -> list[dict[str, Any]]:
    async with sessionmaker() as db:
        rows = await db.execute(
            text("SELECT actor, action, target, outcome, data, ip, user_agent FROM audit_event "
                 "WHERE tenant_id = :t AND action = :a ORDER BY seq"),
            {"t": tenant_id, "a": action},
        )
        return [dict(row) for row in rows.mappings()]


async def user_id_of(sessionmaker: async_sessionmaker[AsyncSession], issuer: str, subject: str) -> uuid.UUID:
    async with sessionmaker() as db:
        found = (await db.execute(text("SELECT id FROM app_user WHERE issuer = :i AND subject = :s"),
                                  {"i": issuer, "s": subject})).scalar_one()
    assert isinstance(found, uuid.UUID)
    return found
