"""The model providers API and the workers' model lookup: validation, roles, tenancy, audit, keys never shown."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.llm.client import Price
from app.providers.service import ModelRef, model_names, resolve_model
from app.runtime import Runtime
from tests.support.tenants import MakeApiKey, TenantKey

KEY = "sk-prov-9c1e77d2b4a0"
URL = "/api/v1/providers"


def provider(**change: Any) -> dict[str, Any]:
    return {"base_url": "https://llm.example.com/v1", "api_key_secret": "llm_key",
            "models": {"gpt-4o": {"input_per_mtok": "2.50", "output_per_mtok": 10}}, **change}


async def put_secret(client: httpx.AsyncClient, tenant: TenantKey, name: str = "llm_key") -> None:
    r = await client.put(f"/api/v1/secrets/{name}", json={"value": KEY}, headers=tenant.headers)
    assert r.status_code == 204, r.text


async def test_create_replace_read_delete(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    await put_secret(client, tenant)
    created = await client.put(f"{URL}/openai", json=provider(), headers=tenant.headers)
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["name"] == "openai" and body["api_key_secret"] == "llm_key"
    assert body["models"] == {"gpt-4o": {"input_per_mtok": "2.50", "output_per_mtok": "10"}}
    replaced = await client.put(f"{URL}/openai", json=provider(
        api_key_secret=None, models={"meta-llama/Llama-3-70b": {"input_per_mtok": 0.9, "output_per_mtok": "1e-1"}}),
        headers=tenant.headers)
    assert replaced.status_code == 200, replaced.text
    got = (await client.get(f"{URL}/openai", headers=tenant.headers)).json()
    assert got["api_key_secret"] is None and got["created_at"] == body["created_at"]
    assert got["models"] == {"meta-llama/Llama-3-70b": {"input_per_mtok": "0.9", "output_per_mtok": "0.1"}}
    assert (await client.delete(f"{URL}/openai", headers=tenant.headers)).status_code == 204
    gone = await client.get(f"{URL}/openai", headers=tenant.headers)
    assert gone.status_code == 404 and gone.headers["content-type"] == "application/problem+json"
    again = await client.delete(f"{URL}/openai", headers=tenant.headers)
    assert again.status_code == 404 and "no provider named 'openai'" in again.json()["detail"]


async def test_list_pages_by_name(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    for name in ("b-prov", "a_prov", "c"):
        r = await client.put(f"{URL}/{name}", json=provider(api_key_secret=None), headers=tenant.headers)
        assert r.status_code == 201, r.text
    first = (await client.get(URL, params={"limit": 1}, headers=tenant.headers)).json()
    assert [p["name"] for p in first["items"]] == ["a_prov"] and first["next_cursor"]
    rest = (await client.get(URL, params={"limit": 2, "cursor": first["next_cursor"]},
                             headers=tenant.headers)).json()
    assert [p["name"] for p in rest["items"]] == ["b-prov", "c"] and rest["next_cursor"] is None


@pytest.mark.parametrize(
    ("change", "pointer", "message"),
    [
        ({"api_key_secret": "missing"}, "/api_key_secret", "no secret named 'missing'"),
        ({"api_key_secret": "not a name"}, "/body/api_key_secret", ""),
        ({"base_url": "ftp://llm.example.com"}, "/body/base_url", "http"),
        ({"base_url": "https://"}, "/body/base_url", "with a host"),
        ({"base_url": "https://user:pw@llm.example.com/v1"}, "/body/base_url", "credentials"),
        ({"base_url": "https://llm.example.com/v1?key=x"}, "/body/base_url", "query"),
        ({"base_url": "https://llm.example.com/v1#x"}, "/body/base_url", "fragment"),
        ({"models": {"m": {"input_per_mtok": "-1", "output_per_mtok": "1"}}}, "/body/models/m", "not a price"),
        ({"models": {"m": {"input_per_mtok": "abc", "output_per_mtok": "1"}}}, "/body/models/m", "not a price"),
        ({"models": {"m": {"input_per_mtok": "1", "output_per_mtok": -0.5}}}, "/body/models/m", "not a price"),
        ({"models": {"m": {"input_per_mtok": True, "output_per_mtok": 1}}}, "/body/models/m", "not a price"),
        ({"models": {"m": {"input_per_mtok": "1e-20", "output_per_mtok": 1}}}, "/body/models/m", "decimal places"),
        ({"models": {"m": {"input_per_mtok": "1"}}}, "/body/models/m/output_per_mtok", ""),
        ({"models": {"bad name": {"input_per_mtok": 1, "output_per_mtok": 1}}}, "/body/models/bad name", ""),
        ({"models": {f"m{i}": {"input_per_mtok": 1, "output_per_mtok": 1} for i in range(101)}}, "/body/models",
         "at most 100"),
        ({"models": {}}, "/body/models", ""),
        ({"unknown": 1}, "/body/unknown", ""),
        ({"max_tokens_param": "max_output_tokens"}, "/body/max_tokens_param", "max_completion_tokens"),
        ({"max_tokens_param": None}, "/body/max_tokens_param", ""),
    ],
)
async def test_invalid_providers_are_422_with_pointers(
    client: httpx.AsyncClient, tenant: TenantKey, change: dict[str, Any], pointer: str, message: str
) -> None:
    await put_secret(client, tenant)
    r = await client.put(f"{URL}/p", json=provider(**change), headers=tenant.headers)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    errors = r.json()["errors"]
    assert any(e["pointer"].startswith(pointer) and message in e["message"] for e in errors), errors
    assert (await client.get(f"{URL}/p", headers=tenant.headers)).status_code == 404


async def test_max_tokens_param_is_stored_and_resolved(
    client: httpx.AsyncClient, tenant: TenantKey, app: FastAPI
) -> None:
    plain = await client.put(f"{URL}/plain", json=provider(api_key_secret=None), headers=tenant.headers)
    assert plain.status_code == 201 and plain.json()["max_tokens_param"] == "max_tokens"
    body = provider(api_key_secret=None, max_tokens_param="max_completion_tokens")
    reasoning = await client.put(f"{URL}/openai", json=body, headers=tenant.headers)
    assert reasoning.status_code == 201 and reasoning.json()["max_tokens_param"] == "max_completion_tokens"
    assert (await client.get(f"{URL}/openai", headers=tenant.headers)).json()["max_tokens_param"] == (
        "max_completion_tokens")
    runtime: Runtime = app.state.runtime
    async with runtime.pg.acquire() as conn:
        ref = await resolve_model(conn, runtime.vault, tenant.tenant_id, "openai/gpt-4o")
        assert isinstance(ref, ModelRef) and ref.max_tokens_param == "max_completion_tokens"
        ref = await resolve_model(conn, runtime.vault, tenant.tenant_id, "plain/gpt-4o")
        assert isinstance(ref, ModelRef) and ref.max_tokens_param == "max_tokens"
    # Replacing the definition without it goes back to the default, as every other field does.
    again = await client.put(f"{URL}/openai", json=provider(api_key_secret=None), headers=tenant.headers)
    assert again.status_code == 200 and again.json()["max_tokens_param"] == "max_tokens"


async def test_at_most_100_models_is_fine(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    models = {f"m{i}": {"input_per_mtok": 1, "output_per_mtok": 2} for i in range(100)}
    r = await client.put(f"{URL}/many", json=provider(api_key_secret=None, models=models), headers=tenant.headers)
    assert r.status_code == 201, r.text
    assert len(r.json()["models"]) == 100


@pytest.mark.parametrize("path", ["a/b", "a%2Fb", "-a", "a.b", "x" * 65])
async def test_bad_provider_names(client: httpx.AsyncClient, tenant: TenantKey, path: str) -> None:
    r = await client.put(f"{URL}/{path}", json=provider(api_key_secret=None), headers=tenant.headers)
    assert r.status_code in (404, 422), r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert (await client.get(URL, headers=tenant.headers)).json()["items"] == []


async def test_roles(client: httpx.AsyncClient, tenant: TenantKey, make_api_key: MakeApiKey) -> None:
    r = await client.put(f"{URL}/p", json=provider(api_key_secret=None), headers=tenant.headers)
    assert r.status_code == 201
    for role in ("viewer", "author", "operator"):
        headers = {"Authorization": f"Bearer {await make_api_key(tenant.tenant_id, roles=(role,))}"}
        denied = await client.put(f"{URL}/p", json=provider(api_key_secret=None), headers=headers)
        assert denied.status_code == 403 and denied.headers["content-type"] == "application/problem+json"
        assert (await client.delete(f"{URL}/p", headers=headers)).status_code == 403
    viewer = {"Authorization": f"Bearer {await make_api_key(tenant.tenant_id, roles=('viewer',))}"}
    assert (await client.get(f"{URL}/p", headers=viewer)).status_code == 200
    assert [p["name"] for p in (await client.get(URL, headers=viewer)).json()["items"]] == ["p"]
    assert (await client.get(URL)).status_code == 401


async def test_other_tenants_see_nothing(
    client: httpx.AsyncClient, tenant: TenantKey, other_tenant: TenantKey
) -> None:
    await put_secret(client, tenant)
    assert (await client.put(f"{URL}/p", json=provider(), headers=tenant.headers)).status_code == 201
    assert (await client.get(f"{URL}/p", headers=other_tenant.headers)).status_code == 404
    assert (await client.get(URL, headers=other_tenant.headers)).json()["items"] == []
    assert (await client.delete(f"{URL}/p", headers=other_tenant.headers)).status_code == 404
    # The secret is the tenant's own: another tenant cannot point its provider at it.
    stolen = await client.put(f"{URL}/p", json=provider(), headers=other_tenant.headers)
    assert stolen.status_code == 422 and stolen.json()["errors"][0]["pointer"] == "/api_key_secret"
    assert (await client.get(f"{URL}/p", headers=tenant.headers)).status_code == 200


async def test_changes_are_audited_without_the_key(
    client: httpx.AsyncClient, tenant: TenantKey, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    await put_secret(client, tenant)
    responses = [
        await client.put(f"{URL}/p", json=provider(), headers=tenant.headers),
        await client.put(f"{URL}/p", json=provider(base_url="http://10.0.0.5:8000/v1"), headers=tenant.headers),
        await client.get(f"{URL}/p", headers=tenant.headers),
        await client.get(URL, headers=tenant.headers),
        await client.delete(f"{URL}/p", headers=tenant.headers),
    ]
    assert [r.status_code for r in responses] == [201, 200, 200, 200, 204]
    assert all(KEY not in r.text for r in responses)
    async with sessionmaker() as session:
        rows = (await session.execute(text(
            "SELECT action, target, data, data::text AS raw FROM audit_event WHERE tenant_id = :t "
            "AND action LIKE 'provider.%' ORDER BY id"), {"t": tenant.tenant_id})).all()
    assert [(r.action, r.target) for r in rows] == [
        ("provider.create", "provider:p"), ("provider.update", "provider:p"), ("provider.delete", "provider:p")]
    assert rows[1].data == {"base_url": "http://10.0.0.5:8000/v1", "api_key_secret": "llm_key",
                            "models": {"gpt-4o": {"input_per_mtok": "2.50", "output_per_mtok": "10"}},
                            "max_tokens_param": "max_tokens"}
    assert all(KEY not in r.raw for r in rows)


async def test_resolve_model(client: httpx.AsyncClient, tenant: TenantKey, app: FastAPI) -> None:
    runtime: Runtime = app.state.runtime
    await put_secret(client, tenant)
    await put_secret(client, tenant, "other_key")
    for name, body in [
        ("together", provider(models={"meta-llama/Llama-3-70b": {"input_per_mtok": "0.88", "output_per_mtok": 0.88},
                                      "qwen:7b": {"input_per_mtok": 0, "output_per_mtok": "0"}})),
        ("local", provider(base_url="http://127.0.0.1:11434/v1", api_key_secret=None)),
        ("anthropic", provider(api_key_secret="other_key")),
    ]:
        assert (await client.put(f"{URL}/{name}", json=body, headers=tenant.headers)).status_code == 201
    async with runtime.pg.acquire() as conn:
        ref = await resolve_model(conn, runtime.vault, tenant.tenant_id, "together/meta-llama/Llama-3-70b")
        assert ref == ModelRef("together", "meta-llama/Llama-3-70b", "https://llm.example.com/v1", KEY,
                               Price(Decimal("0.88"), Decimal("0.88")))
        assert isinstance(ref, ModelRef) and KEY not in repr(ref)
        local = await resolve_model(conn, runtime.vault, tenant.tenant_id, "local/gpt-4o")
        assert isinstance(local, ModelRef) and local.api_key is None
        assert local.base_url == "http://127.0.0.1:11434/v1" and local.price == Price(Decimal("2.50"), Decimal(10))
        assert await model_names(conn, tenant.tenant_id) == {
            "anthropic": frozenset({"gpt-4o"}), "local": frozenset({"gpt-4o"}),
            "together": frozenset({"meta-llama/Llama-3-70b", "qwen:7b"})}

        assert await resolve_model(conn, runtime.vault, tenant.tenant_id, "openai/gpt-4o") == (
            "unknown provider 'openai'; available providers: anthropic, local, together")
        assert await resolve_model(conn, runtime.vault, tenant.tenant_id, "together/llama") == (
            "provider 'together' has no model 'llama'; its models: meta-llama/Llama-3-70b, qwen:7b")
        assert await resolve_model(conn, runtime.vault, tenant.tenant_id, "gpt-4o") == (
            "model 'gpt-4o' is not '<provider>/<model>'")
    assert (await client.delete("/api/v1/secrets/other_key", params={"force": "true"},
                                headers=tenant.headers)).status_code == 204
    async with runtime.pg.acquire() as conn:
        assert await resolve_model(conn, runtime.vault, tenant.tenant_id, "anthropic/gpt-4o") == (
            "secret 'other_key' of provider 'anthropic' no longer exists")


async def test_resolve_model_without_providers(tenant: TenantKey, app: FastAPI) -> None:
    runtime: Runtime = app.state.runtime
    async with runtime.pg.acquire() as conn:
        assert await resolve_model(conn, runtime.vault, tenant.tenant_id, "openai/gpt-4o") == (
            "unknown provider 'openai'; available providers: none")
        assert await model_names(conn, tenant.tenant_id) == {}
