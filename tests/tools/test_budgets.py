"""Run limits and tenant cost caps: reserve before a call, settle after, pause (or fail) when exhausted."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest

from app.config import Settings
from tests.support.clock import clear_of_the_hour_boundary
from tests.support.runs import create_workflow, name, start_run, step, wait_for, wait_run
from tests.support.tenants import TenantKey
from tests.support.tools import register

pytestmark = pytest.mark.xdist_group("engine")

THREE_STEPS = [
    {"id": "a", "tool": "echo", "args": {"n": 1}},
    {"id": "b", "needs": ["a"], "tool": "echo", "args": {"n": 2}},
    {"id": "c", "needs": ["b"], "tool": "echo", "args": {"n": 3}},
]


async def run_events(client: httpx.AsyncClient, headers: dict[str, str], run_id: str) -> list[dict[str, Any]]:
    return list((await client.get(f"/api/v1/runs/{run_id}/events", headers=headers)).json()["items"])


PAID_STEPS = [
    {"id": "a", "tool": "paid", "args": {"n": 1}},
    {"id": "b", "needs": ["a"], "tool": "paid", "args": {"n": 2}},
    {"id": "c", "needs": ["b"], "tool": "paid", "args": {"n": 3}},
]


async def register_paid(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    await register(client, headers, name="paid", cost_usd="1.00", executor={"kind": "builtin", "name": "echo"})


async def test_cost_limit_pauses_then_resumes_after_raising_it(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings
) -> None:
    await register_paid(client, tenant.headers)
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, PAID_STEPS, limits={"max_cost_usd": 2})
    run = await start_run(client, tenant.headers, workflow)
    paused = await wait_for(client, tenant.headers, run["id"], lambda r: r["status"] == "paused")
    assert step(paused, "c")["status"] == "queued" and step(paused, "b")["status"] == "succeeded"
    trace = await run_events(client, tenant.headers, run["id"])
    assert any(e["type"] == "budget_exhausted" and e["data"]["limit"] == "max_cost_usd" for e in trace)
    assert any(e["type"] == "run_paused" and e["data"].get("status_reason") == "budget_exhausted" for e in trace)
    # Resuming without more room pauses again; raising the limit first lets it finish.
    r = await client.put(f"/api/v1/runs/{run['id']}/limits", json={"max_cost_usd": 5}, headers=tenant.headers)
    assert r.status_code == 200 and r.json()["limits"]["max_cost_usd"] == 5
    assert (await client.post(f"/api/v1/runs/{run['id']}/resume", headers=tenant.headers)).status_code == 200
    done = await wait_run(client, tenant.headers, run["id"])
    assert done["status"] == "succeeded", done["steps"]
    usage = (await client.get("/api/v1/budgets/usage", params={"run": run["id"]}, headers=tenant.headers)).json()
    assert usage["run"]["cost_usd"] == "3" and usage["run"]["tool_calls"] == 0


async def test_a_workflows_own_tool_steps_do_not_count_against_max_steps(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings
) -> None:
    """max_steps stops agents that loop; the steps an author wrote are bounded by the definition."""
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, THREE_STEPS, limits={"max_steps": 1})
    done = await wait_run(client, tenant.headers, (await start_run(client, tenant.headers, workflow))["id"])
    assert done["status"] == "succeeded", done["steps"]
    usage = (await client.get("/api/v1/budgets/usage", params={"run": done["id"]}, headers=tenant.headers)).json()
    assert usage["run"]["limits"]["max_steps"] == 1 and usage["run"]["tool_calls"] == 0


async def test_a_map_of_100_items_completes_under_the_default_limits(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings
) -> None:
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [
        {"id": "each", "map": {"items": "${{ input.items }}", "tool": "echo", "args": {"i": "${{ item }}"},
                               "concurrency": 10}},
        {"id": "after", "needs": ["each"], "tool": "echo", "args": {"n": "${{ size(steps.each.output) }}"}},
    ])
    run = await start_run(client, tenant.headers, workflow, {"items": list(range(100))})
    done = await wait_run(client, tenant.headers, run["id"], 60)
    assert done["status"] == "succeeded", (done["status_reason"], done["error"])
    assert step(done, "each")["output"] == [{"i": i} for i in range(100)]
    assert step(done, "after")["output"] == {"n": 100}
    usage = (await client.get("/api/v1/budgets/usage", params={"run": run["id"]}, headers=tenant.headers)).json()
    assert usage["run"]["limits"]["max_steps"] == 25 and usage["run"]["tool_calls"] == 0


async def test_fail_policy_and_tenant_maximums(client: httpx.AsyncClient, tenant: TenantKey, worker: Settings) -> None:
    r = await client.put("/api/v1/budgets", json={"on_exhausted": "fail", "run_maximums": {"max_steps": 10}},
                         headers=tenant.headers)
    assert r.status_code == 200, r.text
    await register_paid(client, tenant.headers)
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, PAID_STEPS, limits={"max_cost_usd": 1, "max_steps": 5})
    done = await wait_run(client, tenant.headers, (await start_run(client, tenant.headers, workflow))["id"])
    assert done["status"] == "failed" and step(done, "b")["error"]["class"] == "budget_exhausted"
    too_much = await client.post("/api/v1/runs", json={"workflow": workflow, "limits": {"max_steps": 11}},
                                 headers=tenant.headers)
    assert too_much.status_code == 422 and too_much.json()["errors"][0]["pointer"] == "/limits/max_steps"


async def test_concurrent_runs_never_overspend_the_hourly_cap(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings
) -> None:
    # The cap is per clock hour: a test straddling the top of the hour would see two windows of $7.
    await clear_of_the_hour_boundary(margin_s=90)
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    await client.put("/api/v1/budgets", json={"hourly_usd": "7"}, headers=tenant.headers)
    await register(client, tenant.headers, name="paid", cost_usd="1.00",
                   executor={"kind": "builtin", "name": "sleep"})
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [{"id": "call", "tool": "paid", "args": {"seconds": 0.2}}])
    runs = await asyncio.gather(*(start_run(client, tenant.headers, workflow) for _ in range(20)))

    def settled(r: dict[str, Any]) -> bool:
        return r["status"] in ("succeeded", "paused")

    finished = await asyncio.gather(*(wait_for(client, tenant.headers, r["id"], settled, 30) for r in runs))
    statuses = sorted(r["status"] for r in finished)
    assert datetime.now(UTC).replace(minute=0, second=0, microsecond=0) == hour, "ran past the hour's margin"
    assert statuses.count("succeeded") == 7 and statuses.count("paused") == 13, statuses
    usage = (await client.get("/api/v1/budgets/usage", headers=tenant.headers)).json()
    assert Decimal(usage["hour"]["spent_usd"]) == 7 and Decimal(usage["hour"]["reserved_usd"]) == 0
    by_workflow = (await client.get("/api/v1/budgets/usage", params={"workflow": workflow},
                                    headers=tenant.headers)).json()
    assert Decimal(by_workflow["day"]["spent_usd"]) == 7
