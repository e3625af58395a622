"""Local sign-in of the bootstrap admin: only with no identity provider, only from this machine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import httpx
import pytest_asyncio
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.auth.local import LOCAL_ADMIN, ensure_local_admin, hash_password, verify_password
from app.auth.sessions import COOKIE
from app.auth.web import LOCAL_NOTE
from app.config import Settings
from app.pg import asyncpg_dsn, driver
from tests.support.browser import local_admin as bootstrap_admin
from tests.support.signin import app_client, audit_events, first_form
from tests.support.tenants import MakeTenant, TenantKey

SessionMaker = async_sessionmaker[AsyncSession]


@dataclass(frozen=True)
class LocalAdmin:
    tenant: TenantKey
    password: str


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def local_admin(settings: Settings, make_tenant: MakeTenant) -> LocalAdmin:
    """The bootstrap admin, admin of a new tenant, with the password ``ensure_local_admin`` printed."""
    tenant = await make_tenant()
    # Through the shared helper: every test of this process then knows the same password.
    return LocalAdmin(tenant, (await bootstrap_admin(settings, tenant.tenant_id)).password)


@pytest_asyncio.fixture(loop_scope="session")
async def browser(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A browser on this machine (peer 127.0.0.1, Host 127.0.0.1:8000), app without identity provider."""
    async with app_client(app) as http:
        yield http


async def sign_in(http: httpx.AsyncClient, password: str, username: str = LOCAL_ADMIN,
                  next_: str = "/") -> httpx.Response:
    page = await http.get("/auth/login", params={"next": next_})
    assert page.status_code == 200, page.text
    fields = first_form(page.text).fields
    return await http.post("/auth/local", data={**fields, "username": username, "password": password})


async def test_login_page_says_local_sign_in_is_for_this_machine_only(browser: httpx.AsyncClient) -> None:
    page = await browser.get("/auth/login")
    assert page.status_code == 200
    assert LOCAL_NOTE in page.text
    assert "local sign-in: available on this machine only because no identity provider is configured" in page.text
    form = first_form(page.text)
    assert form.action == "/auth/local"
    assert form.fields["csrf_token"] == browser.cookies["steward_login_csrf"]
    assert "Sign in with" not in page.text


async def test_sign_in_with_the_bootstrap_password(browser: httpx.AsyncClient, local_admin: LocalAdmin,
                                                   sessionmaker: SessionMaker) -> None:
    response = await sign_in(browser, local_admin.password, next_="/runs")
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/runs"
    assert COOKIE in browser.cookies
    me = (await browser.get("/auth/me")).json()
    assert me["user"]["issuer"] == "local" and me["user"]["subject"] == LOCAL_ADMIN
    assert str(local_admin.tenant.tenant_id) in [tenant["id"] for tenant in me["tenants"]]
    if me["tenant"]["id"] != str(local_admin.tenant.tenant_id):
        switched = await browser.post("/auth/tenant", data={"tenant": str(local_admin.tenant.tenant_id),
                                                            "csrf_token": me["csrf_token"]})
        assert switched.status_code == 303
    assert (await browser.get("/auth/me")).json()["roles"] == ["admin"]
    assert (await browser.get("/api/v1/runs")).status_code == 200

    events = await audit_events(sessionmaker, me["tenant"]["id"], "auth.sign_in")
    assert events[-1]["actor"] == f"user:{me['user']['id']}" and events[-1]["data"]["method"] == "local"
    assert events[-1]["outcome"] == "ok" and events[-1]["ip"] == "127.0.0.1"

    out = await browser.post("/auth/logout", data={"csrf_token": me["csrf_token"]})
    assert out.status_code == 303
    assert out.headers["location"] == "http://127.0.0.1:8000/auth/login?signed_out=1"
    assert (await browser.get("/api/v1/runs")).status_code == 401
    page = await browser.get(out.headers["location"])
    assert "You have signed out." in page.text
    signed_out = await audit_events(sessionmaker, local_admin.tenant.tenant_id, "auth.sign_out")
    assert signed_out[-1]["actor"] == f"user:{me['user']['id']}"


async def test_wrong_password_is_refused_and_audited(browser: httpx.AsyncClient, local_admin: LocalAdmin,
                                                     sessionmaker: SessionMaker) -> None:
    response = await sign_in(browser, local_admin.password + "x")
    assert response.status_code == 401
    assert "Wrong user name or password." in response.text
    assert COOKIE not in browser.cookies
    events = await audit_events(sessionmaker, local_admin.tenant.tenant_id, "auth.sign_in")
    assert events[-1]["outcome"] == "denied"
    assert events[-1]["data"] == {"method": "local", "reason": "wrong password"}
    assert "password" not in str(events[-1]["data"]).replace("wrong password", "")


async def test_unknown_user_is_refused(browser: httpx.AsyncClient, local_admin: LocalAdmin) -> None:
    response = await sign_in(browser, local_admin.password, username="root")
    assert response.status_code == 401
    assert COOKIE not in browser.cookies


async def test_refused_when_host_is_not_loopback(app: FastAPI, local_admin: LocalAdmin) -> None:
    async with app_client(app, base_url="http://steward.example.test") as http:
        page = await http.get("/auth/login")
        assert page.status_code == 403
        assert 'action="/auth/local"' not in page.text
        response = await http.post("/auth/local", data={"username": LOCAL_ADMIN, "password": local_admin.password})
    assert response.status_code == 403
    assert response.headers["content-type"] == "application/problem+json"
    assert "only available on this machine" in response.json()["detail"]


async def test_refused_when_the_client_is_not_loopback(app: FastAPI, local_admin: LocalAdmin) -> None:
    """A proxy could forward a remote browser with Host 127.0.0.1: the peer address counts too."""
    async with app_client(app, client=("192.0.2.7", 40000)) as http:
        response = await http.post("/auth/local", data={"username": LOCAL_ADMIN, "password": local_admin.password})
    assert response.status_code == 403
    async with app_client(app, client=("::1", 40000)) as http:
        assert (await sign_in(http, local_admin.password)).status_code == 303


async def test_csrf_token_is_required(browser: httpx.AsyncClient, local_admin: LocalAdmin) -> None:
    await browser.get("/auth/login")
    for token in (None, "wrong"):
        data = {"username": LOCAL_ADMIN, "password": local_admin.password}
        if token is not None:
            data["csrf_token"] = token
        response = await browser.post("/auth/local", data=data)
        assert response.status_code == 403
        assert "CSRF" in response.json()["detail"]
    assert COOKIE not in browser.cookies


async def test_refused_when_an_identity_provider_is_configured(app_http: httpx.AsyncClient,
                                                               local_admin: LocalAdmin) -> None:
    page = await app_http.get("/auth/login")
    assert LOCAL_NOTE not in page.text and "/auth/local" not in page.text
    response = await app_http.post("/auth/local", data={"username": LOCAL_ADMIN, "password": local_admin.password})
    assert response.status_code == 403
    assert "identity provider is configured" in response.json()["detail"]


async def test_ensure_local_admin_sets_a_password_once(settings: Settings, make_tenant: MakeTenant,
                                                       local_admin: LocalAdmin, sessionmaker: SessionMaker) -> None:
    other = await make_tenant()
    assert settings.database_url is not None
    conn = await asyncpg.connect(asyncpg_dsn(settings.database_url))
    try:
        assert await ensure_local_admin(conn, other.tenant_id) is None
        assert await ensure_local_admin(conn, other.tenant_id) is None
    finally:
        await conn.close()
    async with sessionmaker() as db:
        stored = (await db.execute(text(
            "SELECT password_hash FROM app_user WHERE issuer = 'local' AND subject = 'admin'"))).scalar_one()
        roles = (await db.execute(
            text("SELECT m.roles FROM membership m JOIN app_user u ON u.id = m.user_id "
                 "WHERE u.issuer = 'local' AND u.subject = 'admin' AND m.tenant_id = :t"),
            {"t": other.tenant_id})).scalar_one()
    assert roles == ["admin"]
    assert stored.startswith("scrypt$") and local_admin.password not in stored
    assert verify_password(local_admin.password, stored)
    assert not verify_password(local_admin.password + "x", stored)
    assert not verify_password(local_admin.password, None)
    assert hash_password("same") != hash_password("same")  # salted


async def test_ensure_local_admin_on_a_session_connection(make_tenant: MakeTenant, local_admin: LocalAdmin,
                                                          sessionmaker: SessionMaker) -> None:
    """As `steward bootstrap` calls it: on the asyncpg connection under its SQLAlchemy session."""
    other = await make_tenant()
    async with sessionmaker() as db:
        assert await ensure_local_admin(await driver(db), other.tenant_id) is None
        await db.commit()
    async with sessionmaker() as db:
        roles = (await db.execute(
            text("SELECT m.roles FROM membership m JOIN app_user u ON u.id = m.user_id "
                 "WHERE u.issuer = 'local' AND m.tenant_id = :t"), {"t": other.tenant_id})).scalar_one()
    assert roles == ["admin"]
