"""The runs API without a worker: starting, idempotency, validation, listing, isolation."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from tests.support.runs import create_workflow, name, start_run
from tests.support.tenants import MakeApiKey, MakeTenant, TenantKey

pytestmark = pytest.mark.xdist_group("engine")


SCHEMA = {
    "type": "object",
    "required": ["customer"],
    "additionalProperties": False,
    "properties": {
        "customer": {
            "type": "object",
            "required": ["id"],
            "properties": {"id": {"type": "integer", "minimum": 1}},
        }
    },
}


async def test_start_run_returns_the_run_with_queued_first_step(
    client: httpx.AsyncClient, tenant: TenantKey
) -> None:
    wf = name()
    await create_workflow(
        client, tenant.headers, wf, [{"id": "a", "tool": "echo"}, {"id": "b", "needs": ["a"], "tool": "echo"}]
    )
    r = await client.post("/api/v1/runs", json={"workflow": wf, "input": {}}, headers=tenant.headers)
    assert r.status_code == 201
    run = r.json()
    assert r.headers["location"] == f"/api/v1/runs/{run['id']}"
    assert run["status"] == "queued" and run["workflow"] == wf and run["workflow_version"] == 1
    assert [(s["id"], s["status"]) for s in run["steps"]] == [("a", "queued"), ("b", "pending")]
    assert run["steps"][0]["attempts"][0]["status"] == "queued"
    assert [e["type"] for e in run["events"]][:2] == ["run_created", "step_queued"]


async def test_runs_use_the_version_they_started_with(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    wf = name()
    await create_workflow(client, tenant.headers, wf, [{"id": "a", "tool": "echo"}])
    first = await start_run(client, tenant.headers, wf)
    await create_workflow(
        client, tenant.headers, wf, [{"id": "x", "tool": "echo"}, {"id": "y", "tool": "echo"}]
    )
    second = await start_run(client, tenant.headers, wf)
    pinned = await start_run(client, tenant.headers, wf, version=1)
    assert (
        first["workflow_version"] == 1 and second["workflow_version"] == 2 and pinned["workflow_version"] == 1
    )
    assert [s["id"] for s in second["steps"]] == ["x", "y"]
    r = await client.post("/api/v1/runs", json={"workflow": wf, "version": 9}, headers=tenant.headers)
    assert r.status_code == 404


async def test_idempotency_key_replay(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    wf = name()
    await create_workflow(client, tenant.headers, wf, [{"id": "a", "tool": "echo"}])
    headers = {**tenant.headers, "Idempotency-Key": f"order-{uuid.uuid4()}"}
    body = {"workflow": wf, "input": {"n": 1}}
    first = await client.post("/api/v1/runs", json=body, headers=headers)
    again = await client.post("/api/v1/runs", json=body, headers=headers)
    assert first.status_code == 201 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    other = await client.post("/api/v1/runs", json={**body, "input": {"n": 2}}, headers=headers)
    assert other.status_code == 422
    assert other.headers["content-type"].startswith("application/problem+json")
    assert other.json()["type"].endswith("/idempotency-key-reused")
    listed = (await client.get("/api/v1/runs", params={"workflow": wf}, headers=tenant.headers)).json()
    assert len(listed["items"]) == 1


async def test_concurrent_requests_with_one_idempotency_key_start_one_run(
    client: httpx.AsyncClient, tenant: TenantKey
) -> None:
    wf = name()
    await create_workflow(client, tenant.headers, wf, [{"id": "a", "tool": "echo"}])
    headers = {**tenant.headers, "Idempotency-Key": uuid.uuid4().hex}
    responses = await asyncio.gather(
        *(client.post("/api/v1/runs", json={"workflow": wf}, headers=headers) for _ in range(6))
    )
    assert sorted(r.status_code for r in responses) == [200] * 5 + [201]
    assert len({r.json()["id"] for r in responses}) == 1


async def test_the_same_key_in_another_tenant_is_another_run(
    client: httpx.AsyncClient, tenant: TenantKey, other_tenant: TenantKey
) -> None:
    key = uuid.uuid4().hex
    ids = []
    for t in (tenant, other_tenant):
        await create_workflow(client, t.headers, "shared_name", [{"id": "a", "tool": "echo"}])
        r = await client.post(
            "/api/v1/runs", json={"workflow": "shared_name"}, headers={**t.headers, "Idempotency-Key": key}
        )
        assert r.status_code == 201
        ids.append(r.json()["id"])
    assert ids[0] != ids[1]


async def test_input_is_validated_against_the_input_schema(
    client: httpx.AsyncClient, tenant: TenantKey
) -> None:
    wf = name()
    r = await client.post(
        "/api/v1/workflows",
        json={"name": wf, "definition": {"input_schema": SCHEMA, "steps": [{"id": "a", "tool": "echo"}]}},
        headers=tenant.headers,
    )
    assert r.status_code == 201
    bad = await client.post(
        "/api/v1/runs",
        json={"workflow": wf, "input": {"customer": {"id": 0}, "x": 1}},
        headers=tenant.headers,
    )
    assert bad.status_code == 422
    pointers = sorted(e["pointer"] for e in bad.json()["errors"])
    assert pointers == ["/input", "/input/customer/id"]
    ok = await client.post(
        "/api/v1/runs", json={"workflow": wf, "input": {"customer": {"id": 7}}}, headers=tenant.headers
    )
    assert ok.status_code == 201


@pytest.mark.parametrize(
    "body",
    [
        {"workflow": "x", "unknown": 1},
        {"workflow": "x", "priority": "urgent"},
        {"workflow": ""},
        {"input": {}},
    ],
)
async def test_bad_run_requests_are_422(
    client: httpx.AsyncClient, tenant: TenantKey, body: dict[str, object]
) -> None:
    r = await client.post("/api/v1/runs", json=body, headers=tenant.headers)
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")


async def test_unknown_workflow_is_404(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    r = await client.post("/api/v1/runs", json={"workflow": "nope"}, headers=tenant.headers)
    assert r.status_code == 404


async def test_list_runs_filters_and_keyset_pagination(
    client: httpx.AsyncClient, make_tenant: MakeTenant
) -> None:
    t = await make_tenant()
    a, b = name(), name()
    await create_workflow(client, t.headers, a, [{"id": "s", "tool": "echo"}])
    await create_workflow(client, t.headers, b, [{"id": "w", "wait": {"signal": "go"}}])
    made = [await start_run(client, t.headers, a) for _ in range(5)] + [await start_run(client, t.headers, b)]
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/api/v1/runs", params=params, headers=t.headers)).json()
        seen += [r["id"] for r in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [r["id"] for r in reversed(made)]
    waiting = (await client.get("/api/v1/runs", params={"status": "waiting"}, headers=t.headers)).json()
    assert [r["id"] for r in waiting["items"]] == [made[-1]["id"]]
    only_a = (await client.get("/api/v1/runs", params={"workflow": a}, headers=t.headers)).json()
    assert len(only_a["items"]) == 5
    since = made[3]["created_at"]
    recent = (await client.get("/api/v1/runs", params={"created_after": since}, headers=t.headers)).json()
    assert [r["id"] for r in recent["items"]] == [made[5]["id"], made[4]["id"], made[3]["id"]]
    bad = await client.get("/api/v1/runs", params={"cursor": "garbage!"}, headers=t.headers)
    assert bad.status_code == 422 and bad.json()["errors"][0]["pointer"] == "/query/cursor"
    assert (await client.get("/api/v1/runs", params={"status": "nope"}, headers=t.headers)).status_code == 422


async def test_events_are_paginated(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    wf = name()
    await create_workflow(
        client, tenant.headers, wf, [{"id": "a", "tool": "echo"}, {"id": "b", "tool": "echo"}]
    )
    run = await start_run(client, tenant.headers, wf)
    page = (
        await client.get(f"/api/v1/runs/{run['id']}/events", params={"limit": 2}, headers=tenant.headers)
    ).json()
    assert [e["type"] for e in page["items"]] == ["run_created", "step_queued"]
    rest = (
        await client.get(
            f"/api/v1/runs/{run['id']}/events", params={"cursor": page["next_cursor"]}, headers=tenant.headers
        )
    ).json()
    assert [e["type"] for e in rest["items"]] == ["step_queued"] and rest["next_cursor"] is None


async def test_long_poll_returns_after_the_wait_when_the_run_is_not_done(
    client: httpx.AsyncClient, tenant: TenantKey
) -> None:
    wf = name()
    await create_workflow(client, tenant.headers, wf, [{"id": "w", "wait": {"signal": "go"}}])
    run = await start_run(client, tenant.headers, wf)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    r = await client.get(f"/api/v1/runs/{run['id']}", params={"wait": 0.5}, headers=tenant.headers)
    assert r.status_code == 200 and r.json()["status"] == "waiting"
    assert 0.45 <= loop.time() - t0 < 3


async def test_long_poll_wakes_when_the_run_ends(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    wf = name()
    await create_workflow(client, tenant.headers, wf, [{"id": "w", "wait": {"signal": "go"}}])
    run = await start_run(client, tenant.headers, wf)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    poll = asyncio.create_task(
        client.get(f"/api/v1/runs/{run['id']}", params={"wait": 20}, headers=tenant.headers)
    )
    await asyncio.sleep(0.3)
    await client.post(f"/api/v1/runs/{run['id']}/cancel", headers=tenant.headers)
    r = await poll
    assert r.json()["status"] == "cancelled"
    assert loop.time() - t0 < 2


async def test_viewer_cannot_start_or_act(
    client: httpx.AsyncClient, tenant: TenantKey, make_api_key: MakeApiKey
) -> None:
    wf = name()
    await create_workflow(client, tenant.headers, wf, [{"id": "w", "wait": {"signal": "go"}}])
    run = await start_run(client, tenant.headers, wf)
    viewer_key = await make_api_key(tenant.tenant_id, roles=("viewer",))
    headers = {"Authorization": f"Bearer {viewer_key}"}
    assert (await client.get(f"/api/v1/runs/{run['id']}", headers=headers)).status_code == 200
    assert (await client.post("/api/v1/runs", json={"workflow": wf}, headers=headers)).status_code == 403
    for action in ("pause", "cancel", "retry", "resume"):
        assert (await client.post(f"/api/v1/runs/{run['id']}/{action}", headers=headers)).status_code == 403



async def test_another_tenants_run_is_404_on_every_endpoint(
    client: httpx.AsyncClient, tenant: TenantKey, other_tenant: TenantKey
) -> None:
    wf = name()
    await create_workflow(client, tenant.headers, wf, [{"id": "w", "wait": {"signal": "go"}}])
    run = await start_run(client, tenant.headers, wf)
    rid = run["id"]
    h = other_tenant.headers
    calls = [
        client.get(f"/api/v1/runs/{rid}", headers=h),
        client.get(f"/api/v1/runs/{rid}", params={"wait": 1}, headers=h),
        client.get(f"/api/v1/runs/{rid}/events", headers=h),
        client.post(f"/api/v1/runs/{rid}/pause", headers=h),
        client.post(f"/api/v1/runs/{rid}/resume", headers=h),
        client.post(f"/api/v1/runs/{rid}/cancel", headers=h),
        client.post(f"/api/v1/runs/{rid}/retry", headers=h),
        client.post(f"/api/v1/runs/{rid}/signals/go", json={"payload": 1}, headers=h),
        client.post("/api/v1/runs", json={"workflow": wf}, headers=h),
    ]
    for response in await asyncio.gather(*calls):
        assert response.status_code == 404, (response.request.url, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
    assert (await client.get("/api/v1/runs", headers=h)).json()["items"] == []
    still = (await client.get(f"/api/v1/runs/{rid}", headers=tenant.headers)).json()
    assert still["status"] == "waiting"


async def test_unknown_run_is_404(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    r = await client.get(f"/api/v1/runs/{uuid.uuid4()}", headers=tenant.headers)
    assert r.status_code == 404 and r.json()["type"].endswith("/run-not-found")
    assert (await client.get("/api/v1/runs/not-a-uuid", headers=tenant.headers)).status_code == 422


async def test_nan_in_run_input_or_signal_payload_is_422(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    wf = name()
    await create_workflow(client, tenant.headers, wf, [{"id": "w", "wait": {"signal": "go"}}])
    headers = {**tenant.headers, "Content-Type": "application/json"}
    r = await client.post("/api/v1/runs", content=f'{{"workflow": "{wf}", "input": {{"x": [NaN]}}}}', headers=headers)
    assert r.status_code == 422
    run = await start_run(client, tenant.headers, wf)
    r = await client.post(f"/api/v1/runs/{run['id']}/signals/go", content='{"payload": Infinity}', headers=headers)
    assert r.status_code == 422


INVALID_DEFINITIONS = [
    ({"steps": [{"id": "a", "needs": ["b"], "tool": "echo"}, {"id": "b", "needs": ["a"], "tool": "echo"}]},
     "/definition/steps/0/needs", "cycle"),
    ({"steps": [{"id": "a", "needs": ["ghost"], "tool": "echo"}]}, "/definition/steps/0/needs/0", "ghost"),
    ({"steps": [{"id": "a", "tool": "echo"}, {"id": "a", "tool": "echo"}]}, "/definition/steps/1/id", "duplicate"),
    ({"steps": [{"id": "a", "teleport": {}}]}, "/definition/steps/0", ""),
    ({"steps": [{"id": "a", "llm": {"model": "x/y"}}]}, "/definition/steps/0/llm", "missing required field 'prompt'"),
    ({"steps": [{"id": "a", "tool": "nope"}]}, "/definition/steps/0/tool", "echo"),
    ({"steps": [{"id": "a", "tool": "echo", "args": {"x": "${{ input.( }}"}}]}, "/definition/steps/0/args/x", ""),
    ({"steps": [{"id": "a", "when": "${{ 1 + }}", "tool": "echo"}]}, "/definition/steps/0/when", ""),
    ({"steps": [{"id": "a", "tool": "echo", "args": {"x": "${{ steps.b.output }}"}}, {"id": "b", "tool": "echo"}]},
     "/definition/steps/0/args/x", "need"),
    ({"input_schema": {"type": "objekt"}, "steps": [{"id": "a", "tool": "echo"}]}, "/definition/input_schema", ""),
    ({"steps": [{"id": f"s{i}", "tool": "echo"} for i in range(201)]}, "/definition/steps", "200"),
    ({"steps": []}, "/definition/steps", ""),
]


@pytest.mark.parametrize(("definition", "pointer", "words"), INVALID_DEFINITIONS)
async def test_every_invalid_definition_is_422_pointing_at_the_place(
    client: httpx.AsyncClient, tenant: TenantKey, definition: dict[str, object], pointer: str, words: str
) -> None:
    r = await client.post("/api/v1/workflows", json={"name": name(), "definition": definition},
                          headers=tenant.headers)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    errors = r.json()["errors"]
    matching = [e for e in errors if e["pointer"].startswith(pointer)]
    assert matching, errors
    assert any(words in e["message"] for e in matching), errors
