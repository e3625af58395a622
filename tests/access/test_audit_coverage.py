"""Every mutation through the API leaves an audit event naming who did it, from where."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from tests.support.runs import create_workflow, name, start_run, wait_for, wait_run
from tests.support.tenants import TenantKey

pytestmark = pytest.mark.xdist_group("engine")


class Recorder:
    """Makes API calls and collects, per mutating route, the audit events each one wrote."""

    def __init__(self, client: httpx.AsyncClient, tenant: TenantKey,
                 sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self.client, self.tenant, self.sessionmaker = client, tenant, sessionmaker
        self.seen: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.last_id = 0

    async def call(self, method: str, template: str, body: Any = None, **params: str) -> Any:
        url = re.sub(r"\{(\w+)\}", lambda m: params[m.group(1)], template)
        response = await self.client.request(method, url, json=body,
                                             headers={**self.tenant.headers, "User-Agent": "audit-test"})
        assert response.status_code < 300, f"{method} {url}: {response.text}"
        self.seen[(method, template)] = await self._new_events()
        return response.json() if response.content else None

    async def _new_events(self) -> list[dict[str, Any]]:
        async with self.sessionmaker() as db:
            conn: Any = await db.connection()
            rows = (await conn.exec_driver_sql(
                "SELECT id, actor, action, target, ip, user_agent FROM audit_event "
                "WHERE tenant_id = $1 AND id > $2 ORDER BY id", (self.tenant.tenant_id, self.last_id))).mappings().all()
        if rows:
            self.last_id = rows[-1]["id"]
        return [dict(r) for r in rows]


async def test_every_mutating_route_is_audited(
    app: FastAPI, client: httpx.AsyncClient, tenant: TenantKey, sessionmaker: async_sessionmaker[AsyncSession],
    worker: Settings,
) -> None:
    api = Recorder(client, tenant, sessionmaker)
    h = tenant.headers
    await api.call("PUT", "/api/v1/settings", {"four_eyes": False})
    await api.call("PUT", "/api/v1/budgets", {"daily_usd": 100})
    await api.call("PUT", "/api/v1/secrets/{name}", {"value": "s3cr3t-value"}, name="llm")
    await api.call("PUT", "/api/v1/providers/{name}", {"base_url": "https://llm.example/v1", "api_key_secret": "llm",
                                                       "models": {"m": {"input_per_mtok": 1, "output_per_mtok": 2}}},
                   name="llm")
    await api.call("DELETE", "/api/v1/providers/{name}", name="llm")
    await api.call("DELETE", "/api/v1/secrets/{name}", name="llm")
    await api.call("POST", "/api/v1/tools", {"name": "echo2", "description": "d", "input_schema": {"type": "object"},
                                             "effect": "read", "executor": {"kind": "builtin", "name": "echo"}})
    waiting, gated, failing = name(), name(), name()
    await api.call("POST", "/api/v1/workflows", {"name": waiting, "definition": {"steps": [
        {"id": "w", "wait": {"signal": "go"}}]}})
    await create_workflow(client, h, gated, [{"id": "gate", "approval": {"reason": "?"}}])
    await create_workflow(client, h, failing, [{"id": "f", "tool": "fail", "retry": {"max_attempts": 1}}])

    run = await api.call("POST", "/api/v1/runs", {"workflow": waiting})
    await wait_for(client, h, run["id"], lambda r: r["status"] == "waiting")
    await api.call("PUT", "/api/v1/runs/{run_id}/limits", {"max_steps": 50}, run_id=run["id"])
    await api.call("POST", "/api/v1/runs/{run_id}/pause", run_id=run["id"])
    await api.call("POST", "/api/v1/runs/{run_id}/resume", run_id=run["id"])
    await api.call("POST", "/api/v1/runs/{run_id}/signals/{name}", {"payload": 1}, run_id=run["id"], name="go")
    cancelled = await start_run(client, h, waiting)
    await api.call("POST", "/api/v1/runs/{run_id}/cancel", run_id=cancelled["id"])
    failed = await start_run(client, h, failing)
    assert (await wait_run(client, h, failed["id"]))["status"] == "failed"
    await api.call("POST", "/api/v1/runs/{run_id}/retry", run_id=failed["id"])
    gated_run = await start_run(client, h, gated)
    await wait_for(client, h, gated_run["id"], lambda r: r["steps"][0]["status"] == "waiting")
    pending = (await client.get("/api/v1/approvals", params={"status": "pending"}, headers=h)).json()["items"]
    approval = next(a for a in pending if a["run_id"] == gated_run["id"])
    await api.call("POST", "/api/v1/approvals/{approval_id}/decision", {"decision": "approve"},
                   approval_id=approval["id"])
    member = await api.call("POST", "/api/v1/members", {"subject": "carol", "roles": ["viewer"]})
    await api.call("PUT", "/api/v1/members/{user_id}", {"roles": ["auditor"]}, user_id=member["user_id"])
    await api.call("DELETE", "/api/v1/members/{user_id}", user_id=member["user_id"])
    key = await api.call("POST", "/api/v1/api-keys", {"name": "k", "roles": ["viewer"]})
    await api.call("DELETE", "/api/v1/api-keys/{key_id}", key_id=key["id"])

    mutating = {(m.upper(), p) for p, item in app.openapi()["paths"].items() for m in item if m != "get"}
    assert set(api.seen) == mutating, f"not exercised here: {mutating - set(api.seen)}"
    actors = set()
    for route, events in api.seen.items():
        # Workers write events of their own meanwhile (tool calls of runs started earlier): no user agent.
        mine = [e for e in events if e["user_agent"] == "audit-test"]
        assert mine, f"{route} wrote no audit event of the caller: {events}"
        assert all(e["ip"] and e["actor"].startswith("key:") for e in mine), route
        actors |= {e["actor"] for e in mine}
    assert len(actors) == 1
    assert not any("s3cr3t" in str(e) for events in api.seen.values() for e in events)
