"""Signing in as a browser would: apps using the test provider, in-process clients keeping cookies, the
provider's login and consent forms got through by hand; and the membership data sign-in reads."""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urljoin

import httpx
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from tests.support.oidc import APP_URL

MakeOidcApp = Callable[..., AbstractAsyncContextManager[FastAPI]]
# ``await sign_in(tenant, roles)`` (the fixture): a browser signed in as a new local member of the tenant.
SignIn = Callable[..., Awaitable[httpx.AsyncClient]]


@asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[FastAPI]:
    """``create_app(settings)`` with its lifespan running."""
    from app.main import create_app

    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


def app_client(application: FastAPI, base_url: str = APP_URL,
               client: tuple[str, int] = ("127.0.0.1", 50000)) -> httpx.AsyncClient:
    """An in-process client keeping its own cookies, as a browser would."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=application, client=client), base_url=base_url)


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
                 "WHERE tenant_id = :t AND action = :a ORDER BY id"),
            {"t": tenant_id, "a": action},
        )
        return [dict(row) for row in rows.mappings()]


async def user_id_of(sessionmaker: async_sessionmaker[AsyncSession], issuer: str, subject: str) -> uuid.UUID:
    async with sessionmaker() as db:
        found = (await db.execute(text("SELECT id FROM app_user WHERE issuer = :i AND subject = :s"),
                                  {"i": issuer, "s": subject})).scalar_one()
    assert isinstance(found, uuid.UUID)
    return found
