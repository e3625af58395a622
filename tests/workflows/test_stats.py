"""GET /api/v1/workflows/{name}/stats: reliability figures from real runs, and exact figures from a history
laid down with known times."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from tests.fakes.tool_server import ToolServer
from tests.support.runs import create_workflow, name, start_run, wait_run
from tests.support.tenants import MakeTenant, TenantKey
from tests.support.tools import http_tool, register


async def stats(client: httpx.AsyncClient, headers: dict[str, str], workflow: str, **params: str) -> dict[str, Any]:
    answer = await client.get(f"/api/v1/workflows/{workflow}/stats", params=params, headers=headers)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


async def test_figures_of_real_runs_and_the_tools_they_called(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, tool_server: ToolServer
) -> None:
    await register(client, tenant.headers, name="flaky", executor=http_tool(tool_server.url + "/fail-400"))
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [
        {"id": "a", "tool": "echo", "args": {"v": 1}},
        {"id": "b", "tool": "flaky", "needs": ["a"], "when": "input.flaky", "args": {}},
    ])
    for flaky in (False, False, False, True):
        run = await start_run(client, tenant.headers, workflow, {"flaky": flaky})
        await wait_run(client, tenant.headers, run["id"])

    figures = await stats(client, tenant.headers, workflow, window="7d")
    assert figures["runs"] == {"total": 4, "by_status": {"succeeded": 3, "failed": 1}}
    assert (figures["completion_rate"], figures["success_rate"]) == (1.0, 0.75)
    assert figures["duration_s"]["p50"] > 0 and figures["duration_s"]["p99"] >= figures["duration_s"]["p50"]
    assert figures["mtbf_s"] is None  # one failure: no gap between failures yet
    assert figures["agent_success_rate"] is None and figures["objective"] is None
    dependencies = {(d["kind"], d["name"]): d for d in figures["dependencies"]}
    assert dependencies[("tool", "echo")] == {"kind": "tool", "name": "echo", "calls": 4, "success_rate": 1.0}
    assert dependencies[("tool", "flaky")]["success_rate"] == 0.0


async def test_bad_windows_and_other_tenants_workflows(
    client: httpx.AsyncClient, make_tenant: MakeTenant
) -> None:
    tenant, other = await make_tenant(), await make_tenant()
    workflow = name()
    await create_workflow(client, other.headers, workflow, [{"id": "a", "tool": "echo"}])
    missing = await client.get(f"/api/v1/workflows/{workflow}/stats", headers=tenant.headers)
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
    bad = await client.get(f"/api/v1/workflows/{workflow}/stats", params={"window": "1y"}, headers=other.headers)
    assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize(("slo", "pointer"), [
    ({"success_rate": 1}, "/slo/success_rate"), ({"success_rate": 0.9, "window": "90d"}, "/slo/window"),
    ({"window": "7d"}, "/slo"), ({"success_rate": 0.9, "extra": 1}, "/slo/extra"),
])
async def test_an_objective_is_checked_where_it_is_written(
    client: httpx.AsyncClient, tenant: TenantKey, slo: dict[str, Any], pointer: str
) -> None:
    answer = await client.post("/api/v1/workflows", headers=tenant.headers, json={
        "name": name(), "definition": {"slo": slo, "steps": [{"id": "a", "tool": "echo"}]}})
    assert answer.status_code == 422, answer.text
    errors = {error["pointer"].removeprefix("/definition"): error["message"] for error in answer.json()["errors"]}
    assert pointer in errors, errors
    if pointer == "/slo":
        assert "success_rate" in errors[pointer]


async def test_exact_figures_of_a_known_history(
    client: httpx.AsyncClient, tenant: TenantKey, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    """Runs laid down with known times (the engine's own runs cannot be told when to fail):
    succeeded at 1 h, failed at 2 h and 3 h, succeeded at 5 h, failed at 7 h, succeeded at 8 h (hours
    after a start 20 h ago); each took 10, 20, 30, 40, 50, 60 s; one more is still running."""
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [{"id": "a", "tool": "echo"}],
                          slo={"success_rate": 0.5, "window": "24h"})
    start = datetime.now(UTC) - timedelta(hours=20)
    history = [("succeeded", 1), ("failed", 2), ("failed", 3), ("succeeded", 5), ("failed", 7), ("succeeded", 8)]
    async with sessionmaker() as db, db.begin():
        ids = (await db.execute(text(
            "SELECT w.id, v.id FROM workflow w JOIN workflow_version v ON v.workflow_id = w.id "
            "WHERE w.tenant_id = :t AND w.name = :n"), {"t": tenant.tenant_id, "n": workflow})).one()
        for i, (status, hour) in enumerate([*history, ("running", None)]):
            run_id = uuid.uuid4()
            finished = start + timedelta(hours=hour) if hour else None
            created = finished - timedelta(seconds=10 * (i + 1)) if finished else start
            await db.execute(text(
                "INSERT INTO run (id, tenant_id, workflow_id, workflow_version_id, workflow_name, workflow_version, "
                "status, priority, input, version, created_at, finished_at, updated_at) VALUES (:id, :t, :w, :v, :n, "
                "1, :s, 'normal', '{}', 1, :c, :f, now())"),
                {"id": run_id, "t": tenant.tenant_id, "w": ids[0], "v": ids[1], "n": workflow, "s": status,
                 "c": created, "f": finished})
            await db.execute(text(
                "INSERT INTO run_usage (run_id, tenant_id, workflow_name, limits, cost_usd) "
                "VALUES (:id, :t, :n, '{}', :cost)"), {"id": run_id, "t": tenant.tenant_id, "n": workflow,
                                                      "cost": "0.5" if status == "failed" else "0.1"})

    figures = await stats(client, tenant.headers, workflow)
    assert figures["runs"] == {"total": 7, "by_status": {"succeeded": 3, "failed": 3, "running": 1}}
    assert figures["completion_rate"] == round(6 / 7, 6) and figures["success_rate"] == 0.5
    # Durations 10..60 s: percentile_cont interpolates.
    assert figures["duration_s"] == {"p50": 35.0, "p95": 57.5, "p99": 59.5}
    assert figures["cost_per_run_usd"] == "0.300000"  # (3 x 0.1 + 3 x 0.5) / 6 finished
    # Failures at 2, 3 and 7 h: gaps of 1 h and 4 h.
    assert figures["mtbf_s"] == 2.5 * 3600
    # Stretches of failure: 2 h -> 5 h (the failure at 3 h is the same stretch) and 7 h -> 8 h.
    assert figures["mttr_s"] == 2 * 3600
    assert figures["objective"] == {"success_rate": 0.5, "window": "24h", "finished": 6, "failed": 3,
                                    "allowed_failures": 3.0, "error_budget_left": 0.0}
