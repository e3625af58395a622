"""Every dashboard route, with every role, answers as the permission table says (the API's walk, for pages)."""

from __future__ import annotations

import re
import secrets

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts

from app.auth.permissions import PERMISSIONS, allowed
from app.tenants.policy import ROLES
from tests.support.permissions import route_permission
from tests.support.runs import create_workflow, name, start_run
from tests.support.signin import SignIn
from tests.support.tenants import TenantKey


def page_routes(app: FastAPI) -> list[tuple[str, str, APIRoute]]:
    found = [(method, context.path, route) for context in iter_route_contexts(app.routes)
             if isinstance(route := context.original_route, APIRoute)
             and route.endpoint.__module__.startswith("app.dashboard.")
             for method in sorted(route.methods)]
    assert len(found) >= 9, found  # /, runs, run, its actions and conversation, approvals, workflows
    return found


def test_every_page_but_the_root_checks_a_permission(app: FastAPI) -> None:
    unchecked = [(m, p) for m, p, route in page_routes(app) if route_permission(route) is None]
    assert unchecked == [("GET", "/")]  # it only sends people on to /runs
    for _, _, route in page_routes(app):
        permission = route_permission(route)
        assert permission is None or permission in PERMISSIONS


@pytest.mark.parametrize("role", ROLES)
async def test_each_role_gets_what_the_table_allows(
    app: FastAPI, client: httpx.AsyncClient, tenant: TenantKey, sign_in: SignIn, role: str
) -> None:
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [{"id": "ok", "approval": {"reason": "r"}}])
    run = await start_run(client, tenant.headers, workflow)
    approvals = (await client.get("/api/v1/approvals", params={"run": run["id"]}, headers=tenant.headers)).json()
    admin_values = await _admin_values(client, tenant)
    values = {"run_id": run["id"], "step_id": "ok", "action": "pause", "approval_id": approvals["items"][0]["id"],
              "name": workflow, "tool": "echo", **admin_values}
    browser = await sign_in(tenant, (role,))
    token = re.search(r'name="csrf_token" value="([^"]+)"', (await browser.get("/runs")).text)
    assert token
    for method, path, route in page_routes(app):
        permission = route_permission(route)
        if permission is None or path.endswith("/stream"):
            continue  # the event stream never ends: tests/dashboard/test_stream.py checks it on a real server
        url = re.sub(r"\{(\w+)\}", lambda m: str(values[m.group(1)]), path)
        data = {"csrf_token": token.group(1), "decision": "reject", "comment": "no"}
        answer = await (browser.get(url) if method == "GET" else browser.post(url, data=data))
        if allowed(frozenset({role}), permission):
            assert answer.status_code not in (401, 403, 404, 500), (role, method, url, answer.text[:300])
        else:
            assert answer.status_code == 403 and permission in answer.text, (role, method, url, answer.status_code)


async def _admin_values(client: httpx.AsyncClient, tenant: TenantKey) -> dict[str, str]:
    """A member, a (viewer) key, a secret and a provider using it: what the admin pages' paths name.

    Posting the walk's form to them as an admin may remove the member, revoke the key and delete the
    provider and the secret: routes come in the order the admin modules declare them, reads first.
    """
    member = await client.post("/api/v1/members", json={"subject": f"walk-{secrets.token_hex(4)}",
                                                         "roles": ["viewer"]}, headers=tenant.headers)
    key = await client.post("/api/v1/api-keys", json={"name": "walk", "roles": ["viewer"]}, headers=tenant.headers)
    secret, provider = f"walk_{secrets.token_hex(3)}", f"walk{secrets.token_hex(3)}"
    put_secret = await client.put(f"/api/v1/secrets/{secret}", json={"value": "v"}, headers=tenant.headers)
    put_provider = await client.put(f"/api/v1/providers/{provider}", headers=tenant.headers, json={
        "base_url": "http://127.0.0.1:9/v1", "api_key_secret": secret,
        "models": {"m": {"input_per_mtok": "1", "output_per_mtok": "2"}}})
    assert (member.status_code, key.status_code, put_secret.status_code, put_provider.status_code) == (
        201, 201, 204, 201)
    return {"user_id": member.json()["user_id"], "key_id": key.json()["id"], "secret": secret, "provider": provider}
