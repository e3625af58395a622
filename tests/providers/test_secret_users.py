"""Deleting a secret that providers or tool versions still use: 409 naming them, unless forced."""

from __future__ import annotations

from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.support.tenants import TenantKey


async def put_secret(client: httpx.AsyncClient, tenant: TenantKey, name: str) -> None:
    r = await client.put(f"/api/v1/secrets/{name}", json={"value": "v-" + name}, headers=tenant.headers)
    assert r.status_code == 204, r.text


async def put_provider(client: httpx.AsyncClient, tenant: TenantKey, name: str, secret: str | None) -> None:
    body = {"base_url": "https://llm.example.com/v1", "api_key_secret": secret,
            "models": {"m": {"input_per_mtok": "1", "output_per_mtok": "1"}}}
    r = await client.put(f"/api/v1/providers/{name}", json=body, headers=tenant.headers)
    assert r.status_code in (200, 201), r.text


async def register_tool(client: httpx.AsyncClient, tenant: TenantKey, name: str, headers: dict[str, str]) -> int:
    body = {"name": name, "description": "a tool", "input_schema": {"type": "object"}, "effect": "read",
            "executor": {"kind": "http", "method": "POST", "url": "https://tool.example.com", "headers": headers}}
    r = await client.post("/api/v1/tools", json=body, headers=tenant.headers)
    assert r.status_code in (200, 201), r.text
    return int(r.json()["version"])


async def secret_names(client: httpx.AsyncClient, tenant: TenantKey) -> list[str]:
    return [s["name"] for s in (await client.get("/api/v1/secrets", headers=tenant.headers)).json()["items"]]


async def test_a_secret_in_use_is_kept_and_its_users_named(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    for name in ("crm_key", "crm_key_2", "other"):
        await put_secret(client, tenant, name)
    await put_provider(client, tenant, "openai", "crm_key")
    await put_provider(client, tenant, "local", None)
    # Versions 1 and 2 of `crm` use the secret; version 3 moved to another one, and `audit` names only a
    # secret whose name starts like it.
    assert await register_tool(client, tenant, "crm", {"Authorization": "Bearer ${{ secrets.crm_key }}"}) == 1
    assert await register_tool(client, tenant, "crm", {"X-Key": "${{ secrets.crm_key }}", "X-Other": "1"}) == 2
    assert await register_tool(client, tenant, "crm", {"X-Key": "${{ secrets.other }}"}) == 3
    await register_tool(client, tenant, "audit", {"X-Key": "${{ secrets.crm_key_2 }}"})

    refused = await client.delete("/api/v1/secrets/crm_key", headers=tenant.headers)
    assert refused.status_code == 409, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    problem = refused.json()
    assert problem["type"].endswith("/secret-in-use")
    assert problem["used_by"] == [
        {"kind": "provider", "name": "openai"},
        {"kind": "tool", "name": "crm", "version": 1},
        {"kind": "tool", "name": "crm", "version": 2},
    ]
    assert "provider 'openai', tool 'crm' version 1, tool 'crm' version 2" in problem["detail"]
    assert "?force=true" in problem["detail"]
    assert "crm_key" in await secret_names(client, tenant)

    # Every version counts (a step may run the version it started with): `audit` moving on to a static
    # header leaves its version 1 using crm_key_2.
    await register_tool(client, tenant, "audit", {"X-Key": "static"})
    still = await client.delete("/api/v1/secrets/crm_key_2", headers=tenant.headers)
    assert still.status_code == 409 and still.json()["used_by"] == [{"kind": "tool", "name": "audit", "version": 1}]


async def test_forced_delete_goes_through_and_is_audited(
    client: httpx.AsyncClient, tenant: TenantKey, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    await put_secret(client, tenant, "llm_key")
    await put_provider(client, tenant, "openai", "llm_key")
    forced = await client.delete("/api/v1/secrets/llm_key", params={"force": "true"}, headers=tenant.headers)
    assert forced.status_code == 204, forced.text
    assert "llm_key" not in await secret_names(client, tenant)
    async with sessionmaker() as session:
        data: Any = (await session.execute(text(
            "SELECT data FROM audit_event WHERE tenant_id = :t AND action = 'secret.delete'"),
            {"t": tenant.tenant_id})).scalar_one()
    assert data == {"forced": True, "used_by": [{"kind": "provider", "name": "openai"}]}


async def test_unused_secrets_and_other_tenants_users(
    client: httpx.AsyncClient, tenant: TenantKey, other_tenant: TenantKey
) -> None:
    await put_secret(client, tenant, "shared_name")
    await put_secret(client, other_tenant, "shared_name")
    await put_provider(client, other_tenant, "openai", "shared_name")  # another tenant's user does not count
    assert (await client.delete("/api/v1/secrets/shared_name", headers=tenant.headers)).status_code == 204
    refused = await client.delete("/api/v1/secrets/shared_name", headers=other_tenant.headers)
    assert refused.status_code == 409 and refused.json()["used_by"] == [{"kind": "provider", "name": "openai"}]
    missing = await client.delete("/api/v1/secrets/never_was", headers=tenant.headers)
    assert missing.status_code == 404
