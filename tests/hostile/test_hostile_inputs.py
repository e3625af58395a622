"""Every operation of the OpenAPI document, fed each class of hostile input, answers a 4xx problem+json.

The walk is driven by the document itself: for each operation, each parameter and each string, integer,
number or free-form field of its request body (found by walking the body's schema from a valid-ish base
body) gets NUL characters, lone surrogates, integers past 64 bits, numbers past a double or a column,
NaN and Infinity, and the body as a whole gets duplicate keys. The workflow and tool operations also get
exponential and recursive YAML aliases and costly CEL; those go to an API in a child process, so a parser
that hangs fails the test on the time bound instead of hanging the run.
"""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.main import create_app
from tests.support.hostile import PROVIDER, TOOL, ApiProcess, World

PROBLEM = "application/problem+json"
TIME_BOUND_S = 10.0  # a safety net against a hang, not a speed requirement

DOC = create_app(Settings()).openapi()
SCHEMAS: dict[str, Any] = DOC["components"]["schemas"]
METHODS = ("get", "post", "put", "patch", "delete")

# Bodies the schema alone cannot make useful (free-form definitions and specs).
BASE_BODIES: dict[tuple[str, str], Any] = {
    ("POST", "/api/v1/workflows"): {"name": "hw2", "definition": {"steps": [
        {"id": "a", "tool": "echo", "args": {"x": "y"}}]}},
    ("POST", "/api/v1/tools"): {**TOOL, "name": "ht2"},
    ("PUT", "/api/v1/providers/{name}"): PROVIDER,
    ("POST", "/api/v1/runs"): {"workflow": "hw", "input": {"k": "v"}},
    ("POST", "/api/v1/runs/{run_id}/signals/{name}"): {"payload": {"k": "v"}},
}

# Raw JSON tokens that json.dumps cannot write; a marker string is swapped for them in the text.
RAW = {"__NAN__": "NaN", "__INF__": "Infinity", "__OVERFLOW__": "1e400"}


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    spec: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.method} {self.path}"


@dataclass
class Attack:
    """One request: where the hostile value went, and the request's pieces."""

    where: str
    path_params: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None
    content_type: str = "application/json"


# --- schema walking ----------------------------------------------------------------------------------


def resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = SCHEMAS[schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def branch(schema: dict[str, Any]) -> dict[str, Any]:
    """The first non-null branch of a union (for a tool's executor, the http one)."""
    schema = resolve(schema)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = [resolve(option) for option in schema[key]]
            return branch(next(option for option in options if option.get("type") != "null"))
    return schema


def kind(schema: dict[str, Any]) -> str:
    schema = branch(schema)
    kinds = schema.get("type", "object" if "properties" in schema else "any")
    return kinds[0] if isinstance(kinds, list) else str(kinds)


def example(schema: dict[str, Any]) -> Any:
    """A valid-ish value: required properties only, the first enum value, the minimum number."""
    schema = branch(schema)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    if "examples" in schema and schema["examples"]:
        return copy.deepcopy(schema["examples"][0])
    match kind(schema):
        case "object":
            required = schema.get("required", [])
            return {name: example(sub) for name, sub in schema.get("properties", {}).items() if name in required}
        case "array":
            return [example(schema["items"]) for _ in range(schema.get("minItems", 0))]
        case "string":
            if schema.get("format") == "uuid":
                return str(uuid.uuid4())
            if schema.get("format") == "date-time":
                return "2030-01-01T00:00:00Z"
            return "hx1"
        case "integer":
            return max(schema.get("minimum", 1), 1)
        case "number":
            return 1
        case "boolean":
            return True
    return {}


def leaves(schema: dict[str, Any], path: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """(path, kind) of every string, integer, number and free-form value a body may hold."""
    schema = branch(schema)
    what = kind(schema)
    if what == "object" and schema.get("properties"):
        for name, sub in schema["properties"].items():
            yield from leaves(sub, (*path, name))
    elif what == "object" or what == "any":
        yield path, "free"
    elif what == "array":
        yield from leaves(schema["items"], (*path, 0))
    elif what in ("string", "integer", "number"):
        yield path, what


def schema_at(schema: dict[str, Any], path: tuple[str | int, ...]) -> dict[str, Any]:
    for part in path:
        schema = branch(schema)
        schema = schema["items"] if isinstance(part, int) else schema.get("properties", {}).get(part, {})
    return schema


def put(body: Any, schema: dict[str, Any], path: tuple[str | int, ...], value: Any) -> Any:
    """A copy of ``body`` with ``value`` at ``path``, filling in what is missing on the way."""
    body = copy.deepcopy(body)
    if not path:
        return value
    node = body
    for depth, part in enumerate(path[:-1]):
        child_schema = schema_at(schema, path[: depth + 1])
        if isinstance(part, int):
            while len(node) <= part:
                node.append(example(child_schema))
        elif part not in node or not isinstance(node[part], dict | list):
            node[part] = example(child_schema)
        node = node[part]
    last = path[-1]
    if isinstance(last, int):
        while len(node) <= last:
            node.append(None)
    node[last] = value
    return body


def dumps(body: Any) -> bytes:
    text = json.dumps(body)  # ensure_ascii: a lone surrogate goes out as the escape \ud800
    for marker, token in RAW.items():
        text = text.replace(json.dumps(marker), token)
    return text.encode()


# --- the operations and their attacks ----------------------------------------------------------------


def operations() -> list[Operation]:
    return [
        Operation(method.upper(), path, spec)
        for path, item in DOC["paths"].items()
        for method, spec in item.items()
        if method in METHODS
    ]


def body_schema(op: Operation) -> dict[str, Any] | None:
    content = op.spec.get("requestBody", {}).get("content", {})
    media = content.get("application/json")
    return media["schema"] if media else None


def base_body(op: Operation) -> Any:
    schema = body_schema(op)
    if (op.method, op.path) in BASE_BODIES:
        return copy.deepcopy(BASE_BODIES[(op.method, op.path)])
    return example(schema) if schema is not None else None


def path_values(op: Operation, world: World) -> dict[str, str]:
    values = {"run_id": str(world.run_id), "step_id": "a", "version": "1"}
    names = {"workflows": "hw", "tools": "ht", "providers": "hp", "secrets": "hs", "signals": "go"}
    for param in op.spec.get("parameters", []):
        if param["in"] == "path" and param["name"] not in values:
            segment = op.path.split("/{" + param["name"] + "}")[0].rsplit("/", 1)[-1]
            schema = branch(param["schema"])
            values[param["name"]] = names.get(segment, str(uuid.uuid4()) if schema.get("format") == "uuid" else "hx1")
    return values


# Per class: what goes into a string, integer or number leaf, and into a free-form field.
TEXT = {"nul": ["a\x00b"], "surrogate": ["\ud800", "a\udc00"]}
INTEGER = {"integer-range": [2**63, -(2**63) - 1, 10**30]}
NUMBER = {"number-range": [6.8e105, "__OVERFLOW__"], "non-finite": ["__NAN__", "__INF__"]}
FREE = {
    "nul": [{"k": ["a\x00b"]}, {"a\x00": 1}],
    "surrogate": [{"k": "\ud800"}, {"\udfff": 1}],
    "integer-range": [{"k": [2**63]}],
    "number-range": [{"k": "__OVERFLOW__"}],
    "non-finite": [{"k": ["__NAN__"]}],
}
# Parameters (path, query, header) by their type; surrogates cannot travel in a URL or a header.
PARAM_CLASSES = {
    "string": {"nul": ["a\x00b"]},
    "integer": {"integer-range": ["9223372036854775808", "99999999999999999999"]},
    "number": {"number-range": ["1e400", "6.8e105"], "non-finite": ["nan", "inf"]},
}


def attacks(op: Operation, cls: str, world: World) -> Iterator[Attack]:
    params = path_values(op, world)
    body = base_body(op)
    content = dumps(body) if body is not None else None
    for param in op.spec.get("parameters", []):
        for value in PARAM_CLASSES.get(kind(param["schema"]), {}).get(cls, []):
            where = f"/{param['in']}/{param['name']}={value!r}"
            if param["in"] == "path":
                yield Attack(where, path_params={**params, param["name"]: value}, content=content)
            elif param["in"] == "query":
                yield Attack(where, path_params=params, query={param["name"]: value}, content=content)
            elif param["in"] == "header":
                yield Attack(where, path_params=params, headers={param["name"]: value}, content=content)
    if cls == "nul":
        yield Attack("/header/x-steward-tenant", path_params=params, headers={"X-Steward-Tenant": "a\x00b"},
                     content=content)
    schema = body_schema(op)
    if schema is None:
        return
    for path, what in leaves(schema):
        table = {"string": TEXT, "integer": INTEGER, "number": NUMBER, "free": FREE}[what]
        for value in table.get(cls, []):
            yield Attack("/body" + "".join(f"/{p}" for p in path) + f"={value!r}", path_params=params,
                         content=dumps(put(body, schema, path, value)))
    if cls == "duplicate-keys":
        text = dumps(body).decode()
        first = next(iter(body), None) if isinstance(body, dict) else None
        if first is not None:
            repeated = "{" + json.dumps(first) + ": " + json.dumps(body[first]) + ", " + text[1:]
            yield Attack(f"/body/{first} twice", path_params=params, content=repeated.encode())
        yield Attack("/body/x/y twice", path_params=params,
                     content=dumps(put(body, schema, ("x",), "__DUP__")).replace(
                         b'"__DUP__"', b'{"y": 1, "y": 2}'))


CLASSES = ("nul", "surrogate", "integer-range", "number-range", "non-finite", "duplicate-keys")


def cases() -> Iterator[Any]:
    probe = World(tenant=None, run_id=uuid.uuid4())  # type: ignore[arg-type]  # shapes only
    for op in operations():
        for cls in CLASSES:
            if any(True for _ in attacks(op, cls, probe)):
                yield pytest.param(op, cls, id=f"{op.label} {cls}")


def url_of(op: Operation, params: dict[str, str]) -> str:
    url = op.path
    for name, value in params.items():
        url = url.replace("{" + name + "}", quote(value, safe=""))
    return url


async def send(http: httpx.AsyncClient, op: Operation, attack: Attack) -> httpx.Response:
    headers = dict(attack.headers)
    if attack.content is not None:
        headers["Content-Type"] = attack.content_type
    async with asyncio.timeout(TIME_BOUND_S):
        return await http.request(op.method, url_of(op, attack.path_params), params=attack.query,
                                  headers=headers, content=attack.content)


def refusal_problem(response: httpx.Response) -> str | None:
    """Why ``response`` is not a 4xx problem+json, or None."""
    if not 400 <= response.status_code < 500:
        return f"answered {response.status_code}: {response.text[:200]}"
    if response.headers.get("content-type") != PROBLEM:
        return f"answered {response.status_code} as {response.headers.get('content-type')}"
    return None


@pytest.mark.parametrize(("op", "cls"), list(cases()))
async def test_hostile_input_is_a_4xx_problem(app: FastAPI, world: World, op: Operation, cls: str) -> None:
    failures = []
    count = 0
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=world.tenant.headers) as http:
        for attack in attacks(op, cls, world):
            count += 1
            problem = refusal_problem(await send(http, op, attack))
            if problem is not None:
                failures.append(f"{attack.where}: {problem}")
    assert count > 0
    assert not failures, f"{op.label} {cls}:\n" + "\n".join(failures)


# --- YAML aliases and costly CEL: to a child process, which a hang cannot take down with the run ------

_LEVELS = ["a0: &a0 [" + ", ".join(['"lol"'] * 10) + "]"] + [
    f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)
]
EXPONENTIAL_YAML = (
    "name: bomb\ndefinition:\n  steps:\n  - id: a\n    tool: echo\n    args:\n"
    + "".join(f"      {line}\n" for line in _LEVELS)
)
RECURSIVE_YAML = "name: loop\ndefinition: &d\n  steps:\n  - id: a\n    tool: echo\n    args: *d\n"
_LIST = "[" + ", ".join(str(i) for i in range(20)) + "]"
# Five nested comprehensions over 20 items: 3.2 million evaluations, in 200-odd tokens.
COSTLY_CEL = f"{_LIST}.map(a, {_LIST}.map(b, {_LIST}.map(c, {_LIST}.map(d, {_LIST}.map(e, a + b + c + d + e)))))"

REMOTE_CASES = [
    pytest.param("/api/v1/workflows", EXPONENTIAL_YAML.encode(), "application/yaml", id="workflow exponential-yaml"),
    pytest.param("/api/v1/workflows", RECURSIVE_YAML.encode(), "application/yaml", id="workflow recursive-yaml"),
    pytest.param("/api/v1/workflows", dumps({"name": "cel", "definition": {"steps": [
        {"id": "a", "tool": "echo", "when": "${{ size(" + COSTLY_CEL + ") > 0 }}"}]}}), "application/json",
        id="workflow costly-cel-when"),
    pytest.param("/api/v1/workflows", dumps({"name": "cel2", "definition": {"steps": [
        {"id": "a", "tool": "echo", "args": {"v": "${{ " + COSTLY_CEL + " }}"}}]}}), "application/json",
        id="workflow costly-cel-args"),
    pytest.param("/api/v1/tools", dumps({**TOOL, "name": "cel", "autonomy": {
        "mode": "conditional", "condition": "size(" + COSTLY_CEL + ") > 0"}}), "application/json",
        id="tool costly-cel-condition"),
    pytest.param("/api/v1/tools", dumps({**TOOL, "name": "cel2", "response": "${{ " + COSTLY_CEL + " }}"}),
                 "application/json", id="tool costly-cel-response"),
]


@pytest.mark.parametrize(("url", "content", "media"), REMOTE_CASES)
async def test_hostile_definition_is_a_4xx_problem_in_time(
    api_process: ApiProcess, remote: httpx.AsyncClient, url: str, content: bytes, media: str
) -> None:
    try:
        async with asyncio.timeout(TIME_BOUND_S):
            response = await remote.post(url, content=content, headers={"Content-Type": media})
    except (TimeoutError, httpx.TransportError):
        api_process.restart()  # the request hung it: the next case needs a live server
        pytest.fail(f"no answer within {TIME_BOUND_S} s")
    problem = refusal_problem(response)
    assert problem is None, problem


def test_walk_covers_every_operation() -> None:
    """Every operation is attacked, and every one with a JSON body gets duplicate keys: the walk is not
    silently narrower than the API."""
    params = [case.values for case in cases()]
    assert {op.label for op, _ in params} == {op.label for op in operations()}
    body_ops = {op.label for op in operations() if body_schema(op) is not None}
    assert {op.label for op, cls in params if cls == "duplicate-keys"} == body_ops
    assert len(body_ops) >= 13
