"""Admins manage API keys and members through the API; every change is audited."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.support.tenants import MakeTenant, TenantKey

KEYS = "/api/v1/api-keys"
MEMBERS = "/api/v1/members"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def audit_actions(sessionmaker: async_sessionmaker[AsyncSession], tenant: TenantKey) -> list[dict[str, Any]]:
    async with sessionmaker() as db:
        conn: Any = await db.connection()
        rows = (await conn.exec_driver_sql(
            "SELECT actor, action, target, data, ip, user_agent FROM audit_event WHERE tenant_id = $1 ORDER BY id",
            (tenant.tenant_id,))).mappings().all()
    return [dict(r) for r in rows]


async def test_a_key_is_shown_once_works_at_once_and_stops_when_revoked(
    client: httpx.AsyncClient, tenant: TenantKey, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    created = await client.post(KEYS, json={"name": "ci", "roles": ["operator", "viewer", "operator"]},
                                headers={**tenant.headers, "User-Agent": "deploy-bot/1"})
    assert created.status_code == 201, created.text
    body = created.json()
    key = body["key"]
    assert key.startswith("stw_") and len(key) == 44 and body["prefix"] == key[:10]
    assert body["roles"] == ["operator", "viewer"] and body["created_by"].startswith("key:")
    assert (await client.get("/api/v1/runs", headers=bearer(key))).status_code == 200
    # Reading never shows the key again; the use just made is on record.
    listed = (await client.get(KEYS, headers=tenant.headers)).json()["items"]
    mine = next(k for k in listed if k["id"] == body["id"])
    assert "key" not in mine and mine["last_used_at"] is not None
    assert key not in (await client.get(KEYS, headers=tenant.headers)).text

    assert (await client.delete(f"{KEYS}/{body['id']}", headers=tenant.headers)).status_code == 204
    denied = await client.get("/api/v1/runs", headers=bearer(key))
    assert denied.status_code == 401 and "revoked" in denied.json()["detail"]
    assert (await client.delete(f"{KEYS}/{body['id']}", headers=tenant.headers)).status_code == 204

    trail = [(e["action"], e["target"]) for e in await audit_actions(sessionmaker, tenant)]
    assert trail == [("api_key.create", f"key:{body['id']}"), ("api_key.revoke", f"key:{body['id']}")]
    create = (await audit_actions(sessionmaker, tenant))[0]
    assert create["user_agent"] == "deploy-bot/1" and create["ip"] and key not in str(create["data"])


async def test_keys_expire(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    soon = datetime.now(UTC) + timedelta(seconds=1)
    body = (await client.post(KEYS, json={"name": "short", "roles": ["viewer"], "expires_at": soon.isoformat()},
                              headers=tenant.headers)).json()
    assert (await client.get("/api/v1/runs", headers=bearer(body["key"]))).status_code == 200
    await asyncio.sleep(max(0.0, (soon - datetime.now(UTC)).total_seconds()) + 0.05)
    expired = await client.get("/api/v1/runs", headers=bearer(body["key"]))
    assert expired.status_code == 401 and "expired" in expired.json()["detail"]


async def test_bad_key_requests_are_422(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    past = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    for bad in ({"name": "x", "roles": []}, {"name": "x", "roles": ["boss"]}, {"name": "", "roles": ["viewer"]},
                {"name": "x", "roles": ["viewer"], "expires_at": past},
                {"name": "x", "roles": ["viewer"], "expires_at": "2099-01-01T00:00:00"},
                {"name": "x", "roles": ["viewer"], "expires_in_days": 1, "expires_at": "2099-01-01T00:00:00Z"},
                {"name": "x", "roles": ["viewer"], "extra": 1}):
        response = await client.post(KEYS, json=bad, headers=tenant.headers)
        assert response.status_code == 422, (bad, response.text)
        assert response.headers["content-type"] == "application/problem+json"


async def test_members_are_added_changed_and_removed(
    client: httpx.AsyncClient, tenant: TenantKey, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    added = await client.post(MEMBERS, json={"subject": "alice", "issuer": "https://idp.example",
                                             "email": "alice@example.com", "roles": ["approver"]},
                              headers=tenant.headers)
    assert added.status_code == 201, added.text
    member = added.json()
    user = member["user_id"]
    assert member["roles"] == ["approver"] and member["email"] == "alice@example.com"
    again = await client.post(MEMBERS, json={"subject": "alice", "issuer": "https://idp.example",
                                             "roles": ["viewer"]}, headers=tenant.headers)
    assert again.status_code == 409
    changed = await client.put(f"{MEMBERS}/{user}", json={"roles": ["operator", "approver"]}, headers=tenant.headers)
    assert changed.status_code == 200 and changed.json()["roles"] == ["approver", "operator"]
    page = (await client.get(MEMBERS, params={"limit": 1}, headers=tenant.headers)).json()
    assert [m["user_id"] for m in page["items"]] == [user] and page["next_cursor"] is None
    assert (await client.delete(f"{MEMBERS}/{user}", headers=tenant.headers)).status_code == 204
    assert (await client.get(f"{MEMBERS}/{user}", headers=tenant.headers)).status_code == 404
    trail = [(e["action"], e["target"]) for e in await audit_actions(sessionmaker, tenant)]
    assert trail == [("member.add", f"user:{user}"), ("member.update", f"user:{user}"),
                     ("member.remove", f"user:{user}")]


async def test_one_user_may_be_a_member_of_two_tenants(
    client: httpx.AsyncClient, tenant: TenantKey, other_tenant: TenantKey
) -> None:
    ids = []
    for owner, roles in ((tenant, ["viewer"]), (other_tenant, ["admin"])):
        r = await client.post(MEMBERS, json={"subject": "bob", "issuer": "https://idp.example", "roles": roles},
                              headers=owner.headers)
        assert r.status_code == 201, r.text
        ids.append(r.json()["user_id"])
    assert ids[0] == ids[1]
    assert (await client.get(f"{MEMBERS}/{ids[0]}", headers=tenant.headers)).json()["roles"] == ["viewer"]
    assert (await client.get(f"{MEMBERS}/{ids[0]}", headers=other_tenant.headers)).json()["roles"] == ["admin"]


async def test_the_last_admin_stays(client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    lone = await make_tenant()
    keys = (await client.get(KEYS, headers=lone.headers)).json()["items"]
    assert len(keys) == 1
    refused = await client.delete(f"{KEYS}/{keys[0]['id']}", headers=lone.headers)
    assert refused.status_code == 409 and "last admin" in refused.json()["detail"]
    second = (await client.post(KEYS, json={"name": "b", "roles": ["admin"]}, headers=lone.headers)).json()
    assert (await client.delete(f"{KEYS}/{keys[0]['id']}", headers=lone.headers)).status_code == 204
    assert (await client.get(KEYS, headers=bearer(second["key"]))).status_code == 200


async def test_two_admins_revoking_each_other_at_once_leave_one(
    client: httpx.AsyncClient, make_tenant: MakeTenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    async def pair() -> tuple[list[int], int]:
        first = await make_tenant()
        second = (await client.post(KEYS, json={"name": "b", "roles": ["admin"]}, headers=first.headers)).json()
        keys = {k["name"]: k["id"] for k in (await client.get(KEYS, headers=first.headers)).json()["items"]}
        # Each revokes the other: without a turn-taking lock both could see the other as the admin left.
        answers = await asyncio.gather(
            client.delete(f"{KEYS}/{keys['b']}", headers=first.headers),
            client.delete(f"{KEYS}/{keys['test']}", headers=bearer(second["key"])),
        )
        async with sessionmaker() as db:
            live = await db.scalar(text(
                "SELECT count(*) FROM api_key WHERE tenant_id = :t AND revoked_at IS NULL AND 'admin' = ANY(roles)"
            ), {"t": first.tenant_id})
        return sorted(r.status_code for r in answers), int(live or 0)

    # Several tenants at once, so the two revocations of a pair really overlap in the database. One wins;
    # the other is refused as the last admin (409), or, when the first had finished before the second
    # was even authenticated, finds its own key revoked (401). Either way one admin key is left.
    results = await asyncio.gather(*(pair() for _ in range(10)))
    assert all(answers in ([204, 409], [204, 401]) and live == 1 for answers, live in results), results
    assert any(answers == [204, 409] for answers, _ in results), "no pair overlapped: the lock went untested"
