"""Driving the dashboard in a real browser: Debian's headless Chromium through Playwright, the app behind
uvicorn on loopback, local sign-in, and axe-core's accessibility check.

    async with serving(settings) as base_url, chromium() as browser:
        page = await new_page(browser, base_url)
        await sign_in(page, await local_user(sessionmaker, tenant.tenant_id, roles=("operator",)))
        assert await axe_violations(page) == []

Chromium is ``/usr/bin/chromium`` (``apt-get install -y chromium``; never ``playwright install``), axe-core
comes from tests/browser's lock file (``make test`` installs both). Pages run under the app's real
Content-Security-Policy: nothing here turns it off. One consequence: give ``page.wait_for_function`` a
function (``"() => cond"``), never a bare expression, which Playwright polls with ``eval`` and the policy
refuses (``page.evaluate`` is not affected: it goes through DevTools).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import asyncpg
import pytest
import uvicorn
from fastapi import FastAPI
from playwright.async_api import Browser, Page, Route, async_playwright
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.auth.local import LOCAL_ADMIN, ensure_local_admin, hash_password
from app.auth.users import LOCAL_ISSUER
from app.config import Settings
from app.pg import asyncpg_dsn
from tests.support.env import ROOT
from tests.support.net import free_port
from tests.support.signin import grant

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
AXE_JS = ROOT / "tests" / "browser" / "node_modules" / "axe-core" / "axe.min.js"
SERIOUS = ("serious", "critical")
LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")


# --- the app and the browser -------------------------------------------------------------------------------


@asynccontextmanager
async def served(application: FastAPI, port: int) -> AsyncIterator[str]:
    """``application`` behind a real uvicorn on 127.0.0.1:``port`` (its own thread and event loop)."""
    server = uvicorn.Server(uvicorn.Config(application, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started or not thread.is_alive():
                break
            await asyncio.sleep(0.05)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.to_thread(thread.join, 15)


@asynccontextmanager
async def serving(settings: Settings, **update: Any) -> AsyncIterator[str]:
    """``create_app(settings)`` (``update``: settings overridden) served on a free loopback port; its base URL.

    Without an identity provider in ``settings`` the sign-in page offers local sign-in, as on loopback it does.
    """
    from app.main import create_app

    async with served(create_app(settings.model_copy(update=update)), free_port()) as base_url:
        yield base_url


def require_chromium() -> None:
    """Fail (never skip) when Chromium is missing, saying how to install it."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (never `playwright install`)")


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """A headless Chromium, closed on exit."""
    require_chromium()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            await browser.close()


def _elsewhere(url: str) -> bool:
    return (urlsplit(url).hostname or "") not in LOOPBACK and not url.startswith(("data:", "blob:", "about:"))


async def _abort(route: Route) -> None:
    await route.abort()


async def new_page(browser: Browser, base_url: str | None = None, **context_options: Any) -> Page:
    """A page in a new browser context (its own cookies); ``base_url`` makes ``page.goto("/runs")`` work.

    Nothing may leave the machine: requests to hosts other than loopback are aborted (a page that needs a
    CDN breaks here as it would for a user without one). ``context_options`` go to ``new_context``.
    """
    context = await browser.new_context(base_url=base_url, **context_options)
    await context.route(_elsewhere, _abort)
    return await context.new_page()


def csp_violations(page: Page) -> list[str]:
    """A list that fills, from now on, with the Content-Security-Policy violations Chromium reports for
    ``page`` (its console errors); compare it with ``[]`` after the page did what it should."""
    found: list[str] = []
    page.on("console", lambda message: found.append(message.text)
            if message.type == "error" and "Content Security Policy" in message.text else None)
    return found


# --- local users and sign-in ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalUser:
    username: str
    password: str


async def local_user(sessionmaker: async_sessionmaker[AsyncSession], tenant_id: uuid.UUID,
                     roles: Sequence[str] = ("admin",), username: str | None = None) -> LocalUser:
    """A new local user (issuer ``local``) with a password, a member of ``tenant_id`` only, with ``roles``."""
    username = username or f"user-{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(12)
    user_id = await grant(sessionmaker, tenant_id, LOCAL_ISSUER, username, roles)
    hashed = await asyncio.to_thread(hash_password, password)
    async with sessionmaker() as db, db.begin():
        await db.execute(text("UPDATE app_user SET password_hash = :h WHERE id = :id"), {"h": hashed, "id": user_id})
    return LocalUser(username, password)


# The local admin is one user per database: every test of a process shares it, and its password.
_admin_passwords: dict[str, str] = {}


async def local_admin(settings: Settings, tenant_id: uuid.UUID) -> LocalUser:
    """The bootstrap admin (``steward bootstrap``), made an admin of ``tenant_id`` too, with a password we know.

    It may belong to tenants of other tests of this process; sign-in opens the first of its tenants by name.
    """
    assert settings.database_url is not None
    conn = await asyncpg.connect(asyncpg_dsn(settings.database_url))
    try:
        password = await ensure_local_admin(conn, tenant_id)
        if password is None:
            password = _admin_passwords.get(settings.database_url)
        if password is None:  # made before this process looked (another test's bootstrap): set one we know
            password = secrets.token_urlsafe(18)
            await conn.execute("UPDATE app_user SET password_hash = $1 WHERE issuer = $2 AND subject = $3",
                               await asyncio.to_thread(hash_password, password), LOCAL_ISSUER, LOCAL_ADMIN)
    finally:
        await conn.close()
    _admin_passwords[settings.database_url] = password
    return LocalUser(LOCAL_ADMIN, password)


async def sign_in(page: Page, user: LocalUser, next_: str = "/") -> None:
    """Sign ``user`` in through the sign-in page's local form, as a person would; returns on ``next_``.

    ``page`` needs a ``base_url`` (:func:`new_page`). Fails with the page's error when sign-in is refused.
    """
    await page.goto("/auth/login?" + urlencode({"next": next_}))
    await page.fill("#username", user.username)
    await page.fill("#password", user.password)
    async with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/auth/local")) as info:
        await page.click("form[action='/auth/local'] button[type=submit]")
    response = await info.value
    if response.status != 303:
        await page.wait_for_load_state()
        raise AssertionError(f"sign-in of {user.username} refused ({response.status}): "
                             f"{await page.inner_text('main')}")
    target = urlsplit(next_)
    await page.wait_for_url(lambda url: (urlsplit(url).path, urlsplit(url).query) == (target.path, target.query))


# --- accessibility ------------------------------------------------------------------------------------------


def _axe_source() -> str:
    if not AXE_JS.is_file():
        pytest.fail(f"{AXE_JS.relative_to(ROOT)} is missing: run `make test` (or `npm ci` in tests/browser)")
    return AXE_JS.read_text()


async def axe_violations(page: Page, impacts: Sequence[str] = SERIOUS) -> list[dict[str, Any]]:
    """axe-core's violations on the page as it is now, those of ``impacts``: each rule's id, impact, help
    and the CSS selectors of the offending elements (compare the list with ``[]``; it prints readably).
    """
    if not await page.evaluate("typeof window.axe === 'object'"):
        # Not page.add_script_tag(path=...): that inserts an inline <script>, which the app's
        # Content-Security-Policy refuses (and bypass_csp=True would test the page with its policy off).
        # page.evaluate runs through DevTools, outside the page's policy: the page under test keeps it.
        await page.evaluate(_axe_source() + "\n;0")
    violations: list[dict[str, Any]] = await page.evaluate(
        """async (impacts) => {
            const result = await axe.run(document, {resultTypes: ["violations"]});
            return result.violations.filter(v => impacts.includes(v.impact)).map(v => ({
                id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.map(n => n.target.join(" ")),
            }));
        }""",
        list(impacts),
    )
    return violations
