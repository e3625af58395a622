"""Dashboard sign-on through a real OpenID provider: code + PKCE, sessions, roles from groups, tenant
switching, timeouts, sign-out with the provider's end-session endpoint, CSRF, cookie flags."""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.auth.sessions import COOKIE
from tests.support.oidc import APP_URL, DASHBOARD_CLIENT, OidcProvider
from tests.support.signin import (
    MakeOidcApp,
    app_client,
    audit_events,
    authorize,
    browser_login,
    csrf_token,
    grant,
    map_groups,
    new_account,
    user_id_of,
)
from tests.support.tenants import MakeTenant, TenantKey

SessionMaker = async_sessionmaker[AsyncSession]


def group(name: str) -> str:
    return f"{name}-{secrets.token_hex(3)}"


def workflow(name: str | None = None) -> dict[str, Any]:
    return {"name": name or f"wf-{secrets.token_hex(4)}", "definition": {"steps": [{"id": "a", "tool": "echo"}]}}


async def signed_in_tenant(make_tenant: MakeTenant, sessionmaker: SessionMaker, roles: list[str]
                           ) -> tuple[TenantKey, str]:
    """A new tenant mapping a new group to ``roles``, and a new account in that group."""
    tenant = await make_tenant()
    eng = group("eng")
    await map_groups(sessionmaker, tenant.tenant_id, {eng: roles})
    return tenant, new_account(eng)


# --- the sign-in page and the round trip ---------------------------------------------------------------


async def test_login_page_offers_the_provider_only(app_http: httpx.AsyncClient, oidc_provider: OidcProvider) -> None:
    response = await app_http.get("/auth/login", params={"next": "/runs"})
    assert response.status_code == 200
    assert f"Sign in with {urlsplit(oidc_provider.issuer).netloc}" in response.text
    assert 'href="/auth/oidc/start?next=/runs"' in response.text
    assert "/auth/local" not in response.text and "local sign-in" not in response.text


async def test_start_redirects_with_pkce_state_and_nonce(app_http: httpx.AsyncClient,
                                                           oidc_provider: OidcProvider) -> None:
    response = await app_http.get("/auth/oidc/start")
    assert response.status_code == 302
    location = urlsplit(response.headers["location"])
    assert f"{location.scheme}://{location.netloc}" == oidc_provider.issuer
    query = {key: values[0] for key, values in parse_qs(location.query).items()}
    assert query["client_id"] == DASHBOARD_CLIENT
    assert query["response_type"] == "code"
    assert query["redirect_uri"] == f"{APP_URL}/auth/callback"
    assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) == 43
    assert query["state"] and query["nonce"]
    assert set(query["scope"].split()) == {"openid", "profile", "email", "groups"}
    flow_cookie = response.headers["set-cookie"]
    assert "steward_oidc_flow=" in flow_cookie and "HttpOnly" in flow_cookie and "Path=/auth" in flow_cookie


async def test_sign_in_gives_a_session_that_works_on_the_api(
    app_http: httpx.AsyncClient, idp_http: httpx.AsyncClient, make_tenant: MakeTenant, sessionmaker: SessionMaker,
    oidc_provider: OidcProvider,
) -> None:
    tenant, login = await signed_in_tenant(make_tenant, sessionmaker, ["operator"])
    response = await browser_login(app_http, idp_http, login, next_="/runs?status=running")
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/runs?status=running"

    # Cookie flags: HttpOnly, SameSite=Lax, no Secure on loopback; lives no longer than the session.
    cookie = next(value for value in response.headers.get_list("set-cookie") if value.startswith(f"{COOKIE}="))
    flags = {part.strip().split("=")[0].lower(): part for part in cookie.split(";")}
    assert "httponly" in flags and flags["samesite"].strip().lower() == "samesite=lax"
    assert "secure" not in flags and "path" in flags

    runs = await app_http.get("/api/v1/runs")
    assert runs.status_code == 200, runs.text
    me = (await app_http.get("/auth/me")).json()
    user_id = await user_id_of(sessionmaker, oidc_provider.issuer, login)
    assert me["user"]["id"] == str(user_id) and me["user"]["email"].endswith("@example.test")
    assert me["tenant"]["id"] == str(tenant.tenant_id)
    assert me["roles"] == ["operator"]

    events = await audit_events(sessionmaker, tenant.tenant_id, "auth.sign_in")
    assert len(events) == 1
    assert events[0]["actor"] == f"user:{user_id}" and events[0]["outcome"] == "ok"
    assert events[0]["ip"] == "127.0.0.1" and events[0]["data"]["method"] == "oidc"


async def test_groups_map_to_roles_on_top_of_membership(
    app_http: httpx.AsyncClient, idp_http: httpx.AsyncClient, make_tenant: MakeTenant, sessionmaker: SessionMaker,
    oidc_provider: OidcProvider, oidc_app: FastAPI,
) -> None:
    tenant = await make_tenant()
    readers, writers = group("readers"), group("writers")
    await map_groups(sessionmaker, tenant.tenant_id, {readers: ["viewer"], writers: ["author"], "other": ["admin"]})
    login = new_account(readers)
    await grant(sessionmaker, tenant.tenant_id, oidc_provider.issuer, login, ["approver"])
    assert (await browser_login(app_http, idp_http, login)).status_code == 303

    me = (await app_http.get("/auth/me")).json()
    assert me["roles"] == ["approver", "viewer"]
    # Neither role may write workflows (author may).
    headers = {"X-CSRF-Token": me["csrf_token"]}
    denied = await app_http.post("/api/v1/workflows", json=workflow(), headers=headers)
    assert denied.status_code == 403, denied.text

    writer = new_account(writers)
    async with app_client(oidc_app) as other:
        async with httpx.AsyncClient(timeout=10) as idp:
            assert (await browser_login(other, idp, writer)).status_code == 303
        token = await csrf_token(other)
        created = await other.post("/api/v1/workflows", json=workflow(), headers={"X-CSRF-Token": token})
        assert created.status_code == 201, created.text


async def test_member_of_two_tenants_switches_between_them(
    app_http: httpx.AsyncClient, idp_http: httpx.AsyncClient, make_tenant: MakeTenant, sessionmaker: SessionMaker,
    oidc_provider: OidcProvider,
) -> None:
    first = await make_tenant(name=f"a-{secrets.token_hex(6)}")
    second = await make_tenant(name=f"b-{secrets.token_hex(6)}")
    elsewhere = await make_tenant()
    ops = group("ops")
    await map_groups(sessionmaker, second.tenant_id, {ops: ["operator"]})
    login = new_account(ops)
    await grant(sessionmaker, first.tenant_id, oidc_provider.issuer, login, ["viewer"])
    name = f"only-in-b-{secrets.token_hex(3)}"
    created = await app_http.post("/api/v1/workflows", json=workflow(name), headers=second.headers)
    assert created.status_code == 201, created.text

    assert (await browser_login(app_http, idp_http, login)).status_code == 303
    me = (await app_http.get("/auth/me")).json()
    assert me["tenant"]["id"] == str(first.tenant_id) and me["roles"] == ["viewer"]
    assert [(t["id"], t["roles"]) for t in me["tenants"]] == [
        (str(first.tenant_id), ["viewer"]), (str(second.tenant_id), ["operator"])]
    listed = (await app_http.get("/api/v1/workflows")).json()["items"]
    assert name not in [item["name"] for item in listed]

    switched = await app_http.post("/auth/tenant", data={"tenant": second.name, "csrf_token": me["csrf_token"],
                                                         "next": "/workflows"})
    assert switched.status_code == 303, switched.text
    assert switched.headers["location"] == "/workflows"
    me = (await app_http.get("/auth/me")).json()
    assert me["tenant"]["id"] == str(second.tenant_id) and me["roles"] == ["operator"]
    listed = (await app_http.get("/api/v1/workflows")).json()["items"]
    assert name in [item["name"] for item in listed]
    events = await audit_events(sessionmaker, second.tenant_id, "auth.switch_tenant")
    assert [event["target"] for event in events] == [f"tenant:{second.tenant_id}"]

    # By id works too; a tenant they are not a member of does not.
    back = await app_http.post("/auth/tenant", data={"tenant": str(first.tenant_id), "csrf_token": me["csrf_token"]})
    assert back.status_code == 303
    refused = await app_http.post("/auth/tenant", data={"tenant": elsewhere.name, "csrf_token": me["csrf_token"]})
    assert refused.status_code == 403
    assert refused.headers["content-type"] == "application/problem+json"
    assert (await app_http.get("/auth/me")).json()["tenant"]["id"] == str(first.tenant_id)


async def test_revoked_membership_takes_effect_at_once(
    app_http: httpx.AsyncClient, idp_http: httpx.AsyncClient, make_tenant: MakeTenant, sessionmaker: SessionMaker,
    oidc_provider: OidcProvider,
) -> None:
    tenant = await make_tenant()
    login = new_account()
    await grant(sessionmaker, tenant.tenant_id, oidc_provider.issuer, login, ["viewer"])
    assert (await browser_login(app_http, idp_http, login)).status_code == 303
    assert (await app_http.get("/api/v1/runs")).status_code == 200
    await grant(sessionmaker, tenant.tenant_id, oidc_provider.issuer, login, [])
    response = await app_http.get("/api/v1/runs")
    assert response.status_code == 403
    assert "no longer a member" in response.json()["detail"]


async def test_user_of_no_tenant_is_refused(
    app_http: httpx.AsyncClient, idp_http: httpx.AsyncClient,
) -> None:
    response = await browser_login(app_http, idp_http, new_account(group("nobody")))
    assert response.status_code == 403
    assert "not a member of any tenant" in response.text
    assert COOKIE not in app_http.cookies
    assert (await app_http.get("/auth/me")).status_code == 401


# --- the callback's checks -------------------------------------------------------------------------------


async def test_callback_without_the_flow_cookie_is_refused(
    app_http: httpx.AsyncClient, idp_http: httpx.AsyncClient, make_tenant: MakeTenant, sessionmaker: SessionMaker,
) -> None:
    """A code delivered to another browser (login CSRF / code injection) does not sign that browser in."""
    _, login = await signed_in_tenant(make_tenant, sessionmaker, ["viewer"])
    callback = await authorize(app_http, idp_http, login)
    app_http.cookies.clear()
    response = await app_http.get(callback)
    assert response.status_code == 400
    assert "started in another browser" in response.text
    assert COOKIE not in app_http.cookies


async def test_callback_with_a_wrong_state_is_refused(
    app_http: httpx.AsyncClient, idp_http: httpx.AsyncClient, make_tenant: MakeTenant, sessionmaker: SessionMaker,
) -> None:
    _, login = await signed_in_tenant(make_tenant, sessionmaker, ["viewer"])
    callback = urlsplit(await authorize(app_http, idp_http, login))
    query = {key: values[0] for key, values in parse_qs(callback.query).items()}
    query["state"] = "forged-" + query["state"]
    response = await app_http.get("/auth/callback", params=query)
    assert response.status_code == 401
    assert COOKIE not in app_http.cookies


async def test_a_callback_completes_only_once(
    app_http: httpx.AsyncClient, idp_http: httpx.AsyncClient, make_tenant: MakeTenant, sessionmaker: SessionMaker,
) -> None:
    _, login = await signed_in_tenant(make_tenant, sessionmaker, ["viewer"])
    callback = await authorize(app_http, idp_http, login)
    flow_cookie = app_http.cookies.get("steward_oidc_flow")
    assert (await app_http.get(callback)).status_code == 303
    app_http.cookies.set("steward_oidc_flow", flow_cookie or "", domain="127.0.0.1", path="/auth")
    assert (await app_http.get(callback)).status_code == 400


# --- timeouts ---------------------------------------------------------------------------------------------


@asynccontextmanager
async def _signed_in(application: FastAPI, make_tenant: MakeTenant, sessionmaker: SessionMaker
                     ) -> AsyncIterator[httpx.AsyncClient]:
    """A browser signed in to ``application`` as a viewer of a new tenant."""
    _, login = await signed_in_tenant(make_tenant, sessionmaker, ["viewer"])
    async with app_client(application) as http, httpx.AsyncClient(timeout=10) as idp:
        assert (await browser_login(http, idp, login)).status_code == 303
        yield http


async def test_session_ends_after_idle_timeout(make_oidc_app: MakeOidcApp, make_tenant: MakeTenant,
                                               sessionmaker: SessionMaker) -> None:
    async with make_oidc_app(session_idle_s=1.0, session_absolute_s=30.0) as application:
        async with _signed_in(application, make_tenant, sessionmaker) as http:
            for _ in range(3):  # activity keeps it alive past the idle timeout
                await asyncio.sleep(0.5)
                assert (await http.get("/api/v1/runs")).status_code == 200
            await asyncio.sleep(1.2)
            response = await http.get("/api/v1/runs")
            assert response.status_code == 401
            assert (await http.get("/auth/me")).status_code == 401


async def test_session_ends_after_absolute_timeout(make_oidc_app: MakeOidcApp, make_tenant: MakeTenant,
                                                   sessionmaker: SessionMaker) -> None:
    async with make_oidc_app(session_idle_s=1.0, session_absolute_s=2.5) as application:
        async with _signed_in(application, make_tenant, sessionmaker) as http:
            me = (await http.get("/auth/me")).json()
            assert me["idle_expires_at"] < me["expires_at"]
            # Sent by hand: the browser drops the cookie itself (Max-Age), the server must not need that.
            cookie = {"Cookie": f"{COOKIE}={http.cookies[COOKIE]}"}
            statuses = []
            async with app_client(application) as raw:
                for _ in range(7):  # never idle for 1 s, yet over after 2.5 s
                    await asyncio.sleep(0.45)
                    statuses.append((await raw.get("/api/v1/runs", headers=cookie)).status_code)
            assert statuses[:3] == [200, 200, 200]
            assert statuses[-1] == 401
            async with sessionmaker() as db:
                left = (await db.execute(text("SELECT count(*) FROM web_session WHERE user_id = :u"),
                                         {"u": me["user"]["id"]})).scalar_one()
            assert left == 0


# --- sign-out and CSRF ------------------------------------------------------------------------------------


async def test_logout_ends_the_session_and_redirects_to_the_provider(
    app_http: httpx.AsyncClient, idp_http: httpx.AsyncClient, make_tenant: MakeTenant, sessionmaker: SessionMaker,
    oidc_provider: OidcProvider,
) -> None:
    tenant, login = await signed_in_tenant(make_tenant, sessionmaker, ["viewer"])
    assert (await browser_login(app_http, idp_http, login)).status_code == 303
    stolen = app_http.cookies[COOKIE]
    response = await app_http.post("/auth/logout", data={"csrf_token": await csrf_token(app_http)})
    assert response.status_code == 303
    location = urlsplit(response.headers["location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == f"{oidc_provider.issuer}/session/end"
    query = {key: values[0] for key, values in parse_qs(location.query).items()}
    assert query["post_logout_redirect_uri"] == f"{APP_URL}/auth/login"
    assert query["id_token_hint"].count(".") == 2 and query["client_id"] == DASHBOARD_CLIENT
    assert COOKIE not in app_http.cookies

    # The provider accepts it (its own confirmation page), and the old cookie no longer works anywhere.
    end = await idp_http.get(response.headers["location"])
    assert end.status_code == 200, end.text
    app_http.cookies.set(COOKIE, stolen, domain="127.0.0.1")
    assert (await app_http.get("/api/v1/runs")).status_code == 401
    user_id = await user_id_of(sessionmaker, oidc_provider.issuer, login)
    events = await audit_events(sessionmaker, tenant.tenant_id, "auth.sign_out")
    assert [(event["actor"], event["outcome"]) for event in events] == [(f"user:{user_id}", "ok")]


async def test_forms_and_cookie_writes_need_the_csrf_token(
    app_http: httpx.AsyncClient, idp_http: httpx.AsyncClient, make_tenant: MakeTenant, sessionmaker: SessionMaker,
) -> None:
    tenant, login = await signed_in_tenant(make_tenant, sessionmaker, ["admin"])
    assert (await browser_login(app_http, idp_http, login)).status_code == 303
    token = await csrf_token(app_http)
    for data in ({}, {"csrf_token": "wrong"}, {"csrf_token": ""}):
        for path in ("/auth/logout", "/auth/tenant"):
            response = await app_http.post(path, data={**data, "tenant": tenant.name})
            assert response.status_code == 403, (path, data, response.text)
            assert response.headers["content-type"] == "application/problem+json"
            assert "CSRF" in response.json()["detail"]
    # API writes authenticated by the cookie alone need the header too; reads do not.
    refused = await app_http.post("/api/v1/workflows", json=workflow())
    assert refused.status_code == 403 and "CSRF" in refused.json()["detail"]
    wrong = await app_http.post("/api/v1/workflows", json=workflow(), headers={"X-CSRF-Token": token[::-1]})
    assert wrong.status_code == 403
    assert (await app_http.post("/api/v1/workflows", json=workflow(),
                                headers={"X-CSRF-Token": token})).status_code == 201
    # Still signed in after all the refusals.
    assert (await app_http.get("/auth/me")).status_code == 200


async def test_forged_or_unknown_cookies_are_not_sessions(
    app_http: httpx.AsyncClient, idp_http: httpx.AsyncClient, make_tenant: MakeTenant, sessionmaker: SessionMaker,
) -> None:
    _, login = await signed_in_tenant(make_tenant, sessionmaker, ["viewer"])
    assert (await browser_login(app_http, idp_http, login)).status_code == 303
    token, _, mac = app_http.cookies[COOKIE].partition(".")
    for forged in (token, f"{token}.{mac[::-1]}", f"{secrets.token_urlsafe(32)}.{mac}", "x" * 300):
        app_http.cookies.set(COOKIE, forged, domain="127.0.0.1")
        response = await app_http.get("/api/v1/runs")
        assert response.status_code == 401, forged


async def test_cookies_are_secure_when_not_on_loopback(make_oidc_app: MakeOidcApp) -> None:
    async with make_oidc_app(public_url="https://steward.example.test") as application:
        async with app_client(application, base_url="https://steward.example.test") as http:
            response = await http.get("/auth/oidc/start")
    assert response.status_code == 302
    assert parse_qs(urlsplit(response.headers["location"]).query)["redirect_uri"] == [
        "https://steward.example.test/auth/callback"]
    assert "Secure" in response.headers["set-cookie"]


async def test_me_needs_a_session(app_http: httpx.AsyncClient) -> None:
    response = await app_http.get("/auth/me")
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"


async def test_next_never_leaves_the_site(app_http: httpx.AsyncClient) -> None:
    for target in ("https://evil.example", "//evil.example/x", "/\\evil.example"):
        response = await app_http.get("/auth/login", params={"next": target})
        assert 'href="/auth/oidc/start?next=/"' in response.text, target


async def test_id_tokens_must_use_an_allowed_algorithm(make_oidc_app: MakeOidcApp) -> None:
    """The provider signs ID tokens with RS256 only: allowing ES256 alone leaves no common algorithm."""
    async with make_oidc_app(oidc_algorithms="ES256,HS256,none") as application, app_client(application) as http:
        response = await http.get("/auth/oidc/start")
    assert response.status_code == 503
    assert response.json()["type"].endswith("/identity-provider-unavailable")
    assert "no algorithm Steward accepts" in response.json()["detail"]


async def test_an_unreachable_provider_is_a_503_not_a_crash(make_oidc_app: MakeOidcApp) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    async with make_oidc_app(oidc_issuer=closed) as application, app_client(application) as http:
        response = await http.get("/auth/oidc/start")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith("/identity-provider-unavailable")
