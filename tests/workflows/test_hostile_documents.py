"""Documents built to hurt: cyclic and exponential YAML aliases, repeated keys, huge and deep shapes.

Each is refused (or accepted) at once, with a problem+json answer and a pointer where one applies, while
the API keeps answering /healthz. The bounds on time here are safety nets against a hang, far above what
these take (milliseconds), not speed assertions.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable
from typing import Any

import httpx
import pytest

from app.input_guard import DUPLICATE_KEY
from app.workflows.checks import MAX_EXPRESSIONS
from app.workflows.decode import MAX_DOCUMENT_DEPTH, MAX_DOCUMENT_VALUES, load_document
from app.workflows.document import DefinitionError
from app.workflows.fields import MAX_SCHEMA_VALUES
from tests.support.tenants import TenantKey

URL = "/api/v1/workflows"
YAML = {"Content-Type": "application/yaml"}
# Safety nets: a hostile document must not hold a request, or the event loop, for long.
ANSWER_WITHIN_S = 10.0
HEALTHZ_WITHIN_S = 1.0


async def while_healthz_answers(client: httpx.AsyncClient, request: Awaitable[httpx.Response]) -> httpx.Response:
    """Await ``request`` while /healthz is asked every 20 ms; every /healthz must answer promptly."""
    done = asyncio.Event()
    latencies: list[float] = []

    async def probe() -> None:
        while not done.is_set():
            started = time.perf_counter()
            r = await client.get("/healthz")
            latencies.append(time.perf_counter() - started)
            assert r.status_code == 200
            await asyncio.sleep(0.02)

    prober = asyncio.create_task(probe())
    try:
        response = await asyncio.wait_for(request, ANSWER_WITHIN_S)
    finally:
        done.set()
        await prober
    assert latencies and max(latencies) < HEALTHZ_WITHIN_S, latencies
    return response


def problem(response: httpx.Response, status: int | tuple[int, ...]) -> dict[str, Any]:
    assert response.status_code in ((status,) if isinstance(status, int) else status), response.text
    assert response.headers["content-type"] == "application/problem+json"
    return dict(response.json())


def yaml_body(definition: str) -> str:
    return f"name: wf-{secrets.token_hex(4)}\ndefinition:\n{definition}"


# --- YAML aliases --------------------------------------------------------------------------------------


async def test_recursive_alias_is_refused_at_once_with_a_pointer(
    client: httpx.AsyncClient, tenant: TenantKey
) -> None:
    body = yaml_body("  steps:\n    - id: a\n      tool: echo\n      args: &x {k: *x}\n")
    r = await while_healthz_answers(client, client.post(URL, content=body, headers={**tenant.headers, **YAML}))
    errors = problem(r, 422)["errors"]
    assert errors == [{"pointer": "/body/definition/steps/0/args/k", "message": errors[0]["message"]}]
    assert "cycle" in errors[0]["message"]


@pytest.mark.parametrize(
    ("text", "pointer"),
    [
        ("a: &x [1, [2, *x]]", "/a/1/1"),
        ("a: &x {b: {<<: *x}}", "/a/b/<<"),
        ("&x [*x]", "/0"),
        ("a: &x {b: [{c: *x}]}", "/a/b/0/c"),
    ],
)
def test_every_cycle_shape_is_refused(text: str, pointer: str) -> None:
    with pytest.raises(DefinitionError) as info:
        load_document(text, "application/yaml")
    [error] = info.value.errors
    assert error["pointer"] == pointer and "cycle" in error["message"]


def bomb(levels: int, width: int) -> str:
    lines = [f"a0: &a0 [{', '.join(['x'] * width)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines)


def merge_bomb(levels: int) -> str:
    # Each mapping merges the previous one (PyYAML re-flattens merges) and holds it twice more.
    lines = ["m0: &m0 {" + ", ".join(f"k{i}: {i}" for i in range(50)) + "}"]
    lines += [f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}], v{i}: [*m{i - 1}, *m{i - 1}]}}" for i in range(1, levels)]
    return "\n".join(lines)


@pytest.mark.parametrize(
    "text",
    [bomb(9, 10), bomb(30, 2), bomb(3, 300), merge_bomb(40), "a: &a [" + ", ".join(["1"] * 1000) + "]\nb: ["
     + ", ".join(["*a"] * 1000) + "]"],
    ids=["billion-laughs", "deep-doubling", "wide", "merges", "one-level"],
)
async def test_exponential_aliases_are_refused_quickly(
    client: httpx.AsyncClient, tenant: TenantKey, text: str
) -> None:
    body = text + "\nname: bomb\ndefinition: {steps: []}"
    r = await while_healthz_answers(client, client.post(URL, content=body, headers={**tenant.headers, **YAML}))
    detail = problem(r, 400)["detail"]
    assert f"document too large (over {MAX_DOCUMENT_VALUES} values once YAML aliases are expanded)" in detail


def test_merge_keys_still_work_and_explicit_keys_win() -> None:
    text = "base: &b {x: 1, y: 2}\nmore: &m {y: 5, z: 3}\nd: {<<: [*b, *m], y: 9}\n"
    assert load_document(text, "application/yaml")["d"] == {"y": 9, "x": 1, "z": 3}


def test_aliases_expand_into_independent_copies() -> None:
    data = load_document("a: &a {k: [1]}\nb: *a\n", "application/yaml")
    assert data == {"a": {"k": [1]}, "b": {"k": [1]}}
    assert data["a"] is not data["b"] and data["a"]["k"] is not data["b"]["k"]


# --- repeated keys -------------------------------------------------------------------------------------


async def test_repeated_yaml_key_is_422_with_a_pointer(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    body = yaml_body("  steps:\n    - id: a\n      tool: echo\n      args: {v: 1, v: 2}\n")
    errors = problem(await client.post(URL, content=body, headers={**tenant.headers, **YAML}), 422)["errors"]
    message = DUPLICATE_KEY
    assert errors == [{"pointer": "/body/definition/steps/0/args/v", "message": message}]


async def test_repeated_json_key_in_a_definition_is_422_with_a_pointer(
    client: httpx.AsyncClient, tenant: TenantKey
) -> None:
    text = '{"name": "dup", "definition": {"steps": [{"id": "a", "tool": "echo", "id": "b"}]}}'
    r = await client.post(URL, content=text, headers={**tenant.headers, "Content-Type": "application/json"})
    errors = problem(r, 422)["errors"]
    assert errors == [{"pointer": "/body/definition/steps/0/id", "message": DUPLICATE_KEY}]


@pytest.mark.parametrize(
    ("text", "content_type", "pointer"),
    [
        ("a: 1\na: 2\n", "application/yaml", "/a"),
        ("a: {b: 1, c: 2, b: 3}\n", None, "/a/b"),
        ("base: &b {x: 1}\nd: {<<: *b, y: 1, y: 2}\n", "application/yaml", "/d/y"),
        ('{"a": {"b": [{"k": 1, "k": 2}]}}', "application/json", "/a/b/0/k"),
        ('{"a": 1, "a": 1}', None, "/a"),
    ],
)
def test_repeated_keys_are_refused_in_both_languages(text: str, content_type: str | None, pointer: str) -> None:
    with pytest.raises(DefinitionError) as info:
        load_document(text, content_type)
    assert [e["pointer"] for e in info.value.errors] == [pointer]


# --- size and depth ------------------------------------------------------------------------------------


def wide_json(values: int) -> str:
    return json.dumps({"name": "wide", "definition": {"steps": [{"id": "a", "tool": "echo", "args": {
        "v": list(range(values))}}]}})


async def test_a_body_just_under_the_value_cap_is_accepted(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    text = wide_json(MAX_DOCUMENT_VALUES - 20).replace('"wide"', f'"wide-{secrets.token_hex(4)}"')
    r = await while_healthz_answers(client, client.post(URL, content=text, headers=tenant.headers))
    assert r.status_code == 201, r.text[:300]


@pytest.mark.parametrize("content_type", ["application/json", "application/yaml"])
async def test_too_many_values_is_400(client: httpx.AsyncClient, tenant: TenantKey, content_type: str) -> None:
    text = wide_json(MAX_DOCUMENT_VALUES + 1)  # JSON is YAML too
    r = await while_healthz_answers(
        client, client.post(URL, content=text, headers={**tenant.headers, "Content-Type": content_type})
    )
    assert f"document too large (over {MAX_DOCUMENT_VALUES} values)" in problem(r, 400)["detail"]


@pytest.mark.parametrize("content_type", ["application/json", "application/yaml"])
async def test_too_deep_is_refused(client: httpx.AsyncClient, tenant: TenantKey, content_type: str) -> None:
    deep = "[" * (MAX_DOCUMENT_DEPTH + 5) + "]" * (MAX_DOCUMENT_DEPTH + 5)
    text = '{"name": "deep", "definition": {"steps": [{"id": "a", "tool": "echo", "args": {"v": ' + deep + "}}]}}"
    r = await while_healthz_answers(
        client, client.post(URL, content=text, headers={**tenant.headers, "Content-Type": content_type})
    )
    errors = problem(r, 422)["errors"]
    assert errors[0]["pointer"].startswith("/body/definition/steps/0/args/v/0/0")
    assert f"nested too deeply (over {MAX_DOCUMENT_DEPTH} levels)" in errors[0]["message"]


async def test_too_many_expressions_is_422(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    args = {f"k{i}": f"${{{{ input.x + {i} }}}}" for i in range(MAX_EXPRESSIONS + 5)}
    body = {"name": "many", "definition": {"steps": [{"id": "a", "tool": "echo", "args": args}]}}
    r = await while_healthz_answers(client, client.post(URL, json=body, headers=tenant.headers))
    errors = problem(r, 422)["errors"]
    assert [e["message"] for e in errors] == [f"too many expressions (at most {MAX_EXPRESSIONS} in a definition)"]
    assert errors[0]["pointer"].startswith("/definition/steps/0/args/")


async def test_a_huge_input_schema_is_422(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(MAX_SCHEMA_VALUES)}}
    body = {"name": "schema", "definition": {"input_schema": schema, "steps": [{"id": "a", "tool": "echo"}]}}
    r = await while_healthz_answers(client, client.post(URL, json=body, headers=tenant.headers))
    errors = problem(r, 422)["errors"]
    assert errors == [{"pointer": "/definition/input_schema",
                       "message": f"schema too large (over {MAX_SCHEMA_VALUES} values)"}]
