"""Security headers (app/security_headers.py) on the real app, and the middleware on bare ASGI apps."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import Receive, Scope, Send

from app.config import Settings
from app.main import create_app
from app.security_headers import CSP, HSTS, SecurityHeadersMiddleware
from tests.support.tenants import TenantKey

ALWAYS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=()",
}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def secured(settings: Settings) -> AsyncIterator[FastAPI]:
    """The app as app/main.py builds it (the middleware outermost), plus routes setting their own headers
    and one that fails."""
    application = create_app(settings)

    @application.get("/api/v1/_own-headers")
    async def own_headers() -> Response:
        return JSONResponse(
            {"ok": True},
            headers={
                "Cache-Control": "max-age=60",
                "X-Frame-Options": "SAMEORIGIN",
                "Content-Security-Policy": "default-src 'none'",
            },
        )

    @application.get("/auth/_probe")
    async def auth_probe() -> dict[str, bool]:
        return {"ok": True}

    @application.get("/api/v1/_boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    async with application.router.lifespan_context(application):
        yield application


def client_for(application: FastAPI, scheme: str = "http") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url=f"{scheme}://test")


def assert_always(response: httpx.Response) -> None:
    for name, value in ALWAYS.items():
        assert response.headers.get_list(name) == [value], name


def inline_script_hashes(html: str) -> list[str]:
    bodies = re.findall(r"<script>(.*?)</script>", html, re.DOTALL)
    assert bodies, "the page has no inline script"
    return [base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() for body in bodies]


async def test_every_response_gets_the_headers_and_the_strict_policy(secured: FastAPI) -> None:
    async with client_for(secured) as client:
        responses = [await client.get("/healthz"), await client.get("/openapi.json"), await client.get("/nowhere")]
    assert [r.status_code for r in responses] == [200, 200, 404]
    for response in responses:
        assert_always(response)
        assert response.headers["content-security-policy"] == CSP
        # Not under /api/ or /auth/, and plain HTTP.
        assert "cache-control" not in response.headers
        assert "strict-transport-security" not in response.headers


async def test_api_and_auth_responses_are_not_stored(secured: FastAPI, tenant: TenantKey) -> None:
    async with client_for(secured) as client:
        ok = await client.get("/api/v1/workflows", headers=tenant.headers)
        unauthorized = await client.get("/api/v1/workflows")
        auth = await client.get("/auth/_probe")
    assert [ok.status_code, unauthorized.status_code, auth.status_code] == [200, 401, 200]
    for response in (ok, unauthorized, auth):
        assert_always(response)
        assert response.headers.get_list("cache-control") == ["no-store"]
        assert response.headers["content-security-policy"] == CSP


async def test_hsts_only_over_https(secured: FastAPI) -> None:
    async with client_for(secured, "https") as client:
        secure = await client.get("/healthz")
    async with client_for(secured, "http") as client:
        plain = await client.get("/healthz")
    assert secure.headers.get_list("strict-transport-security") == [HSTS]
    assert "strict-transport-security" not in plain.headers


async def test_headers_a_route_set_are_kept(secured: FastAPI) -> None:
    async with client_for(secured) as client:
        response = await client.get("/api/v1/_own-headers")
    assert response.status_code == 200
    assert response.headers.get_list("cache-control") == ["max-age=60"]
    assert response.headers.get_list("x-frame-options") == ["SAMEORIGIN"]
    assert response.headers.get_list("content-security-policy") == ["default-src 'none'"]
    assert response.headers["x-content-type-options"] == "nosniff"


async def test_responses_of_inner_middleware_get_the_headers(secured: FastAPI, tenant: TenantKey) -> None:
    limit = secured.state.settings.max_body_bytes
    async with client_for(secured) as client:
        response = await client.post("/api/v1/workflows", headers=tenant.headers, content=b"x" * (limit + 1))
    assert response.status_code == 413
    assert_always(response)
    assert response.headers["cache-control"] == "no-store"


async def test_an_unexpected_error_is_a_500_problem_with_the_headers(secured: FastAPI) -> None:
    async with client_for(secured) as client:
        response = await client.get("/api/v1/_boom")
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith("/internal") and "a bug" not in response.text
    assert_always(response)
    assert response.headers["cache-control"] == "no-store"


@pytest.mark.parametrize("path", ["/docs", "/docs/oauth2-redirect"])
async def test_swagger_ui_gets_a_policy_with_its_hosts_and_script_hashes(secured: FastAPI, path: str) -> None:
    async with client_for(secured) as client:
        response = await client.get(path)
    assert response.status_code == 200
    assert_always(response)
    policy = response.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    script_src = directives["script-src"].split()
    for digest in inline_script_hashes(response.text):
        assert f"'sha256-{digest}'" in script_src
    assert "https://cdn.jsdelivr.net" in script_src
    assert "'unsafe-inline'" not in script_src and "'unsafe-eval'" not in script_src
    assert "https://cdn.jsdelivr.net" in directives["style-src"]
    assert "https://fastapi.tiangolo.com" in directives["img-src"]
    assert directives["frame-ancestors"] == "'none'" and directives["base-uri"] == "'none'"
    # The body went through untouched.
    assert int(response.headers["content-length"]) == len(response.content)


async def test_a_docs_policy_follows_the_page() -> None:
    # Another OpenAPI URL changes the inline script: the hash is taken from each page, not fixed.
    application = FastAPI(openapi_url="/other-openapi.json")
    application.add_middleware(SecurityHeadersMiddleware)
    async with client_for(application) as client:
        response = await client.get("/docs")
    assert "/other-openapi.json" in response.text
    [digest] = inline_script_hashes(response.text)
    assert f"'sha256-{digest}'" in response.headers["content-security-policy"]


# --- bare ASGI apps -------------------------------------------------------------------------------


async def chunked_docs(scope: Scope, receive: Receive, send: Send) -> None:
    """An HTML page sent in three chunks, the inline script split across two of them."""
    headers = [(b"content-type", b"text/html; charset=utf-8")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    for chunk in (b"<html><script>let a", b" = 1;</script><script src='/x.js'></script>", b"</html>"):
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def test_a_docs_page_sent_in_chunks_is_hashed_whole() -> None:
    async with client_for(SecurityHeadersMiddleware(chunked_docs)) as client:  # type: ignore[arg-type]
        response = await client.get("/docs")
    assert response.text == "<html><script>let a = 1;</script><script src='/x.js'></script></html>"
    policy = response.headers["content-security-policy"]
    digest = base64.b64encode(hashlib.sha256(b"let a = 1;").digest()).decode()
    assert re.findall(r"'sha256-[^']+'", policy) == [f"'sha256-{digest}'"]


async def test_docs_relaxation_is_only_for_html_and_can_be_off() -> None:
    async def text(scope: Scope, receive: Receive, send: Send) -> None:
        await PlainTextResponse("not html")(scope, receive, send)

    async with client_for(SecurityHeadersMiddleware(text)) as client:  # type: ignore[arg-type]
        response = await client.get("/docs/missing")
    assert response.headers["content-security-policy"] == CSP

    async with client_for(SecurityHeadersMiddleware(chunked_docs, docs_path=None)) as client:  # type: ignore[arg-type]
        response = await client.get("/docs")
    assert response.headers["content-security-policy"] == CSP
    assert_always(response)


async def test_non_http_scopes_pass_through() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    middleware = SecurityHeadersMiddleware(app)

    async def no_receive() -> dict[str, str]:
        raise AssertionError("not called")

    async def no_send(message: object) -> None:
        raise AssertionError("not called")

    await middleware({"type": "lifespan"}, no_receive, no_send)
    assert seen == ["lifespan"]
