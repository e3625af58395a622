"""The sign-in callback refuses bad ID tokens coming back from the provider's token endpoint.

Steward's back channel to the provider (token, discovery, JWKS) runs through a real forward HTTP proxy
on loopback: ``HTTP_PROXY`` names it while the callback runs, and Authlib's HTTP client (httpx, or
httpx2 when installed) honours it as in any deployment behind a proxy. The proxy passes every request
on to the real provider and, in the token endpoint's answer, replaces ``id_token`` with what the test
forges from the real one. The browser's side (login and consent pages) goes straight to the provider,
so each case is a real sign-in up to the code exchange. Forged tokens that need a valid signature are
signed with the test key the provider publishes in its JWKS (``tests.support.oidc.TEST_KEY``); the controls show
such a token is accepted when nothing else is wrong, so each refusal is down to the one thing the case
breaks.
"""

from __future__ import annotations

import base64
import json
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import uvicorn
from joserfc import jwt
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.auth.sessions import COOKIE
from tests.support.oidc import DASHBOARD_CLIENT, TEST_KEY, TEST_KID, OidcProvider
from tests.support.signin import authorize, map_groups, new_account
from tests.support.tenants import MakeTenant

SessionMaker = async_sessionmaker[AsyncSession]
# (original ID token, nonce Steward sent) -> the ID token Steward receives instead
Forge = Callable[[str, str], str]

OTHER_CLIENT = "another-dashboard"
FAILED = "Sign-in failed at the identity provider. Please try again."
# Connection-level headers a proxy does not pass on; lengths and encodings change with the body.
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "trailer", "transfer-encoding",
    "upgrade", "host", "content-length", "content-encoding", "accept-encoding",
})
_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


# --- the proxy ---------------------------------------------------------------------------------------


@dataclass
class Exchange:
    """One token endpoint answer that went through the proxy: the provider's ID token and the one sent on."""

    original: str
    sent: str


@dataclass
class TokenProxy:
    """A forward HTTP proxy in front of the provider (an ASGI app served by uvicorn in a thread)."""

    issuer: str
    token_endpoint: str
    forge: Callable[[str], str] | None = None
    exchanges: list[Exchange] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    url: str = ""
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        request = Request(scope, receive)
        target = self._target(request)
        if not target.startswith(self.issuer + "/"):
            self.failures.append(f"not the provider: {target}")
            await Response("this proxy only reaches the provider", 502)(scope, receive, send)
            return
        headers = [(name, value) for name, value in request.headers.raw if name.decode().lower() not in _HOP_BY_HOP]
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            upstream = await http.request(request.method, target, headers=headers, content=await request.body())
        content = upstream.content
        if target == self.token_endpoint and upstream.status_code == 200:
            content = self._replace_id_token(content)
        kept = {name: value for name, value in upstream.headers.items() if name.lower() not in _HOP_BY_HOP}
        await Response(content, upstream.status_code, headers=kept)(scope, receive, send)

    @staticmethod
    def _target(request: Request) -> str:
        """The URL asked for: an absolute-form request target, or the path on the ``Host``."""
        path: str = request.scope["path"]
        if path.startswith("/"):
            path = f"http://{request.headers['host']}{path}"
        query = request.scope["query_string"].decode()
        return f"{path}?{query}" if query else path

    def _replace_id_token(self, content: bytes) -> bytes:
        body = json.loads(content)
        original = body.get("id_token")
        if not isinstance(original, str):
            self.failures.append(f"token response without an ID token: {sorted(body)}")
            return content
        try:
            sent = self.forge(original) if self.forge else original
        except Exception as exc:  # a broken forgery must fail the test, not pass as a refusal
            self.failures.append(f"forging failed: {exc!r}")
            raise
        self.exchanges.append(Exchange(original, sent))
        return json.dumps({**body, "id_token": sent}).encode()

    def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(self, lifespan="off", log_level="warning", access_log=False))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert self._thread.is_alive() and time.monotonic() < deadline, "the token proxy did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)

    @contextmanager
    def in_front(self) -> Iterator[None]:
        """Route this process's HTTP (Steward's back channel included) through the proxy meanwhile."""
        with pytest.MonkeyPatch.context() as patch:
            for name in _PROXY_VARIABLES:
                patch.delenv(name, raising=False)
                patch.delenv(name.upper(), raising=False)
            patch.setenv("HTTP_PROXY", self.url)
            yield


@pytest.fixture(scope="session")
def token_proxy_server(oidc_provider: OidcProvider) -> Iterator[TokenProxy]:
    metadata = httpx.get(f"{oidc_provider.issuer}/.well-known/openid-configuration", trust_env=False,
                         timeout=10).raise_for_status().json()
    proxy = TokenProxy(issuer=oidc_provider.issuer, token_endpoint=metadata["token_endpoint"])
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def token_proxy(token_proxy_server: TokenProxy) -> Iterator[TokenProxy]:
    """The proxy with a clean record, passing ID tokens through unchanged until a test sets ``forge``."""
    proxy = token_proxy_server
    proxy.forge, proxy.exchanges, proxy.failures = None, [], []
    yield proxy
    proxy.forge = None


# --- tokens ------------------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def claims_of(token: str) -> dict[str, Any]:
    """The payload, unverified."""
    claims: dict[str, Any] = json.loads(unb64(token.split(".")[1]))
    return claims


def header_of(token: str) -> dict[str, Any]:
    header: dict[str, Any] = json.loads(unb64(token.split(".")[0]))
    return header


def signed(claims: dict[str, Any]) -> str:
    """``claims`` signed with the test key (in the provider's JWKS; the provider never signs with it)."""
    return jwt.encode({"alg": "PS256", "kid": TEST_KID}, claims, TEST_KEY, algorithms=["PS256"])


def resigned(original: str, nonce: str, /, **changes: Any) -> str:
    """The provider's claims (the nonce Steward sent, checked) with ``changes``, signed with the test key."""
    claims = claims_of(original)
    assert claims["nonce"] == nonce and claims["aud"] == DASHBOARD_CLIENT, claims
    return signed({**claims, **changes})


def unchanged(original: str, nonce: str) -> str:
    assert claims_of(original)["nonce"] == nonce
    return original


def tampered(original: str, nonce: str) -> str:
    """One character of the payload's ``sub`` changed, the provider's signature kept."""
    header, payload, signature = original.split(".")
    raw = unb64(payload)
    at = raw.index(b'"sub":"') + len(b'"sub":"')
    forged = raw[:at] + (b"Z" if raw[at:at + 1] != b"Z" else b"Y") + raw[at + 1:]
    json.loads(forged)  # still a well-formed payload: only the signature can tell
    return f"{header}.{b64(forged)}.{signature}"


def other_audience(original: str, nonce: str) -> str:
    """Issued to another client, as the provider issues them (no ``azp``)."""
    return resigned(original, nonce, aud=OTHER_CLIENT)


def other_audience_naming_us(original: str, nonce: str) -> str:
    """Another client's audience, ``azp`` naming Steward: only the audience check can refuse it."""
    return resigned(original, nonce, aud=OTHER_CLIENT, azp=DASHBOARD_CLIENT)


def expired(original: str, nonce: str) -> str:
    """Expired ten minutes ago: well beyond the two minutes' leeway for clock skew."""
    now = int(time.time())
    return resigned(original, nonce, iat=now - 3600, exp=now - 600)


def unsigned(original: str, nonce: str) -> str:
    """``alg: none``, an empty signature, the provider's claims."""
    assert claims_of(original)["nonce"] == nonce
    return f"{b64(json.dumps({'alg': 'none'}).encode())}.{original.split('.')[1]}."


def wrong_nonce(original: str, nonce: str) -> str:
    return resigned(original, nonce, nonce=secrets.token_urlsafe(16))


# --- signing in through the proxy ------------------------------------------------------------------------


@dataclass(frozen=True)
class Callback:
    """Where the provider sends the browser back, and the nonce Steward put in its authorization request."""

    url: str
    nonce: str


async def authorize_noting_nonce(app_http: httpx.AsyncClient, idp_http: httpx.AsyncClient,
                                 login: str) -> Callback:
    """The provider's login and consent pages passed; the nonce read off Steward's redirect to the provider."""
    redirects: list[str] = []

    async def note(response: httpx.Response) -> None:
        if response.request.url.path == "/auth/oidc/start":
            redirects.append(response.headers["location"])

    hooks = app_http.event_hooks
    app_http.event_hooks = {**hooks, "response": [*hooks["response"], note]}
    try:
        url = await authorize(app_http, idp_http, login)
    finally:
        app_http.event_hooks = hooks
    assert len(redirects) == 1, redirects
    return Callback(url, parse_qs(urlsplit(redirects[0]).query)["nonce"][0])


async def member(make_tenant: MakeTenant, sessionmaker: SessionMaker) -> str:
    """A new account in a group a new tenant maps to a role: signing in would open a session."""
    tenant = await make_tenant()
    group = f"eng-{secrets.token_hex(3)}"
    await map_groups(sessionmaker, tenant.tenant_id, {group: ["viewer"]})
    return new_account(group)


async def callback_through(proxy: TokenProxy, app_http: httpx.AsyncClient, callback: Callback,
                           forge: Forge) -> tuple[httpx.Response, Exchange]:
    """Complete the sign-in with the token endpoint's ID token replaced by ``forge``'s."""
    proxy.forge = lambda original: forge(original, callback.nonce)
    with proxy.in_front():
        response = await app_http.get(callback.url)
    assert proxy.failures == []
    assert len(proxy.exchanges) == 1, "Steward's code exchange did not go through the proxy"
    return response, proxy.exchanges[0]


async def users_with(sessionmaker: SessionMaker, issuer: str, subjects: set[str]) -> int:
    async with sessionmaker() as db:
        found = (await db.execute(text("SELECT count(*) FROM app_user WHERE issuer = :i AND subject = ANY(:s)"),
                                  {"i": issuer, "s": sorted(subjects)})).scalar_one()
    assert isinstance(found, int)
    return found


# --- the cases ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("forge", [unchanged, lambda original, nonce: resigned(original, nonce)],
                         ids=["provider-token-unchanged", "resigned-with-test-key"])
async def test_a_good_id_token_through_the_proxy_signs_in(
    forge: Forge, token_proxy: TokenProxy, app_http: httpx.AsyncClient, idp_http: httpx.AsyncClient,
    make_tenant: MakeTenant, sessionmaker: SessionMaker,
) -> None:
    """Controls: the proxy itself breaks nothing, and a test-key signature with right claims is accepted."""
    login = await member(make_tenant, sessionmaker)
    callback = await authorize_noting_nonce(app_http, idp_http, login)
    response, exchange = await callback_through(token_proxy, app_http, callback, forge)
    assert response.status_code == 303, response.text
    assert COOKIE in app_http.cookies
    me = await app_http.get("/auth/me")
    assert me.status_code == 200, me.text
    assert me.json()["user"]["subject"] == login
    if forge is unchanged:
        assert exchange.sent == exchange.original
    else:
        assert header_of(exchange.sent)["kid"] == TEST_KID and claims_of(exchange.sent) == claims_of(exchange.original)


@dataclass(frozen=True)
class Bad:
    forge: Forge
    # What differs from the provider's token, so the test shows only that is wrong.
    changed: Callable[[dict[str, Any], dict[str, Any], str], bool]


BAD = {
    "tampered-payload": Bad(tampered, lambda sent, original, _: (
        sent["sub"] != original["sub"] and {**sent, "sub": original["sub"]} == original)),
    "other-audience": Bad(other_audience, lambda sent, original, _: sent == {**original, "aud": OTHER_CLIENT}),
    "other-audience-azp-naming-steward": Bad(other_audience_naming_us, lambda sent, original, _: (
        sent == {**original, "aud": OTHER_CLIENT, "azp": DASHBOARD_CLIENT})),
    "expired": Bad(expired, lambda sent, original, _: (
        sent["exp"] < time.time() - 300 and {**sent, "exp": original["exp"], "iat": original["iat"]} == original)),
    "alg-none": Bad(unsigned, lambda sent, original, _: sent == original),
    "wrong-nonce": Bad(wrong_nonce, lambda sent, original, nonce: (
        sent["nonce"] != nonce and {**sent, "nonce": nonce} == original)),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
async def test_a_bad_id_token_is_refused(
    case: Bad, token_proxy: TokenProxy, app_http: httpx.AsyncClient, idp_http: httpx.AsyncClient,
    make_tenant: MakeTenant, sessionmaker: SessionMaker, oidc_provider: OidcProvider,
) -> None:
    login = await member(make_tenant, sessionmaker)
    callback = await authorize_noting_nonce(app_http, idp_http, login)
    response, exchange = await callback_through(token_proxy, app_http, callback, case.forge)

    sent, original = claims_of(exchange.sent), claims_of(exchange.original)
    assert original["nonce"] == callback.nonce and original["sub"] == login
    assert exchange.sent != exchange.original and case.changed(sent, original, callback.nonce), sent

    assert response.status_code == 401, response.text
    assert FAILED in response.text
    assert response.headers["cache-control"] == "no-store"
    assert not any(value.startswith(f"{COOKIE}=") for value in response.headers.get_list("set-cookie"))
    assert COOKIE not in app_http.cookies
    assert (await app_http.get("/auth/me")).status_code == 401
    # Refused before Steward wrote anything about the user.
    assert await users_with(sessionmaker, oidc_provider.issuer, {original["sub"], sent["sub"]}) == 0
