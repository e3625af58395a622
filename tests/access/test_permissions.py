"""Every route of the OpenAPI document, called with every role, answers as the permission table says."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.auth.permissions import PERMISSIONS, allowed
from app.tenants.policy import ROLES
from tests.support.permissions import route_permission
from tests.support.tenants import MakeApiKey, TenantKey

ROOT = Path(__file__).resolve().parents[2]
# Routes anyone may call, and routes any signed-in principal may call (no permission beyond that).
PUBLIC = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")}
SIGNED_IN = {("GET", "/auth/me")}


def operations(app: FastAPI) -> list[tuple[str, str, APIRoute]]:
    documented = app.openapi()["paths"]
    ops = []
    for context in iter_route_contexts(app.routes):
        route, path = context.original_route, context.path
        if isinstance(route, APIRoute) and path in documented:
            ops += [(method, path, route) for method in sorted(route.methods) if method.lower() in documented[path]]
    assert {(m, p) for m, p, _ in ops} == {(m.upper(), p) for p, item in documented.items() for m in item}
    return ops


def fill(path: str) -> str:
    """Path parameters filled with values that name nothing (the check must come before any lookup)."""
    return re.sub(r"\{(\w+)\}", lambda m: "1" if m.group(1) == "version" else
                  str(uuid.uuid4()) if m.group(1).endswith("_id") else "nothing_here", path)


async def test_every_api_route_requires_one_permission_from_the_table(app: FastAPI) -> None:
    for method, path, route in operations(app):
        if (method, path) in PUBLIC | SIGNED_IN:
            continue
        permission = route_permission(route)
        assert permission in PERMISSIONS, f"{method} {path} has no permission check"


@pytest.mark.parametrize("role", ROLES)
async def test_every_route_allows_or_denies_each_role_as_the_table_says(
    app: FastAPI, client: httpx.AsyncClient, tenant: TenantKey, make_api_key: MakeApiKey, role: str,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    headers = {"Authorization": f"Bearer {await make_api_key(tenant.tenant_id, roles=(role,))}"}
    checked = 0
    denied: list[str] = []
    for method, path, route in operations(app):
        permission = route_permission(route)
        if permission is None:
            continue
        # An empty JSON body: allowed calls fail later (404, 422...) or succeed, never with 403.
        response = await client.request(method, fill(path), headers=headers,
                                        json={} if method in ("POST", "PUT", "PATCH") else None)
        if allowed(frozenset({role}), permission):
            assert response.status_code != 403, f"{role} denied {method} {path}: {response.text}"
        else:
            assert response.status_code == 403, f"{role} allowed {method} {path}: {response.status_code}"
            assert response.headers["content-type"] == "application/problem+json"
            body: dict[str, Any] = response.json()
            assert body["type"].endswith("/forbidden") and body["permission"] == permission
            denied.append(f"{method} {path}")
        checked += 1
    assert checked >= 40
    # Every refusal is on the tenant's audit record, by that key.
    async with sessionmaker() as db:
        rows = (await db.execute(text(
            "SELECT actor, target, outcome, data->>'permission' FROM audit_event "
            "WHERE tenant_id = :t AND action = 'access.denied' ORDER BY id"), {"t": tenant.tenant_id})).all()
    assert [r[1] for r in rows] == denied
    assert {(r[0].startswith("key:"), r[2]) for r in rows} <= {(True, "denied")}


async def test_the_documented_table_is_the_table_in_code() -> None:
    text = (ROOT / "docs" / "security.md").read_text()
    documented: dict[str, set[str]] = {}
    for match in re.finditer(r"^\| `([a-z]+:[a-z]+)` \|[^|]*\|([^|]*)\|$", text, re.MULTILINE):
        documented[match.group(1)] = {r.strip(" `") for r in match.group(2).split(",")}
    in_code = {name: set(roles) | {"admin"} for name, (_, roles) in PERMISSIONS.items()}
    assert documented == in_code
