"""The tool registry and secrets APIs: validation, versions, roles, and secrets never coming back."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.support.tenants import MakeTenant, TenantKey
from tests.support.tools import http_tool, register

SECRET = "sk-live-4f1d2c8e9a7b"


async def test_register_versions_and_read(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    spec = {"name": "lookup", "executor": http_tool("https://example.com/lookup")}
    first = await register(client, tenant.headers, **spec)
    assert first["version"] == 1 and first["spec"]["effect"] == "read"
    again = await client.post("/api/v1/tools", json={"description": "a test tool", "input_schema": {"type": "object"},
                                                     "effect": "read", **spec}, headers=tenant.headers)
    assert again.status_code == 200 and again.json()["version"] == 1
    second = await register(client, tenant.headers, **spec, timeout_s=5)
    assert second["version"] == 2
    latest = (await client.get("/api/v1/tools/lookup", headers=tenant.headers)).json()
    assert latest["version"] == 2 and latest["spec"]["timeout_s"] == 5
    v1 = (await client.get("/api/v1/tools/lookup", params={"version": 1}, headers=tenant.headers)).json()
    assert v1["spec"]["timeout_s"] == 30
    versions = (await client.get("/api/v1/tools/lookup/versions", params={"limit": 1}, headers=tenant.headers)).json()
    assert [v["version"] for v in versions["items"]] == [2] and versions["next_cursor"]
    page2 = await client.get("/api/v1/tools/lookup/versions", params={"cursor": versions["next_cursor"]},
                             headers=tenant.headers)
    assert [v["version"] for v in page2.json()["items"]] == [1]
    builtin = (await client.get("/api/v1/tools/echo", headers=tenant.headers)).json()
    assert builtin["version"] == 0
    listed = (await client.get("/api/v1/tools", headers=tenant.headers)).json()
    assert [t["name"] for t in listed["items"]] == ["lookup"]


@pytest.mark.parametrize(
    ("change", "pointer", "message"),
    [
        ({"input_schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}, "/body/input_schema",
         "invalid JSON Schema"),
        ({"input_schema": {"type": "string"}}, "/body/input_schema", "must describe an object"),
        ({"effect": "delete"}, "/body/effect", ""),
        ({"autonomy": {"mode": "conditional"}}, "/body/autonomy", "needs a condition"),
        ({"autonomy": {"mode": "conditional", "condition": "args.amount >"}}, "/body/autonomy", ""),
        ({"executor": http_tool("ftp://x")}, "/body/executor/http/url", "absolute http"),
        ({"executor": http_tool("https://x/${{ secrets.k }}")}, "/body/executor/http/url", "only args"),
        ({"response": "body.items"}, "/body/response", "single ${{ }} expression"),
        ({"name": "bad name"}, "/body/name", ""),
        ({"unknown": 1}, "/body/unknown", ""),
        ({"fallback": "nope"}, "/fallback", "no tool named 'nope'"),
        ({"executor": http_tool("https://x", headers={"Authorization": "Bearer ${{ secrets.missing }}"})},
         "/executor/headers", "no secret named 'missing'"),
        ({"name": "echo"}, "/name", "reserved"),
        ({"required_roles": ["wizard"]}, "/body/required_roles/0", ""),
    ],
)
async def test_invalid_tools_are_422_with_pointers(
    client: httpx.AsyncClient, tenant: TenantKey, change: dict[str, object], pointer: str, message: str
) -> None:
    body = {"name": "t1", "description": "d", "input_schema": {"type": "object"}, "effect": "write",
            "executor": http_tool("https://example.com"), **change}
    r = await client.post("/api/v1/tools", json=body, headers=tenant.headers)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    errors = r.json()["errors"]
    assert any(e["pointer"].startswith(pointer) and message in e["message"] for e in errors), errors


async def test_roles(client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    viewer = await make_tenant(roles=("viewer",))
    r = await client.post("/api/v1/tools", json={"name": "x"}, headers=viewer.headers)
    assert r.status_code == 403
    assert (await client.get("/api/v1/tools", headers=viewer.headers)).status_code == 200
    assert (await client.put("/api/v1/secrets/k", json={"value": "v"}, headers=viewer.headers)).status_code == 403
    assert (await client.get("/api/v1/settings", headers=viewer.headers)).status_code == 403


async def test_secrets_are_write_only_and_encrypted(
    client: httpx.AsyncClient, tenant: TenantKey, other_tenant: TenantKey,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    r = await client.put("/api/v1/secrets/api_key", json={"value": SECRET}, headers=tenant.headers)
    assert r.status_code == 204 and r.content == b""
    listed = await client.get("/api/v1/secrets", headers=tenant.headers)
    assert [s["name"] for s in listed.json()["items"]] == ["api_key"]
    assert SECRET not in listed.text
    # Registered tools reference it by name; the value never appears in the tool either.
    tool = await register(client, tenant.headers, name="paid", executor=http_tool(
        "https://example.com", headers={"Authorization": "Bearer ${{ secrets.api_key }}"}))
    assert SECRET not in str(tool)
    async with sessionmaker() as session:
        stored = (await session.execute(text("SELECT ciphertext FROM secret WHERE name = 'api_key'"))).scalars().all()
        audit = (await session.execute(text("SELECT data::text FROM audit_event"))).scalars().all()
    assert len(stored) == 1 and SECRET.encode() not in stored[0]
    assert all(SECRET not in row for row in audit)
    # Another tenant sees nothing of it, and cannot delete it.
    assert (await client.get("/api/v1/secrets", headers=other_tenant.headers)).json()["items"] == []
    assert (await client.delete("/api/v1/secrets/api_key", headers=other_tenant.headers)).status_code == 404
    # The tool still uses it: only a forced delete goes through (tests/providers/test_secret_users.py).
    assert (await client.delete("/api/v1/secrets/api_key", params={"force": "true"},
                                headers=tenant.headers)).status_code == 204
    assert (await client.delete("/api/v1/secrets/api_key", headers=tenant.headers)).status_code == 404
    # Names are checked whole, not just for a valid part.
    bad = await client.put("/api/v1/secrets/api_key!", json={"value": SECRET}, headers=tenant.headers)
    assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"


async def test_secret_ciphertext_is_bound_to_tenant_and_name() -> None:
    import uuid

    from app.vault.crypto import Vault, VaultError, new_key

    old, new = new_key(), new_key()
    tenant_a, tenant_b = uuid.uuid4(), uuid.uuid4()
    sealed = Vault([old]).seal(tenant_a, "k", "value")
    rotated = Vault([new, old])
    assert rotated.open(tenant_a, "k", sealed) == "value"
    with pytest.raises(VaultError):
        rotated.open(tenant_b, "k", sealed)
    with pytest.raises(VaultError):
        rotated.open(tenant_a, "other", sealed)
    with pytest.raises(VaultError):
        Vault([new]).open(tenant_a, "k", sealed)
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(VaultError):
        rotated.open(tenant_a, "k", tampered)


async def test_workflow_may_name_registered_tools_only(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    bad = await client.post("/api/v1/workflows", json={"name": "w", "definition": {
        "steps": [{"id": "a", "tool": "lookup2"}]}}, headers=tenant.headers)
    assert bad.status_code == 422
    assert "available tools: echo, fail, http, sleep" in bad.text
    await register(client, tenant.headers, name="lookup2", executor=http_tool("https://example.com"))
    ok = await client.post("/api/v1/workflows", json={"name": "w", "definition": {
        "steps": [{"id": "a", "tool": "lookup2"}], "permissions": {"tools": ["lookup2"], "read_only": True}}},
        headers=tenant.headers)
    assert ok.status_code == 201, ok.text


async def test_settings_round_trip(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    assert (await client.get("/api/v1/settings", headers=tenant.headers)).json()["four_eyes"] is True
    r = await client.put("/api/v1/settings", json={"shadow": True, "http_allowlist": ["127.0.0.1", "*.corp"]},
                         headers=tenant.headers)
    assert r.status_code == 200 and r.json()["shadow"] is True
    bad = await client.put("/api/v1/settings", json={"http_allowlist": ["not a host!"]}, headers=tenant.headers)
    assert bad.status_code == 422
