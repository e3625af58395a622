"""The HTTP layer: problem+json for every error, authentication, body limits, health and metrics."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict
from sqlalchemy.exc import IntegrityError

from app.config import Settings
from app.db import make_engine
from app.http import BodySizeLimitMiddleware, register_error_handlers
from app.main import create_app
from tests.support.tenants import MakeApiKey, MakeTenant, TenantKey

PROBLEM = "application/problem+json"
WORKFLOWS = "/api/v1/workflows"
VALID = {"name": "http-test", "definition": {"steps": [{"id": "a", "tool": "echo"}]}}


def assert_problem(response: httpx.Response, status: int, type_slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["type"].endswith("/" + type_slug)
    assert body["title"] and body["detail"]
    return body


# --- authentication and roles ----------------------------------------------------------------------


async def test_missing_key_is_401_with_bearer_challenge(client: httpx.AsyncClient) -> None:
    response = await client.get(WORKFLOWS)
    body = assert_problem(response, 401, "unauthorized")
    assert "missing" in body["detail"]
    assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "authorization",
    ["Bearer stw_unknownkeyunknownkeyunknownkeyunknownkey", "Bearer not-a-steward-key", "Basic dXNlcjpwdw=="],
)
async def test_unknown_or_malformed_key_is_401(client: httpx.AsyncClient, authorization: str) -> None:
    response = await client.get(WORKFLOWS, headers={"Authorization": authorization})
    assert_problem(response, 401, "unauthorized")
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer")
    # A token that was sent but is no good is named as such (RFC 6750); a Basic header is no token at all.
    assert ('error="invalid_token"' in challenge) == authorization.startswith("Bearer")


async def test_revoked_key_is_401(
    client: httpx.AsyncClient, tenant: TenantKey, make_api_key: MakeApiKey
) -> None:
    key = await make_api_key(tenant.tenant_id, revoked_at=datetime.now(UTC) - timedelta(seconds=1))
    response = await client.get(WORKFLOWS, headers={"Authorization": f"Bearer {key}"})
    assert "revoked" in assert_problem(response, 401, "unauthorized")["detail"]


async def test_expired_key_is_401_and_unexpired_key_works(
    client: httpx.AsyncClient, tenant: TenantKey, make_api_key: MakeApiKey
) -> None:
    expired = await make_api_key(tenant.tenant_id, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    response = await client.get(WORKFLOWS, headers={"Authorization": f"Bearer {expired}"})
    assert "expired" in assert_problem(response, 401, "unauthorized")["detail"]

    valid = await make_api_key(tenant.tenant_id, expires_at=datetime.now(UTC) + timedelta(hours=1))
    response = await client.get(WORKFLOWS, headers={"Authorization": f"Bearer {valid}"})
    assert response.status_code == 200


async def test_missing_role_is_403(client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    viewer = await make_tenant(roles=("viewer",))
    response = await client.post(WORKFLOWS, json=VALID, headers=viewer.headers)
    body = assert_problem(response, 403, "forbidden")
    assert body["permission"] == "workflows:write"
    assert "author" in body["detail"]
    # The same key may read.
    assert (await client.get(WORKFLOWS, headers=viewer.headers)).status_code == 200


async def test_every_role_may_read_but_only_its_own_writes(client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    auditor = await make_tenant(roles=("auditor",))
    assert (await client.get(WORKFLOWS, headers=auditor.headers)).status_code == 200
    assert_problem(await client.post(WORKFLOWS, json=VALID, headers=auditor.headers), 403, "forbidden")


# --- routing errors ---------------------------------------------------------------------------------


async def test_unknown_route_is_404_problem(client: httpx.AsyncClient) -> None:
    body = assert_problem(await client.get("/no/such/route"), 404, "not-found")
    assert body["instance"] == "/no/such/route"


async def test_wrong_method_is_405_problem_with_allow(client: httpx.AsyncClient) -> None:
    response = await client.delete("/healthz")
    assert_problem(response, 405, "method-not-allowed")
    assert "GET" in response.headers["allow"]


# --- request bodies ---------------------------------------------------------------------------------


async def test_body_over_limit_by_content_length_is_413(
    client: httpx.AsyncClient, settings: Settings, tenant: TenantKey
) -> None:
    body = b"x" * (settings.max_body_bytes + 1)
    response = await client.post(
        WORKFLOWS, content=body, headers={**tenant.headers, "Content-Type": "application/json"}
    )
    assert_problem(response, 413, "payload-too-large")


async def test_body_over_limit_is_413_before_authentication(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    response = await client.post(WORKFLOWS, content=b"x" * (settings.max_body_bytes + 1))
    assert_problem(response, 413, "payload-too-large")


async def test_chunked_body_over_limit_is_413(
    client: httpx.AsyncClient, settings: Settings, tenant: TenantKey
) -> None:
    chunk = b" " * 65536
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        # Twice the limit is on offer; the server must stop reading soon after the limit.
        while sent < 2 * settings.max_body_bytes:
            sent += len(chunk)
            yield chunk

    response = await client.post(
        WORKFLOWS, content=chunks(), headers={**tenant.headers, "Content-Type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    assert_problem(response, 413, "payload-too-large")
    assert sent <= settings.max_body_bytes + 2 * len(chunk)


async def test_chunked_body_under_limit_passes(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"name": "chunked", '
        yield b'"definition": {"steps": [{"id": "a", "tool": "echo"}]}}'

    response = await client.post(
        WORKFLOWS, content=chunks(), headers={**tenant.headers, "Content-Type": "application/json"}
    )
    assert response.status_code == 201, response.text


async def test_malformed_json_is_400(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    response = await client.post(
        WORKFLOWS, content=b'{"name": "x", ', headers={**tenant.headers, "Content-Type": "application/json"}
    )
    assert "JSON" in assert_problem(response, 400, "bad-request")["detail"]


async def test_unknown_field_is_422_with_pointer(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    response = await client.post(WORKFLOWS, json={**VALID, "colour": "blue"}, headers=tenant.headers)
    body = assert_problem(response, 422, "invalid")
    assert {"pointer": "/body/colour", "message": "Extra inputs are not permitted"} in body["errors"]


async def test_query_validation_is_422_with_pointer(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    response = await client.get(WORKFLOWS, params={"limit": "0"}, headers=tenant.headers)
    body = assert_problem(response, 422, "invalid")
    assert [err["pointer"] for err in body["errors"]] == ["/query/limit"]


# --- handlers on a bare app: FastAPI's own body parsing, integrity errors, crashes ------------------


class Thing(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    tags: list[str] = []


def bare_app() -> FastAPI:
    bare = FastAPI()
    register_error_handlers(bare)
    bare.add_middleware(BodySizeLimitMiddleware, max_body_bytes=100)

    @bare.post("/things")
    async def things(thing: Thing) -> Thing:
        return thing

    @bare.post("/swallow")
    async def swallow(thing: Thing) -> dict[str, str]:
        return {"ok": "never reached"}

    @bare.get("/conflict")
    async def conflict() -> None:
        raise IntegrityError("INSERT ...", {}, Exception("duplicate key value violates unique constraint"))

    @bare.get("/crash")
    async def crash() -> None:
        raise RuntimeError("secret internal state")

    return bare


@pytest.fixture
def bare_client() -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=bare_app(), raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://bare")


async def test_fastapi_malformed_json_is_400(bare_client: httpx.AsyncClient) -> None:
    response = await bare_client.post(
        "/things", content=b'{"name": ', headers={"Content-Type": "application/json"}
    )
    assert "not valid JSON" in assert_problem(response, 400, "bad-request")["detail"]


async def test_fastapi_body_errors_have_json_pointers(bare_client: httpx.AsyncClient) -> None:
    response = await bare_client.post("/things", json={"tags": ["a", 3], "a/b~c": 1})
    body = assert_problem(response, 422, "invalid")
    pointers = sorted(err["pointer"] for err in body["errors"])
    assert pointers == ["/body/a~1b~0c", "/body/name", "/body/tags/1"]
    assert all(err["message"] for err in body["errors"])


async def test_fastapi_streamed_body_over_limit_is_413(bare_client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b'{"name": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}'

    response = await bare_client.post(
        "/things", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert_problem(response, 413, "payload-too-large")


async def test_integrity_error_is_409_without_sql(bare_client: httpx.AsyncClient) -> None:
    body = assert_problem(await bare_client.get("/conflict"), 409, "conflict")
    assert "INSERT" not in body["detail"] and "duplicate" not in body["detail"]


async def test_unhandled_error_is_500_with_generic_detail(
    bare_client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    response = await bare_client.get("/crash")
    body = assert_problem(response, 500, "internal")
    assert "secret" not in response.text
    assert body["detail"]
    assert any(
        record.exc_info and "secret internal state" in str(record.exc_info[1]) for record in caplog.records
    )


async def test_invalid_content_length_is_400(bare_client: httpx.AsyncClient) -> None:
    response = await bare_client.post("/things", content=b"{}", headers={"Content-Length": "abc"})
    assert_problem(response, 400, "bad-request")


# --- health and metrics -----------------------------------------------------------------------------


async def test_healthz(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_ok(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "redis": "ok"}}


async def test_readyz_names_what_is_down(settings: Settings) -> None:
    # Real refused connections: nothing listens on port 1.
    down = create_app(settings)
    down.state.runtime = SimpleNamespace(
        engine=make_engine("postgresql://postgres@127.0.0.1:1/none"),
        redis=aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1),
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=down), base_url="http://down") as http:
        response = await http.get("/readyz")
    await down.state.runtime.engine.dispose()
    await down.state.runtime.redis.aclose()
    body = assert_problem(response, 503, "not-ready")
    assert body["checks"] == {"database": "down", "redis": "down"}
    assert "database" in body["detail"] and "redis" in body["detail"]


async def test_metrics_count_requests_by_route(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    await client.get("/healthz")
    await client.get(f"{WORKFLOWS}/some-name", headers=tenant.headers)
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert re.search(r'steward_http_requests_total\{method="GET",route="/healthz",status="200"\} \d', text)
    # Route templates, not raw paths, keep label cardinality bounded.
    assert 'route="/api/v1/workflows/{name}",status="404"' in text
    assert "some-name" not in text
    assert "steward_http_request_duration_seconds_bucket" in text


async def test_openapi_and_docs(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    assert schema["info"]["title"] == "Steward"
    post = schema["paths"]["/api/v1/workflows"]["post"]
    assert {"application/json", "application/yaml"} <= set(post["requestBody"]["content"])
    assert (await client.get("/docs")).status_code == 200
