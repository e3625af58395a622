"""The workflow API: create and version, JSON and YAML, read, paginate, validate, isolate tenants."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from datetime import datetime
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.context import Ctx
from app.workflows import service as workflows_service
from app.workflows.definition import parse_definition
from tests.support.tenants import MakeTenant, TenantKey

URL = "/api/v1/workflows"


def unique(prefix: str = "wf") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def definition(text: str = "hi") -> dict[str, Any]:
    return {
        "input_schema": {"type": "object", "properties": {"who": {"type": "string"}}},
        "steps": [
            {"id": "a", "tool": "echo", "args": {"text": text}},
            {"id": "b", "needs": ["a"], "tool": "echo", "args": {"prev": "${{ steps.a.output.text }}"}},
        ],
    }


async def post(
    client: httpx.AsyncClient, tenant: TenantKey, name: str, body: Any, **extra: Any
) -> httpx.Response:
    return await client.post(URL, json={"name": name, "definition": body, **extra}, headers=tenant.headers)


# --- create and version -----------------------------------------------------------------------------


async def test_create_returns_version_1(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    name = unique()
    response = await post(client, tenant, name, definition())
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["name"] == name
    assert body["version"] == 1
    assert body["definition"] == definition()
    uuid.UUID(body["id"])
    datetime.fromisoformat(body["created_at"])


async def test_reposting_the_same_definition_is_idempotent(
    client: httpx.AsyncClient, tenant: TenantKey
) -> None:
    name = unique()
    first = (await post(client, tenant, name, definition())).json()
    # Same document, keys in another order: same canonical hash.
    reordered = {"steps": definition()["steps"], "input_schema": definition()["input_schema"]}
    again = await post(client, tenant, name, reordered)
    assert again.status_code == 200
    assert again.json()["id"] == first["id"]
    assert again.json()["version"] == 1


async def test_changed_definition_is_the_next_version(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    name = unique()
    v1 = (await post(client, tenant, name, definition("one"))).json()
    response = await post(client, tenant, name, definition("two"))
    assert response.status_code == 201
    v2 = response.json()
    assert v2["version"] == 2 and v2["id"] != v1["id"]

    latest = (await client.get(f"{URL}/{name}", headers=tenant.headers)).json()
    assert latest["version"] == 2 and latest["definition"] == definition("two")
    old = (await client.get(f"{URL}/{name}/versions/1", headers=tenant.headers)).json()
    assert old["id"] == v1["id"] and old["definition"] == definition("one")
    # Going back to an old definition is a change from the latest: a third version.
    v3 = await post(client, tenant, name, definition("one"))
    assert v3.status_code == 201 and v3.json()["version"] == 3


async def test_yaml_body(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    name = unique("yaml")
    document = f"""
name: {name}
description: from YAML
definition:
  input_schema:
    type: object
    properties:
      who: {{type: string}}
  steps:
    - id: a
      tool: echo
      args: {{text: hi}}
    - id: b
      needs: [a]
      tool: echo
      args:
        prev: "${{{{ steps.a.output.text }}}}"
"""
    response = await client.post(
        URL, content=document, headers={**tenant.headers, "Content-Type": "application/yaml"}
    )
    assert response.status_code == 201, response.text
    assert response.json()["definition"] == definition()
    # The same definition as JSON is the same version.
    again = await post(client, tenant, name, definition())
    assert again.status_code == 200 and again.json()["id"] == response.json()["id"]


async def test_yaml_that_json_cannot_express(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    headers = {**tenant.headers, "Content-Type": "text/yaml"}
    # Dates stay strings, as they would be in JSON.
    document = (
        f"name: {unique()}\ndefinition:\n  steps:\n    - {{id: a, tool: echo, args: {{day: 2024-01-01}}}}\n"
    )
    response = await client.post(URL, content=document, headers=headers)
    assert response.status_code == 201, response.text
    assert response.json()["definition"]["steps"][0]["args"] == {"day": "2024-01-01"}

    # YAML 1.1 reads a bare `on` key as a boolean: not a JSON object key.
    document = f"name: {unique()}\ndefinition:\n  steps:\n    - {{id: a, tool: echo, args: {{on: 1}}}}\n"
    response = await client.post(URL, content=document, headers=headers)
    assert response.status_code == 422
    assert response.json()["errors"][0]["pointer"] == "/body/definition/steps/0/args/True"

    broken = await client.post(URL, content="name: [unclosed\n", headers=headers)
    assert broken.status_code == 400
    assert "YAML" in broken.json()["detail"]


async def test_yaml_alias_bomb_is_rejected(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    document = "\n".join([*lines, "name: bomb", "definition: {steps: *a8}"])
    response = await client.post(
        URL, content=document, headers={**tenant.headers, "Content-Type": "application/yaml"}
    )
    assert response.status_code == 400
    assert "too large" in response.json()["detail"]


async def test_unsupported_media_type_is_415(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    response = await client.post(
        URL, content="name=x", headers={**tenant.headers, "Content-Type": "application/x-www-form-urlencoded"}
    )
    assert response.status_code == 415
    assert response.headers["content-type"] == "application/problem+json"


# --- validation -------------------------------------------------------------------------------------


async def test_invalid_definition_is_422_with_pointers_under_definition(
    client: httpx.AsyncClient, tenant: TenantKey
) -> None:
    bad = {"steps": [{"id": "a", "tool": "no_such_tool"}, {"id": "b", "needs": ["zzz"], "tool": "echo"}]}
    response = await post(client, tenant, unique(), bad)
    assert response.status_code == 422, response.text
    body = response.json()
    assert response.headers["content-type"] == "application/problem+json"
    assert body["type"].endswith("/invalid")
    pointers = {err["pointer"] for err in body["errors"]}
    assert pointers == {"/definition/steps/0/tool", "/definition/steps/1/needs/0"}
    assert any("no_such_tool" in err["message"] for err in body["errors"])


async def test_definition_must_be_an_object(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    response = await post(client, tenant, unique(), ["not", "an", "object"])
    assert response.status_code == 422
    assert [err["pointer"] for err in response.json()["errors"]] == ["/body/definition"]


@pytest.mark.parametrize("name", ["", "-leading-dash", "has space", "x" * 129, "slash/name"])
async def test_invalid_names_are_422(client: httpx.AsyncClient, tenant: TenantKey, name: str) -> None:
    response = await post(client, tenant, name, definition())
    assert response.status_code == 422
    assert [err["pointer"] for err in response.json()["errors"]] == ["/body/name"]


async def test_missing_fields_are_422(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    response = await client.post(URL, json={}, headers=tenant.headers)
    assert response.status_code == 422
    assert {err["pointer"] for err in response.json()["errors"]} == {"/body/name", "/body/definition"}


async def test_too_many_steps_follows_settings(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    steps = [{"id": f"s{i}", "tool": "echo"} for i in range(201)]
    response = await post(client, tenant, unique(), {"steps": steps})
    assert response.status_code == 422
    assert [err["pointer"] for err in response.json()["errors"]] == ["/definition/steps"]


# --- reading and pagination -------------------------------------------------------------------------


async def test_get_unknown_workflow_is_404(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    for path in ("/nope", "/nope/versions", "/nope/versions/1"):
        response = await client.get(URL + path, headers=tenant.headers)
        assert response.status_code == 404, path
        assert response.json()["type"].endswith("/not-found")


async def test_get_unknown_version_is_404_and_bad_version_422(
    client: httpx.AsyncClient, tenant: TenantKey
) -> None:
    name = unique()
    await post(client, tenant, name, definition())
    assert (await client.get(f"{URL}/{name}/versions/2", headers=tenant.headers)).status_code == 404
    for bad in ("0", "abc", "99999999999"):
        response = await client.get(f"{URL}/{name}/versions/{bad}", headers=tenant.headers)
        assert response.status_code == 422, bad
        assert response.json()["errors"][0]["pointer"] == "/path/version"


async def test_list_is_paginated_by_name(client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    owner = await make_tenant()
    names = [f"list-{i}" for i in (3, 0, 4, 1, 2)]
    for name in names:
        await post(client, owner, name, definition())
    await post(client, owner, "list-1", definition("v2"))

    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await client.get(URL, params=params, headers=owner.headers)).json()
        pages += 1
        assert len(page["items"]) <= 2
        seen.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert [item["name"] for item in seen] == sorted(names)
    by_name = {item["name"]: item for item in seen}
    assert by_name["list-1"]["latest_version"] == 2 and by_name["list-0"]["latest_version"] == 1
    assert set(by_name["list-0"]) == {"name", "latest_version", "created_at", "updated_at"}


async def test_list_exact_page_has_no_next_cursor(client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    owner = await make_tenant()
    for name in ("a", "b"):
        await post(client, owner, name, definition())
    page = (await client.get(URL, params={"limit": 2}, headers=owner.headers)).json()
    assert [item["name"] for item in page["items"]] == ["a", "b"]
    assert page["next_cursor"] is None


async def test_versions_are_paginated_newest_first(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    name = unique()
    for text in ("one", "two", "three"):
        await post(client, tenant, name, definition(text))
    first = (await client.get(f"{URL}/{name}/versions", params={"limit": 2}, headers=tenant.headers)).json()
    assert [item["version"] for item in first["items"]] == [3, 2]
    assert first["next_cursor"]
    second = (
        await client.get(
            f"{URL}/{name}/versions",
            params={"limit": 2, "cursor": first["next_cursor"]},
            headers=tenant.headers,
        )
    ).json()
    assert [item["version"] for item in second["items"]] == [1]
    assert second["next_cursor"] is None
    assert set(second["items"][0]) == {"id", "name", "version", "created_at", "definition_hash"}


async def test_garbage_cursor_is_422(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    name = unique()
    await post(client, tenant, name, definition())
    for path in (URL, f"{URL}/{name}/versions"):
        response = await client.get(path, params={"cursor": "%%%not-base64"}, headers=tenant.headers)
        assert response.status_code == 422, path
        assert response.json()["errors"][0]["pointer"] == "/query/cursor"
    versions = await client.get(
        f"{URL}/{name}/versions", params={"cursor": "bm90LWEtbnVtYmVy"}, headers=tenant.headers
    )
    assert versions.status_code == 422


# --- tenant isolation -------------------------------------------------------------------------------


async def test_other_tenant_sees_nothing(
    client: httpx.AsyncClient, tenant: TenantKey, other_tenant: TenantKey
) -> None:
    name = unique("private")
    await post(client, tenant, name, definition())
    for path in (f"/{name}", f"/{name}/versions", f"/{name}/versions/1"):
        response = await client.get(URL + path, headers=other_tenant.headers)
        assert response.status_code == 404, path
    listed = (await client.get(URL, headers=other_tenant.headers)).json()
    assert listed["items"] == []

    # The same name is free in another tenant, and independent of the first.
    theirs = await post(client, other_tenant, name, definition("theirs"))
    assert theirs.status_code == 201 and theirs.json()["version"] == 1
    mine = (await client.get(f"{URL}/{name}", headers=tenant.headers)).json()
    assert mine["definition"] == definition() and mine["version"] == 1


# --- concurrency ------------------------------------------------------------------------------------


async def test_concurrent_different_posts_get_consecutive_versions(
    client: httpx.AsyncClient, tenant: TenantKey
) -> None:
    name = unique("race")
    responses = await asyncio.gather(*(post(client, tenant, name, definition(f"v{i}")) for i in range(5)))
    assert [r.status_code for r in responses] == [201] * 5, [r.text for r in responses]
    assert sorted(r.json()["version"] for r in responses) == [1, 2, 3, 4, 5]
    latest = (await client.get(f"{URL}/{name}", headers=tenant.headers)).json()
    assert latest["version"] == 5
    listed = (await client.get(f"{URL}/{name}/versions", headers=tenant.headers)).json()
    assert [item["version"] for item in listed["items"]] == [5, 4, 3, 2, 1]


async def test_concurrent_identical_posts_create_one_version(
    client: httpx.AsyncClient, tenant: TenantKey
) -> None:
    name = unique("race")
    responses = await asyncio.gather(*(post(client, tenant, name, definition()) for _ in range(5)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 200, 200, 200, 201], [r.text for r in responses]
    assert {r.json()["id"] for r in responses} == {responses[0].json()["id"]}
    assert {r.json()["version"] for r in responses} == {1}


# --- service functions used elsewhere ---------------------------------------------------------------


async def test_service_get_workflow_version(
    sessionmaker: async_sessionmaker[AsyncSession], client: httpx.AsyncClient, tenant: TenantKey
) -> None:
    name = unique()
    await post(client, tenant, name, definition("one"))
    await post(client, tenant, name, definition("two"))
    ctx = Ctx(tenant_id=tenant.tenant_id, principal="test", roles=frozenset({"viewer"}))
    async with sessionmaker() as db:
        assert (await workflows_service.get_workflow_version(db, ctx, name, None)).version == 2
        assert (await workflows_service.get_workflow_version(db, ctx, name, 1)).definition == definition(
            "one"
        )
        with pytest.raises(workflows_service.WorkflowNotFound):
            await workflows_service.get_workflow_version(db, ctx, name, 3)
        stranger = Ctx(tenant_id=uuid.uuid4(), principal="test", roles=frozenset({"admin"}))
        with pytest.raises(workflows_service.WorkflowNotFound):
            await workflows_service.get_workflow_version(db, stranger, name, None)


async def test_ensure_example_workflows(
    sessionmaker: async_sessionmaker[AsyncSession], client: httpx.AsyncClient, tenant: TenantKey
) -> None:
    async with sessionmaker() as db, db.begin():
        assert await workflows_service.ensure_example_workflows(db, tenant.tenant_id) == ["hello"]
    async with sessionmaker() as db, db.begin():
        assert await workflows_service.ensure_example_workflows(db, tenant.tenant_id) == []

    hello = (await client.get(f"{URL}/hello", headers=tenant.headers)).json()
    assert hello["version"] == 1
    parsed = parse_definition(hello["definition"])
    assert [step.kind for step in parsed.steps] == ["tool", "map", "tool"]
    greet = parsed.step("greet").map
    assert greet is not None and greet.concurrency == 4
    assert set(parsed.step("summary").needs) == {"start", "greet"}
    assert hello["definition"]["input_schema"]["required"] == ["names"]


async def test_create_workflow_with_the_transactional_db_fixture(db: AsyncSession, tenant: TenantKey) -> None:
    ctx = Ctx(tenant_id=tenant.tenant_id, principal="test", roles=frozenset({"author"}))
    version, created = await workflows_service.create_workflow(db, ctx, name="in-tx", definition=definition())
    assert created and version.version == 1
    again, created_again = await workflows_service.create_workflow(
        db, ctx, name="in-tx", definition=definition()
    )
    assert not created_again and again.id == version.id
