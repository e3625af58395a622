"""Redis goes away under load and comes back empty: no worker exits, every run succeeds, no call runs twice."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Callable

import pytest

from app.config import Settings
from app.redis import connect as connect_redis
from app.tools.breaker import Breaker, BreakerPolicy, breaker_prefix, tool_key
from tests.fakes.tool_server import ToolServer
from tests.support.outages import Api, LoggedWorker, finished, slow_tool_workflow, start_run, until
from tests.support.servers import PrivateRedis

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("outages")]

# Longer than every retry and backoff interval involved (a worker tries Redis again at least every 2 s,
# the relay every 1 s; the reconciler's pass and outbox staleness are 1 s here), so every part meets a
# Redis that stays away. The scenario is 20 s: that proves nothing more and costs 14 s a run.
OUTAGE_S = 6.0
# Lines a worker may write in this test: its start, the outage's start and end, and the circuit
# breaker's note that it lets calls through while Redis is away.
EXPECTED = ("workers.main: worker", "app.outage: Redis unreachable", "app.outage: Redis reachable again",
            "app.tools.breaker: breaker")


async def test_redis_away_under_load_no_worker_exits_and_every_run_succeeds_once(
    api: Api, tools: ToolServer, private_redis: PrivateRedis, workers: Callable[..., LoggedWorker]
) -> None:
    workflow = await slow_tool_workflow(api, tools, 0.3)
    pool = [workers(), workers()]
    # More runs than the two workers' 10 job slots: some jobs wait in Redis, and are lost with it.
    before = [await start_run(api, workflow) for _ in range(20)]
    await until(lambda: len(tools.calls_to("/hang")) >= 10, "the workers are busy")

    await asyncio.to_thread(private_redis.stop)  # SHUTDOWN NOSAVE: everything queued is gone
    during = [await start_run(api, workflow) for _ in range(10)]  # the API keeps taking runs
    await until(lambda: all(w.said("app.outage: Redis unreachable") for w in pool), "the workers met the outage")
    await asyncio.sleep(OUTAGE_S)  # the outage itself
    assert all(w.alive for w in pool)
    await asyncio.to_thread(private_redis.start)  # empty

    runs = [await finished(api, run_id) for run_id in before + during]
    assert [r["status"] for r in runs] == ["succeeded"] * len(runs), [r for r in runs if r["status"] != "succeeded"]
    assert all(w.alive for w in pool)
    calls = Counter(call.idempotency_key for call in tools.calls_to("/hang"))
    assert len(calls) == 3 * len(runs)  # every step called its tool...
    assert set(calls.values()) == {1}  # ... once
    for w in pool:
        assert w.said("app.outage: Redis unreachable") == 1
        assert w.said("app.outage: Redis reachable again") == 1
        # Nothing else: no traceback, no reconnect chatter, no line per job; every line has its time.
        assert w.tracebacks() == []
        assert [line for line in w.records() if not any(text in line for text in EXPECTED)] == []


async def test_redis_away_metrics_still_answer_without_the_breaker_states(
    api: Api, outage_settings: Settings, private_redis: PrivateRedis
) -> None:
    """The breakers' state is read from Redis when scraped: while Redis is away the scrape answers without
    it and counts a Redis scrape error."""
    redis = connect_redis(private_redis.url)
    breaker = Breaker(redis, breaker_prefix(outage_settings.queue_prefix))
    try:
        key = tool_key(uuid.uuid4(), "search")
        assert await breaker.record(key, BreakerPolicy(failure_threshold=1, open_s=600), False, probe=False) == "open"
        before = await api.client.get("/metrics")
        assert 'steward_breaker_state{tenant="",tool="search"} 2.0' in before.text
        await asyncio.to_thread(private_redis.stop)
        during = await api.client.get("/metrics")
        assert during.status_code == 200 and "steward_http_requests_total" in during.text
        assert "steward_breaker_state{" not in during.text
        assert "steward_runs_active{" in during.text  # the database's gauges are still there
        errors = [f'steward_scrape_errors_total{{source="redis"}} {n}.0' for n in (0, 1)]
        assert errors[0] in before.text and errors[1] in during.text
    finally:
        await redis.aclose()
