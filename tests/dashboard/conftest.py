"""Fixtures of the dashboard's browser tests: the app served on a loopback port, and one Chromium per module."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio
from playwright.async_api import Browser

from app.config import Settings
from tests.support.browser import chromium, serving


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def base_url(settings: Settings) -> AsyncIterator[str]:
    """The app on a free loopback port, no identity provider: local sign-in."""
    async with serving(settings) as url:
        yield url


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as running:
        yield running
