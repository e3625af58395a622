"""Tenant settings: what is stored validates when read back, and a stored value that does not never takes
the tenant's runs down."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from app.tenants.policy import MAX_URL_LENGTH, TenantPolicy
from tests.fakes.tool_server import ToolServer
from tests.support.runs import create_workflow, name, start_run, step, wait_run
from tests.support.tenants import TenantKey
from tests.support.tools import http_tool, register

pytestmark = pytest.mark.xdist_group("engine")


def url_of_length(length: int) -> str:
    """An https URL with an empty path, so normalising it adds a trailing "/"."""
    labels = ".".join(["a" * 60] * 40)
    url = ("https://" + labels)[:length].rstrip(".")
    return url + "b" * (length - len(url))


async def store_policy(
    sessionmaker: async_sessionmaker[AsyncSession], tenant_id: uuid.UUID, policy: object
) -> None:
    """Write the policy column as an older release (or a hand-made fix) might have left it."""
    async with sessionmaker() as db, db.begin():
        await db.execute(
            text("UPDATE tenant SET policy = CAST(:policy AS jsonb) WHERE id = :id"),
            {"policy": json.dumps(policy), "id": tenant_id},
        )


async def test_a_url_that_normalises_past_the_limit_is_refused(
    client: httpx.AsyncClient, tenant: TenantKey
) -> None:
    too_long = url_of_length(MAX_URL_LENGTH)  # 2,083 characters; 2,084 once normalised
    r = await client.put("/api/v1/settings", json={"alert_webhook": too_long}, headers=tenant.headers)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert [e["pointer"] for e in r.json()["errors"]] == ["/body/alert_webhook"]
    assert "2084" in r.json()["errors"][0]["message"]
    # Nothing was stored: the settings still read back.
    r = await client.get("/api/v1/settings", headers=tenant.headers)
    assert r.status_code == 200 and r.json()["alert_webhook"] is None


async def test_what_is_accepted_reads_back_the_same(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    longest = url_of_length(MAX_URL_LENGTH - 1)  # one "/" short of the limit
    body = {
        "alert_webhook": longest,
        "http_allowlist": ["Tools.Example.COM:8443", "*.Internal"],
        "role_mapping": {"ops": ["operator", "approver", "operator"]},
    }
    put = await client.put("/api/v1/settings", json=body, headers=tenant.headers)
    assert put.status_code == 200, put.text
    assert put.json()["alert_webhook"] == longest + "/"
    got = await client.get("/api/v1/settings", headers=tenant.headers)
    assert got.status_code == 200
    assert got.json() == put.json()
    # And the stored form, sent back as it is, is accepted unchanged.
    again = await client.put("/api/v1/settings", json=got.json(), headers=tenant.headers)
    assert again.status_code == 200 and again.json() == got.json()


async def test_a_stored_value_that_no_longer_validates_is_read_safely(
    client: httpx.AsyncClient, tenant: TenantKey, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    await store_policy(sessionmaker, tenant.tenant_id, {
        "alert_webhook": url_of_length(MAX_URL_LENGTH) + "/",
        "shadow": "sometimes",
        "four_eyes": False,
        "http_allowlist": ["tools.example.com"],
        "role_mapping": {"ops": ["operator", "wizard"], "": ["admin"]},
        "retired_setting": 1,
    })
    r = await client.get("/api/v1/settings", headers=tenant.headers)
    assert r.status_code == 200, r.text
    policy = TenantPolicy.model_validate(r.json())
    # The unreadable fields fall back (shadow to the stricter setting); the readable ones are kept.
    assert policy.alert_webhook is None
    assert policy.shadow is True
    assert policy.four_eyes is False
    assert policy.http_allowlist == ["tools.example.com"]
    assert policy.role_mapping == {"ops": ["operator"]}


async def test_runs_go_on_while_a_stored_setting_does_not_validate(
    client: httpx.AsyncClient,
    tenant: TenantKey,
    worker: Settings,
    tool_server: ToolServer,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    await register(client, tenant.headers, name="reader", executor=http_tool(tool_server.url + "/echo"))
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [{"id": "call", "tool": "reader", "args": {"q": 1}}])
    await store_policy(sessionmaker, tenant.tenant_id, {"alert_webhook": url_of_length(MAX_URL_LENGTH) + "/"})
    run = await wait_run(client, tenant.headers, (await start_run(client, tenant.headers, workflow))["id"])
    assert run["status"] == "succeeded", run["steps"]
    assert step(run, "call")["output"]["body"]["received"] == {"q": 1}


async def test_a_policy_that_is_not_an_object_reads_as_the_strict_defaults(
    client: httpx.AsyncClient, tenant: TenantKey, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    await store_policy(sessionmaker, tenant.tenant_id, ["not", "an", "object"])
    r = await client.get("/api/v1/settings", headers=tenant.headers)
    assert r.status_code == 200, r.text
    assert r.json()["shadow"] is True and r.json()["four_eyes"] is True
