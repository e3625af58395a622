"""The input guard and the column bounds: each refusal is a 422 problem+json pointing at the offender."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute, iter_route_contexts

from app.http import PARSED_JSON, BodySizeLimitMiddleware, JsonRoute, register_error_handlers
from app.input_guard import InputGuardMiddleware, value_errors
from tests.support.signin import app_client
from tests.support.tenants import TenantKey

PROBLEM = "application/problem+json"
RUNS = "/api/v1/runs"


def errors_of(response: httpx.Response, status: int = 422) -> list[dict[str, str]]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["type"].endswith("/invalid") and body["detail"]
    errors: list[dict[str, str]] = body["errors"]
    return errors


def pointers(response: httpx.Response) -> list[str]:
    return [err["pointer"] for err in errors_of(response)]


async def post_raw(client: httpx.AsyncClient, tenant: TenantKey, url: str, raw: bytes,
                   media: str = "application/json") -> httpx.Response:
    return await client.post(url, content=raw, headers={**tenant.headers, "Content-Type": media})


@pytest.fixture
async def workflow(client: httpx.AsyncClient, tenant: TenantKey) -> str:
    body = {"name": "guarded", "definition": {"steps": [{"id": "a", "wait": {"signal": "go"}}]}}
    response = await client.post("/api/v1/workflows", json=body, headers=tenant.headers)
    assert response.status_code == 201, response.text
    return "guarded"


# --- JSON bodies -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "pointer", "message"),
    [
        (rb'{"workflow": "w", "input": {"k": ["ok", "a\u0000b"]}}', "/body/input/k/1", "NUL"),
        (rb'{"workflow": "w", "input": {"k": "\ud800"}}', "/body/input/k", "lone surrogate"),
        (rb'{"workflow": "w", "input": {"k": "\udfff\ud800"}}', "/body/input/k", "lone surrogate"),
        # Raw UTF-8 of a surrogate, which Python's JSON decoder lets through ("surrogatepass").
        (b'{"workflow": "w", "input": {"k": "\xed\xa0\x80"}}', "/body/input/k", "lone surrogate"),
        (rb'{"workflow": "w", "input": {"a": 1, "a": 2}}', "/body/input/a", "duplicate key"),
        (rb'{"workflow": "w", "workflow": "x"}', "/body/workflow", "duplicate key"),
        (rb'{"workflow": "w", "input": {"n": NaN}}', "/body/input/n", "not a JSON number"),
        (rb'{"workflow": "w", "input": [-Infinity]}', "/body/input/0", "not a JSON number"),
        (rb'{"workflow": "w", "input": {"n": 1e400}}', "/body/input/n", "too large for a double"),
        (rb'{"workflow": "w", "input": {"n": 9223372036854775808}}', "/body/input/n", "64 bits"),
        (rb'{"workflow": "w", "input": {"n": -9223372036854775809}}', "/body/input/n", "64 bits"),
        (b'{"workflow": "w", "input": {"n": ' + b"9" * 5000 + b"}}", "/body/input/n", "64 bits"),
    ],
)
async def test_json_body_values_are_refused_with_a_pointer(
    client: httpx.AsyncClient, tenant: TenantKey, raw: bytes, pointer: str, message: str
) -> None:
    errors = errors_of(await post_raw(client, tenant, RUNS, raw))
    assert [err["pointer"] for err in errors] == [pointer]
    assert message in errors[0]["message"]


async def test_a_bad_key_is_pointed_at_without_echoing_it(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    raw = rb'{"workflow": "w", "input": {"a\u0000b": 1, "\ud800": 2}}'
    errors = errors_of(await post_raw(client, tenant, RUNS, raw))
    assert sorted(err["pointer"] for err in errors) == ["/body/input/a\ufffdb", "/body/input/\ufffd"]
    assert all(err["message"].startswith("key contains") for err in errors)


async def test_good_json_still_reaches_the_route(
    client: httpx.AsyncClient, tenant: TenantKey, workflow: str
) -> None:
    # Pairs of surrogates (astral characters, as ensure_ascii writes them) and big-but-fine numbers pass.
    raw = json.dumps({"workflow": workflow, "input": {"emoji": "\U0001f600", "n": 2**63 - 1, "x": -1.5}})
    response = await post_raw(client, tenant, RUNS, raw.encode())
    assert response.status_code == 201, response.text
    assert response.json()["input"] == {"emoji": "\U0001f600", "n": 2**63 - 1, "x": -1.5}


async def test_malformed_json_still_answers_400(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    for url in (RUNS, "/api/v1/workflows"):
        response = await post_raw(client, tenant, url, b'{"workflow": ')
        assert response.status_code == 400, response.text
        assert response.headers["content-type"] == PROBLEM


async def test_yaml_workflow_values_are_held_to_the_same_rules(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    yaml = (b'name: y\ndefinition:\n  steps:\n  - id: a\n    tool: echo\n'
            b'    args: {x: "a\\0b", n: 100000000000000000000}\n')
    response = await post_raw(client, tenant, "/api/v1/workflows", yaml, "application/yaml")
    assert pointers(response) == ["/body/definition/steps/0/args/n", "/body/definition/steps/0/args/x"]


async def test_description_with_nul_is_refused(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    body = {"name": "d", "description": "a\x00", "definition": {"steps": [{"id": "a", "tool": "echo"}]}}
    assert pointers(await client.post("/api/v1/workflows", json=body, headers=tenant.headers)) == [
        "/body/description"]


# --- the request line, headers and forms ---------------------------------------------------------------


async def test_query_path_and_header_values_are_refused(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    assert pointers(await client.get(RUNS, params={"workflow": "a\x00b"}, headers=tenant.headers)) == [
        "/query/workflow"]
    assert pointers(await client.get("/api/v1/audit/events?actor=%00", headers=tenant.headers)) == ["/query/actor"]
    assert pointers(await client.get("/api/v1/workflows/a%00b/versions", headers=tenant.headers)) == ["/path/name"]
    response = await client.post(RUNS, json={"workflow": "w"}, headers={**tenant.headers, "Idempotency-Key": "k\x00"})
    assert pointers(response) == ["/header/idempotency-key"]


@pytest.mark.parametrize("listing", ["workflows", "tools", "secrets", "providers", "approvals", "members",
                                     "api-keys", "audit/events", "runs", "workflows/w/versions",
                                     "tools/echo/versions"])
async def test_a_cursor_hiding_a_nul_is_refused(client: httpx.AsyncClient, tenant: TenantKey, listing: str) -> None:
    # "AA" is base64 for a NUL byte: past the guard, inside the cursor.
    for cursor in ("AA", "YQBi"):
        response = await client.get(f"/api/v1/{listing}", params={"cursor": cursor}, headers=tenant.headers)
        assert response.status_code == 422 and response.headers["content-type"] == PROBLEM, response.text
        assert [err["pointer"] for err in response.json()["errors"]] == ["/query/cursor"]


async def test_form_fields_of_the_sign_in_page_are_refused(app: FastAPI) -> None:
    async with app_client(app) as browser:
        response = await browser.post("/auth/local", data={"username": "admin\x00", "password": "x"})
    assert pointers(response) == ["/body/username"]


# --- one parse, one delivery, the size limit -----------------------------------------------------------


def guarded_app() -> FastAPI:
    bare = FastAPI()
    register_error_handlers(bare)
    bare.add_middleware(InputGuardMiddleware)
    bare.add_middleware(BodySizeLimitMiddleware, max_body_bytes=1000)
    router = APIRouter(route_class=JsonRoute)

    @router.post("/echo")
    async def echo(body: dict[str, Any]) -> dict[str, Any]:
        return body

    bare.include_router(router)
    return bare


async def test_the_body_is_parsed_once_and_still_delivered(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_loads = json.loads

    def counting_loads(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0])
        return real_loads(*args, **kwargs)

    monkeypatch.setattr(json, "loads", counting_loads)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guarded_app()), base_url="http://b") as http:
        response = await http.post("/echo", json={"a": [1, 2.5, "x"]})
        assert len(calls) == 1  # the guard's: the route took its value (the client's own parse comes next)
        assert response.status_code == 200 and response.json() == {"a": [1, 2.5, "x"]}
        # Over the size limit while the guard buffers it: still the 413.
        response = await http.post("/echo", content=b"[" + b"1," * 600 + b"1]",
                                   headers={"Content-Type": "application/json"})
        assert response.status_code == 413 and response.headers["content-type"] == PROBLEM


def test_every_api_route_takes_the_guards_parse(app: FastAPI) -> None:
    """A router made without route_class=JsonRoute would still be guarded, but parse its bodies twice."""
    routes = [getattr(ctx, "original_route", ctx) for ctx in iter_route_contexts(app.routes)]
    api_routes = [route for route in routes if isinstance(route, APIRoute)]
    assert len(api_routes) > 40
    assert [route.path for route in api_routes if not isinstance(route, JsonRoute)] == []


def test_value_errors_walks_decoded_yaml_and_json_alike() -> None:
    assert value_errors({"a": [1, "x\x00"], "b": {"c": float("nan")}, "d": 2**64}) == [
        {"pointer": "/body/a/1", "message": "contains a NUL character (U+0000), which cannot be stored"},
        {"pointer": "/body/b/c", "message": "NaN and Infinity are not JSON numbers"},
        {"pointer": "/body/d", "message": "integer out of range: must fit in 64 bits"},
    ]
    assert value_errors({"fine": ["\U0001f600", 2**63 - 1, -1.5, None, True]}) == []
    assert PARSED_JSON.startswith("steward.")


# --- column bounds ---------------------------------------------------------------------------------------


async def test_integers_fit_their_columns(client: httpx.AsyncClient, tenant: TenantKey, workflow: str) -> None:
    response = await client.post(RUNS, json={"workflow": workflow, "version": 2**31}, headers=tenant.headers)
    assert pointers(response) == ["/body/version"]
    run = await client.post(RUNS, json={"workflow": workflow}, headers=tenant.headers)
    run_id = run.json()["id"]
    response = await client.get(f"{RUNS}/{run_id}/events", params={"cursor": str(2**63)}, headers=tenant.headers)
    assert pointers(response) == ["/query/cursor"]
    response = await client.get(f"{RUNS}/{run_id}/events", params={"cursor": str(2**63 - 1)}, headers=tenant.headers)
    assert response.status_code == 200 and response.json()["items"] == []
    conversation = f"{RUNS}/{run_id}/steps/a/conversation"
    assert pointers(await client.get(conversation, params={"cursor": str(2**31)}, headers=tenant.headers)) == [
        "/query/cursor"]
    response = await client.get(conversation, params={"cursor": str(2**31 - 1)}, headers=tenant.headers)
    assert response.status_code == 200, response.text
    for limits in ({"timeout_s": 1e300}, {"max_cost_usd": 1e300}):
        response = await client.put(f"{RUNS}/{run_id}/limits", json=limits, headers=tenant.headers)
        assert pointers(response) == ["/body/" + next(iter(limits))]


@pytest.mark.parametrize(("written", "read"), [("0", "0"), ("-0", "0"), ("-0.0", "0"), ("1.50", "1.5"),
                                               ("100", "100"), ("0.00000001", "0.00000001")])
async def test_money_reads_back_as_written(
    client: httpx.AsyncClient, tenant: TenantKey, written: str, read: str
) -> None:
    raw = ('{"daily_usd": ' + written + ', "hourly_usd": "' + written + '"}').encode()
    response = await client.put("/api/v1/budgets", content=raw,
                                headers={**tenant.headers, "Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    assert (response.json()["daily_usd"], response.json()["hourly_usd"]) == (read, read)
    stored = (await client.get("/api/v1/budgets", headers=tenant.headers)).json()
    assert (stored["daily_usd"], stored["hourly_usd"]) == (read, read)


async def test_money_keeps_every_digit_the_column_holds(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    # As a string: a JSON number goes through a double, which has fewer digits than numeric(18, 8).
    body = {"daily_usd": "9999999999.99999999"}
    assert (await client.put("/api/v1/budgets", json=body, headers=tenant.headers)).json()["daily_usd"] == (
        "9999999999.99999999")


@pytest.mark.parametrize("written", ["6.8e105", "10000000000", "0.123456789", '"1e400"', "-1"])
async def test_money_that_does_not_fit_numeric_18_8_is_refused(
    client: httpx.AsyncClient, tenant: TenantKey, written: str
) -> None:
    raw = ('{"daily_usd": ' + written + "}").encode()
    response = await client.put("/api/v1/budgets", content=raw,
                                headers={**tenant.headers, "Content-Type": "application/json"})
    assert pointers(response) == ["/body/daily_usd"]


async def test_usage_reads_as_written(client: httpx.AsyncClient, tenant: TenantKey, workflow: str) -> None:
    run_id = (await client.post(RUNS, json={"workflow": workflow}, headers=tenant.headers)).json()["id"]
    usage = (await client.get("/api/v1/budgets/usage", params={"run": run_id}, headers=tenant.headers)).json()
    assert usage["run"]["cost_usd"] == "0" and usage["run"]["reserved_usd"] == "0"


# --- secrets ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "named"), [("a\nb", "LF"), ("a\rb", "CR"), ("a\x00b", "NUL"), ("a\x1bb", "U+001B")])
async def test_secret_values_must_fit_in_a_header(
    client: httpx.AsyncClient, tenant: TenantKey, value: str, named: str
) -> None:
    errors = errors_of(await client.put("/api/v1/secrets/k", json={"value": value}, headers=tenant.headers))
    assert [err["pointer"] for err in errors] == ["/body/value"]
    assert named in errors[0]["message"] or "NUL" in errors[0]["message"]


async def test_secret_values_may_hold_tabs_and_unicode(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    response = await client.put("/api/v1/secrets/k", json={"value": "a\tb é"}, headers=tenant.headers)
    assert response.status_code == 204, response.text


# --- the OpenAPI document --------------------------------------------------------------------------------


async def test_openapi_documents_what_every_route_answers(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    for path, item in document["paths"].items():
        for method, operation in item.items():
            statuses = set(operation["responses"])
            if path.startswith("/api/v1/"):
                assert {"400", "401", "403", "413", "422", "429", "503"} <= statuses, (method, path)
                # Replacing the settings is one UPDATE of the tenant's own row: nothing to conflict with.
                if method != "get" and path != "/api/v1/settings":
                    assert "409" in statuses, (method, path)
            else:
                assert {"400", "413", "422"} <= statuses, (method, path)
    assert "415" in document["paths"]["/api/v1/workflows"]["post"]["responses"]
    assert "409" in document["paths"]["/api/v1/members"]["post"]["responses"]
