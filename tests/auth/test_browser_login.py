"""One sign-in in a real browser: headless Chromium (Playwright) through the real provider's login and
consent pages, against the app served by uvicorn."""

from __future__ import annotations

import json
import os

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.auth.sessions import COOKIE
from app.config import Settings
from tests.support.browser import chromium, new_page, served
from tests.support.net import free_port
from tests.support.oidc import DASHBOARD_CLIENT, DASHBOARD_SECRET, provider_config, running_provider
from tests.support.signin import map_groups, new_account
from tests.support.tenants import MakeTenant

SCREENSHOT = os.environ.get("STEWARD_TEST_SCREENSHOT")  # set to a path to look at the sign-in page


async def test_sign_in_with_chromium(settings: Settings, make_tenant: MakeTenant,
                                     sessionmaker: async_sessionmaker[AsyncSession]) -> None:
    from app.main import create_app

    tenant = await make_tenant()
    await map_groups(sessionmaker, tenant.tenant_id, {"browsers": ["approver"]})
    login = new_account("browsers")
    port = free_port()
    app_url = f"http://127.0.0.1:{port}"
    with running_provider(provider_config(app_url)) as provider:
        application = create_app(settings.model_copy(update={
            "oidc_issuer": provider.issuer, "oidc_client_id": DASHBOARD_CLIENT,
            "oidc_client_secret": DASHBOARD_SECRET, "public_url": app_url,
        }))
        async with served(application, port), chromium() as browser:
            # The provider's built-in pages import web fonts: new_page lets nothing leave the machine.
            page = await new_page(browser)
            await page.goto(f"{app_url}/auth/login?next=/auth/me")
            # The page's stylesheet is Steward's own file: the strict CSP lets it in.
            radius = await page.evaluate("getComputedStyle(document.querySelector('main')).borderTopLeftRadius")
            assert radius == "10px"
            if SCREENSHOT:
                await page.screenshot(path=SCREENSHOT)
            await page.click("#oidc-sign-in")
            await page.wait_for_selector("input[name=login]")
            await page.fill("input[name=login]", login)
            await page.fill("input[name=password]", "anything")
            await page.click("button[type=submit]")
            await page.wait_for_selector("input[name=prompt][value=consent]", state="attached")
            await page.click("button[type=submit]")
            await page.wait_for_url(f"{app_url}/auth/me", timeout=10_000)

            me = json.loads(await page.inner_text("body"))
            assert me["user"]["subject"] == login
            assert me["tenant"]["id"] == str(tenant.tenant_id) and me["roles"] == ["approver"]
            cookie = next(c for c in await page.context.cookies(app_url) if c["name"] == COOKIE)
            assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and not cookie["secure"]
            # The page's script cannot read the session cookie.
            assert COOKIE not in await page.evaluate("document.cookie")
