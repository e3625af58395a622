"""PostgreSQL goes away: the API answers 503 with Retry-After and recovers by itself; a tool call that
finished during the outage is recorded when it ends, without running again, while the lease lasts."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.tool_server import ToolServer
from tests.support.outages import Api, LoggedWorker, finished, slow_tool_workflow, start_run, until
from tests.support.runs import step
from tests.support.servers import PrivatePostgres

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("outages")]

# Longer than the tool call (2 s, so it finishes inside the outage) and than every retry interval (a
# worker tries the database again at least every 2 s; the reconciler runs every second here). The
# issue's scenario is 15 s: that proves nothing more and costs 9 s a run.
OUTAGE_S = 6.0
CALL_S = 2.0


async def _during_outage(api: Api, run_id: str, workflow: str) -> None:
    """What a client sees while the database is away: 503 ``unavailable`` with Retry-After, for reads and writes."""
    for r in (await api.client.get(f"/api/v1/runs/{run_id}", headers=api.headers),
              await api.client.post("/api/v1/runs", json={"workflow": workflow, "input": {}}, headers=api.headers)):
        assert r.status_code == 503, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["type"].endswith("/unavailable")
        assert int(r.headers["retry-after"]) > 0
    # Metrics still answer: the process's own, without the gauges read from the database.
    scraped = await api.client.get("/metrics")
    assert scraped.status_code == 200 and "steward_http_requests_total" in scraped.text
    assert "steward_runs_active" not in scraped.text
    errors = {s.labels["source"]: s.value for family in text_string_to_metric_families(scraped.text)
              for s in family.samples if s.name == "steward_scrape_errors_total"}
    assert errors["database"] >= 1 and errors["redis"] == 0  # the scrape says what it left out


async def _api_answers(api: Api, run_id: str) -> None:
    """Wait until the API answers again, by itself."""
    deadline = asyncio.get_running_loop().time() + 30
    while (await api.client.get(f"/api/v1/runs/{run_id}", headers=api.headers)).status_code != 200:
        assert asyncio.get_running_loop().time() < deadline, "the API did not recover"
        await asyncio.sleep(0.05)


async def test_postgres_away_the_api_answers_503_and_a_finished_call_is_recorded_once(
    api: Api, tools: ToolServer, private_pg: PrivatePostgres, workers: Callable[..., LoggedWorker],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    workflow = await slow_tool_workflow(api, tools, CALL_S, steps=2)
    worker = workers(lease_s=30)  # longer than the outage: the step stays this worker's throughout
    run_id = await start_run(api, workflow)
    await until(lambda: len(tools.calls_to("/hang")) == 1, "the first call is under way")

    await asyncio.to_thread(private_pg.stop)
    await _during_outage(api, run_id, workflow)
    await asyncio.sleep(OUTAGE_S)  # the outage itself; the call finishes inside it
    assert worker.alive
    await asyncio.to_thread(private_pg.start)
    await _api_answers(api, run_id)

    run = await finished(api, run_id)
    assert run["status"] == "succeeded", run
    first = step(run, "s0")
    assert [a["status"] for a in first["attempts"]] == ["succeeded"]
    calls = Counter(call.idempotency_key for call in tools.calls_to("/hang"))
    assert len(calls) == 2 and set(calls.values()) == {1}  # each step's call ran once
    assert worker.alive
    assert worker.said("app.outage: PostgreSQL unreachable") == 1
    assert worker.said("app.outage: PostgreSQL reachable again") == 1
    assert worker.tracebacks() == []  # no traceback
    # The API's process logged the outage once and once its end; no request logged an error.
    # (Only PostgreSQL's: Redis's tracker is process-wide, and an earlier Redis outage test of this process
    # may log its end here, at its first contact since.)
    outage = [r.getMessage() for r in caplog.records if r.name == "app.outage" and "PostgreSQL" in r.getMessage()]
    assert len(outage) == 2, outage
    assert outage[0].startswith("PostgreSQL unreachable") and outage[1].startswith("PostgreSQL reachable again")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_postgres_away_past_the_lease_the_step_is_retried_and_runs_again(
    api: Api, tools: ToolServer, private_pg: PrivatePostgres, workers: Callable[..., LoggedWorker],
) -> None:
    """The limit of the above: once the lease runs out the worker stops trying to record, and the
    reconciler retries the step when the database is back; its call runs again, with the same
    Idempotency-Key (a tool honouring it does the work once)."""
    workflow = await slow_tool_workflow(api, tools, 0.5, steps=1)
    worker = workers(lease_s=3)  # shorter than the outage
    run_id = await start_run(api, workflow)
    await until(lambda: len(tools.calls_to("/hang")) == 1, "the call is under way")

    await asyncio.to_thread(private_pg.stop)
    await until(lambda: worker.said("before the lease ran out") == 1, "the worker gave up recording", timeout=30)
    await asyncio.sleep(OUTAGE_S)
    await asyncio.to_thread(private_pg.start)

    run = await finished(api, run_id)
    assert run["status"] == "succeeded", run
    attempts = step(run, "s0")["attempts"]
    assert [(a["status"], (a["error"] or {}).get("class")) for a in attempts] == [
        ("failed", "worker_lost"), ("succeeded", None)]
    calls = [call.idempotency_key for call in tools.calls_to("/hang")]
    assert len(calls) == 2 and len(set(calls)) == 1
    assert worker.alive
    assert worker.tracebacks() == []
