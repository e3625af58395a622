"""``/``, where `steward up` sends people, is no dead end until the dashboard fills it."""

from __future__ import annotations

import re

import httpx

from app.security_headers import CSP


async def test_the_root_page_links_docs_sign_in_and_health(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200, page.text
    assert page.headers["content-type"].startswith("text/html")
    # A plain page under the strict policy: no inline script, nothing from elsewhere.
    assert page.headers["content-security-policy"] == CSP
    assert "<script" not in page.text
    links = re.findall(r'href="(/[^"]*)"', page.text)
    assert {"/docs", "/auth/login", "/healthz"} <= set(links), links
    for link in links:
        answer = await client.get(link)
        # Sign-in refuses this in-process client (no identity provider, not on loopback) and /auth/me a
        # signed-out caller, each with a page or problem saying why; the rest answer.
        assert answer.status_code != 404, link
        if link in ("/docs", "/openapi.json", "/healthz"):
            assert answer.status_code == 200, (link, answer.status_code)
