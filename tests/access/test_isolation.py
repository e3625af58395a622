"""Tenant isolation: another tenant's ids answer 404 everywhere; row-level security is the second wall."""

from __future__ import annotations

import re
import uuid
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.engine.notify import asyncpg_dsn
from tests.support.runs import create_workflow, name, start_run, wait_for
from tests.support.tenants import TenantKey

pytestmark = pytest.mark.xdist_group("engine")

# Bodies that pass validation, so the answer is about the resource, not the request.
BODIES: dict[tuple[str, str], Any] = {
    ("POST", "/api/v1/approvals/{approval_id}/decision"): {"decision": "approve"},
    ("PUT", "/api/v1/runs/{run_id}/limits"): {"max_steps": 5},
    ("PUT", "/api/v1/members/{user_id}"): {"roles": ["viewer"]},
    ("POST", "/api/v1/runs/{run_id}/signals/{name}"): {"payload": 1},
}
MODELS = {"m": {"input_per_mtok": 1, "output_per_mtok": 1}}
# PUT by name creates the caller's own resource of that name: it must leave the other tenant's alone.
UPSERTS = {("PUT", "/api/v1/secrets/{name}"), ("PUT", "/api/v1/providers/{name}")}
UPSERT_BODIES = {
    "/api/v1/secrets/{name}": {"value": "mine"},
    "/api/v1/providers/{name}": {"base_url": "https://llm.example.com/v1", "models": MODELS},
}


async def _ok(response: httpx.Response, *statuses: int) -> Any:
    assert response.status_code in statuses, response.text
    return response.json() if response.content else None


async def _populate(client: httpx.AsyncClient, owner: TenantKey) -> dict[str, str]:
    """One of everything in ``owner``'s tenant; returns path-parameter values naming them."""
    h = owner.headers
    secret = f"s_{uuid.uuid4().hex[:8]}"
    await _ok(await client.put(f"/api/v1/secrets/{secret}", json={"value": "theirs"}, headers=h), 204)
    await _ok(await client.put(f"/api/v1/providers/{secret}", json={"base_url": "https://b.example/v1",
                                                                     "models": MODELS}, headers=h), 201)
    tool = f"t_{uuid.uuid4().hex[:8]}"
    await _ok(await client.post("/api/v1/tools", json={
        "name": tool, "description": "d", "input_schema": {"type": "object"}, "effect": "read",
        "executor": {"kind": "builtin", "name": "echo"}}, headers=h), 201)
    wf = name()
    await create_workflow(client, h, wf, [{"id": "gate", "approval": {"reason": "?"}},
                                          {"id": "w", "needs": ["gate"], "wait": {"signal": "go"}}])
    run = await start_run(client, h, wf)
    await wait_for(client, h, run["id"], lambda r: r["steps"][0]["status"] == "waiting")
    approvals = await _ok(await client.get("/api/v1/approvals", params={"status": "pending"}, headers=h), 200)
    member = await _ok(await client.post("/api/v1/members", json={"subject": f"u-{uuid.uuid4()}",
                                                                 "roles": ["viewer"]}, headers=h), 201)
    key = await _ok(await client.post("/api/v1/api-keys", json={"name": "k", "roles": ["viewer"]}, headers=h), 201)
    return {"run_id": run["id"], "step_id": "gate", "approval_id": approvals["items"][0]["id"], "name": wf,
            "tool_name": tool, "user_id": str(member["user_id"]), "key_id": str(key["id"]), "version": "1",
            "secret": secret}


def _value(path: str, param: str, ids: dict[str, str]) -> str:
    if param != "name":
        return ids[param]
    if path.startswith("/api/v1/tools"):
        return ids["tool_name"]
    if path.startswith(("/api/v1/secrets", "/api/v1/providers")):
        return ids["secret"]
    return ids["name"]


async def test_every_route_answers_404_for_another_tenants_ids(
    app: FastAPI, client: httpx.AsyncClient, tenant: TenantKey, other_tenant: TenantKey, worker: Settings
) -> None:
    theirs = await _populate(client, other_tenant)
    walked = 0
    ops = [(method.upper(), path, item[method]) for path, item in app.openapi()["paths"].items()
           if re.search(r"\{\w+\}", path) for method in item]
    # Upserts last: they create the caller's own namesakes, which later calls would then find.
    for method, path, operation in sorted(ops, key=lambda op: (op[0], op[1]) in UPSERTS):
        url = re.sub(r"\{(\w+)\}", lambda m, path=path: _value(path, m.group(1), theirs), path)
        if (method, path) in UPSERTS:
            await _ok(await client.request(method, url, json=UPSERT_BODIES[path], headers=tenant.headers),
                      200, 201, 204)
            continue
        assert "requestBody" not in operation or (method, path) in BODIES, f"give {method} {path} a body in BODIES"
        response = await client.request(method, url, json=BODIES.get((method, path)), headers=tenant.headers)
        assert response.status_code == 404, f"{method} {url}: {response.status_code} {response.text}"
        assert response.headers["content-type"] == "application/problem+json"
        walked += 1
    assert walked >= 20
    # Nothing of theirs moved: the run still waits at its gate, their secret and provider are theirs.
    h = other_tenant.headers
    run = await _ok(await client.get(f"/api/v1/runs/{theirs['run_id']}", headers=h), 200)
    assert run["status"] not in ("cancelled", "paused") and run["steps"][0]["status"] == "waiting"
    provider = await _ok(await client.get(f"/api/v1/providers/{theirs['secret']}", headers=h), 200)
    assert provider["base_url"] == "https://b.example/v1"
    members = await _ok(await client.get("/api/v1/members", headers=h), 200)
    assert [m["roles"] for m in members["items"] if str(m["user_id"]) == theirs["user_id"]] == [["viewer"]]


async def _app_role_connection(settings: Settings) -> asyncpg.Connection[Any]:
    assert settings.database_url is not None
    return await asyncpg.connect(asyncpg_dsn(settings.database_url),
                                 server_settings={"role": settings.db_app_role})


async def test_row_level_security_hides_every_tenant_table_without_the_setting(
    client: httpx.AsyncClient, tenant: TenantKey, other_tenant: TenantKey, settings: Settings, worker: Settings
) -> None:
    for owner in (tenant, other_tenant):
        await _populate(client, owner)
    conn = await _app_role_connection(settings)
    try:
        assert await conn.fetchval("SELECT current_user") == settings.db_app_role
        tables = [r["table_name"] for r in await conn.fetch(
            "SELECT table_name FROM information_schema.columns WHERE table_schema = 'public' "
            "AND column_name = 'tenant_id' ORDER BY table_name")]
        assert {"run", "step_run", "audit_event", "api_key", "secret", "membership", "approval"} <= set(tables)
        unprotected = await conn.fetch(
            "SELECT relname FROM pg_class WHERE relname = ANY($1::text[]) AND NOT relrowsecurity", tables)
        assert unprotected == []
        # A query that forgets its tenant filter, on a connection without the setting: nothing at all.
        for table in [*tables, "tenant", "app_user"]:
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0, table
        # Scoped to one tenant: only that tenant's rows, however the query is written.
        async with conn.transaction():
            await conn.execute("SELECT set_config('steward.tenant_id', $1, true)", str(tenant.tenant_id))
            for table in tables:
                foreign = await conn.fetchval(f"SELECT count(*) FROM {table} WHERE tenant_id <> $1", tenant.tenant_id)
                assert foreign == 0, table
            assert await conn.fetchval("SELECT count(*) FROM run") > 0
            assert await conn.fetchval("SELECT count(*) FROM tenant") == 1
        # The setting ended with the transaction.
        assert await conn.fetchval("SELECT count(*) FROM run") == 0
        # Writing into another tenant is refused too.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with conn.transaction():
                await conn.execute("SELECT set_config('steward.tenant_id', $1, true)", str(tenant.tenant_id))
                await conn.execute("INSERT INTO secret (tenant_id, name, ciphertext) VALUES ($1, 'x', 'x')",
                                   other_tenant.tenant_id)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetchval("SELECT count(*) FROM web_session")
    finally:
        await conn.close()


async def test_api_requests_run_as_the_application_role(app: FastAPI, settings: Settings) -> None:
    async with app.state.runtime.engine.connect() as conn:
        user = (await conn.exec_driver_sql("SELECT current_user")).scalar()
    assert user == settings.db_app_role
