"""Redis goes away under load and comes back empty: no worker exits, every run succeeds, no call runs twice."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import pytest

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
