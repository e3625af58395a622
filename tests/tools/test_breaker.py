"""The Redis-backed circuit breaker, against a real Redis (database 14, a fresh key prefix per test)."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import pytest_asyncio
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from app.tools.breaker import Breaker, BreakerPolicy

ROOT = Path(__file__).resolve().parents[2]
# Database 14 only, and only keys under our own prefix: other test runs share this Redis.
REDIS_URL = "redis://127.0.0.1:6379/14"

FAST = BreakerPolicy(failure_threshold=3, window_s=2.0, open_s=0.4, probe_lease_s=0.3)


@pytest_asyncio.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest_asyncio.fixture
async def prefix(redis: Redis) -> AsyncIterator[str]:
    prefix = f"test:breaker:{uuid.uuid4().hex}"
    yield prefix
    keys = [key async for key in redis.scan_iter(match=f"{prefix}:*")]
    if keys:
        await redis.delete(*keys)


@pytest.fixture
def breaker(redis: Redis, prefix: str) -> Breaker:
    return Breaker(redis, prefix=prefix)


@pytest.fixture
def key() -> str:
    return f"tool-{uuid.uuid4().hex[:8]}"


async def fail(breaker: Breaker, key: str, policy: BreakerPolicy, times: int) -> list[str]:
    return [await breaker.record(key, policy, False, probe=False) for _ in range(times)]


async def open_breaker(breaker: Breaker, key: str, policy: BreakerPolicy) -> None:
    states = await fail(breaker, key, policy, policy.failure_threshold)
    assert states[-1] == "open"


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def shown_state(breaker: Breaker, key: str) -> int:
    """The breaker-state gauge as a scrape reads it from Redis (0 closed, 1 half-open, 2 open; no keys: closed)."""
    return (await breaker.gauge_states()).get(key, 0)


async def test_opens_after_threshold_failures_within_window(breaker: Breaker, key: str) -> None:
    opened_before = sample("steward_breaker_transitions_total", {"to": "open"})

    assert await fail(breaker, key, FAST, 2) == ["closed", "closed"]
    assert (await breaker.before_call(key, FAST)).allowed
    assert await breaker.record(key, FAST, False, probe=False) == "open"

    decision = await breaker.before_call(key, FAST)
    assert (decision.allowed, decision.state, decision.probe) == (False, "open", False)
    assert sample("steward_breaker_transitions_total", {"to": "open"}) == opened_before + 1
    assert await shown_state(breaker, key) == 2


async def test_success_while_closed_keeps_the_window(breaker: Breaker, key: str) -> None:
    await fail(breaker, key, FAST, 2)
    assert await breaker.record(key, FAST, True, probe=False) == "closed"
    assert (await breaker.state(key, FAST))["failures"] == 2
    assert await breaker.record(key, FAST, False, probe=False) == "open"


async def test_failures_outside_the_window_do_not_count(breaker: Breaker, key: str) -> None:
    policy = BreakerPolicy(failure_threshold=3, window_s=0.4, open_s=0.4)
    await fail(breaker, key, policy, 2)
    await asyncio.sleep(0.5)

    assert await fail(breaker, key, policy, 2) == ["closed", "closed"]
    assert (await breaker.state(key, policy))["failures"] == 2
    assert await breaker.record(key, policy, False, probe=False) == "open"


async def test_refuses_while_open_with_retry_in(breaker: Breaker, key: str) -> None:
    await open_breaker(breaker, key, FAST)

    decision = await breaker.before_call(key, FAST)
    assert not decision.allowed and decision.state == "open"
    assert decision.retry_in_s is not None and 0.2 < decision.retry_in_s <= FAST.open_s
    # Outcomes of calls that started before it opened change nothing.
    assert await breaker.record(key, FAST, True, probe=False) == "open"
    state = await breaker.state(key, FAST)
    assert state["state"] == "open" and state["failures"] == 3
    assert abs((datetime.now(UTC) - state["opened_at"]).total_seconds()) < 2
    assert 0 < state["retry_in_s"] <= FAST.open_s


@pytest.mark.parametrize("probes", [1, 3])
async def test_half_open_lets_exactly_the_probes_through(breaker: Breaker, key: str, probes: int) -> None:
    policy = BreakerPolicy(failure_threshold=2, window_s=2.0, open_s=0.3, half_open_probes=probes)
    await open_breaker(breaker, key, policy)
    half_opened_before = sample("steward_breaker_transitions_total", {"to": "half_open"})
    await asyncio.sleep(policy.open_s + 0.05)

    decisions = await asyncio.gather(*(breaker.before_call(key, policy) for _ in range(20)))

    allowed = [d for d in decisions if d.allowed]
    assert len(allowed) == probes
    assert all(d.probe and d.state == "half_open" for d in allowed)
    assert all(d.state == "half_open" and d.retry_in_s is None and not d.probe for d in decisions if not d.allowed)
    assert sample("steward_breaker_transitions_total", {"to": "half_open"}) == half_opened_before + 1
    assert (await breaker.state(key, policy))["state"] == "half_open"


async def test_probe_success_closes_and_clears_failures(breaker: Breaker, key: str) -> None:
    await open_breaker(breaker, key, FAST)
    await asyncio.sleep(FAST.open_s + 0.05)
    probe = await breaker.before_call(key, FAST)
    assert probe.allowed and probe.probe
    # A call that was already running when the breaker opened does not decide anything.
    assert await breaker.record(key, FAST, False, probe=False) == "half_open"

    assert await breaker.record(key, FAST, True, probe=True) == "closed"

    state = await breaker.state(key, FAST)
    assert (state["state"], state["failures"], state["opened_at"]) == ("closed", 0, None)
    assert await fail(breaker, key, FAST, 2) == ["closed", "closed"]
    decision = await breaker.before_call(key, FAST)
    assert (decision.allowed, decision.state, decision.probe) == (True, "closed", False)
    assert await shown_state(breaker, key) == 0


async def test_probe_failure_reopens_for_another_open_period(breaker: Breaker, key: str) -> None:
    await open_breaker(breaker, key, FAST)
    await asyncio.sleep(FAST.open_s + 0.05)
    assert (await breaker.before_call(key, FAST)).probe

    assert await breaker.record(key, FAST, False, probe=True) == "open"

    decision = await breaker.before_call(key, FAST)
    assert not decision.allowed and decision.state == "open"
    assert decision.retry_in_s is not None and decision.retry_in_s > FAST.open_s - 0.1
    await asyncio.sleep(FAST.open_s + 0.05)
    assert (await breaker.before_call(key, FAST)).probe


async def test_abandoned_probe_slot_frees_itself(breaker: Breaker, key: str) -> None:
    await open_breaker(breaker, key, FAST)
    await asyncio.sleep(FAST.open_s + 0.05)
    assert (await breaker.before_call(key, FAST)).probe  # this worker "dies" without recording
    assert not (await breaker.before_call(key, FAST)).allowed

    await asyncio.sleep(FAST.lease_s + 0.05)

    decision = await breaker.before_call(key, FAST)
    assert decision.allowed and decision.probe


async def test_probe_lease_defaults_to_at_least_30_s(breaker: Breaker, redis: Redis, prefix: str, key: str) -> None:
    policy = BreakerPolicy(failure_threshold=1, window_s=2.0, open_s=0.3)
    assert policy.lease_s == 30.0
    await open_breaker(breaker, key, policy)
    await asyncio.sleep(policy.open_s + 0.05)
    assert (await breaker.before_call(key, policy)).probe

    assert 29_000 < await redis.pttl(f"{prefix}:{{{key}}}:probes") <= 30_000


async def test_keys_expire_on_their_own(breaker: Breaker, redis: Redis, prefix: str, key: str) -> None:
    await open_breaker(breaker, key, FAST)
    await asyncio.sleep(FAST.open_s + 0.05)
    assert (await breaker.before_call(key, FAST)).probe

    keys = [k async for k in redis.scan_iter(match=f"{prefix}:*")]
    assert len(keys) == 3
    ttls = {k.decode().rsplit(":", 1)[1]: await redis.pttl(k) for k in keys}
    assert 0 < ttls["failures"] <= 2 * 2 * 1000
    assert 0 < ttls["probes"] <= 300
    assert 0 < ttls["state"] <= 3 * (0.4 + 0.3 + 2.0) * 1000 + 1


async def test_reset_closes_and_removes_keys(breaker: Breaker, redis: Redis, prefix: str, key: str) -> None:
    await open_breaker(breaker, key, FAST)
    await breaker.reset(key)
    assert [k async for k in redis.scan_iter(match=f"{prefix}:*")] == []
    assert (await breaker.before_call(key, FAST)).allowed
    assert await shown_state(breaker, key) == 0


async def test_works_with_a_decoding_client(prefix: str, key: str) -> None:
    client = Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        breaker = Breaker(client, prefix=prefix)
        await open_breaker(breaker, key, FAST)
        assert (await breaker.before_call(key, FAST)).state == "open"
        assert (await breaker.state(key, FAST))["opened_at"] is not None
    finally:
        await client.aclose()


_PROCESS = """
import asyncio, sys
from redis.asyncio import Redis
from app.tools.breaker import Breaker, BreakerPolicy

async def main() -> None:
    url, prefix, key, action, times = sys.argv[1:6]
    policy = BreakerPolicy(failure_threshold=6, window_s=30.0, open_s=30.0)
    client = Redis.from_url(url)
    breaker = Breaker(client, prefix=prefix)
    if action == "fail":
        print(",".join([await breaker.record(key, policy, False, probe=False) for _ in range(int(times))]))
    else:
        decision = await breaker.before_call(key, policy)
        print(decision.state, decision.allowed, decision.retry_in_s is not None)
    await client.aclose()

asyncio.run(main())
"""


async def run_process(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _PROCESS, *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, err.decode()
    return out.decode().strip()


async def test_processes_share_one_breaker(breaker: Breaker, prefix: str, key: str) -> None:
    a, b = await asyncio.gather(
        run_process(REDIS_URL, prefix, key, "fail", "3"), run_process(REDIS_URL, prefix, key, "fail", "3")
    )

    # Neither process's three failures reach the threshold of six; together they do, exactly once.
    states = a.split(",") + b.split(",")
    assert sorted(states) == ["closed"] * 5 + ["open"]
    assert await run_process(REDIS_URL, prefix, key, "check", "0") == "open False True"
    assert (await breaker.state(key, BreakerPolicy(failure_threshold=6, window_s=30.0, open_s=30.0)))["failures"] == 6


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_redis_down_allows_calls_and_warns_once(caplog: pytest.LogCaptureFixture, key: str) -> None:
    client = Redis(host="127.0.0.1", port=closed_port(), socket_connect_timeout=0.5)
    breaker = Breaker(client)
    try:
        with caplog.at_level(logging.WARNING, logger="app.tools.breaker"):
            decisions = [await breaker.before_call(key, FAST) for _ in range(3)]
            outcome = await breaker.record(key, FAST, False, probe=False)
    finally:
        await client.aclose()

    assert all(d.allowed and d.state == "closed" and d.retry_in_s is None and not d.probe for d in decisions)
    assert outcome == "closed"
    warnings = [r for r in caplog.records if r.name == "app.tools.breaker" and r.levelno == logging.WARNING]
    assert len(warnings) == 1


async def test_read_reports_each_state_and_moves_nothing(breaker: Breaker, key: str) -> None:
    other = f"{key}-other"
    await fail(breaker, other, FAST, 1)
    await open_breaker(breaker, key, FAST)
    states = await breaker.read([(key, FAST), (other, FAST)])
    assert states is not None
    opened, closed = states
    assert (opened.state, opened.failures, opened.threshold) == ("open", 3, 3)
    assert opened.opened_at is not None and opened.retry_in_s is not None and opened.retry_at is not None
    assert opened.retry_at > datetime.now(UTC) and 0 < opened.retry_in_s <= FAST.open_s
    assert (closed.state, closed.failures, closed.retry_at) == ("closed", 1, None)
    for _ in range(200):  # until open_s has passed
        states = await breaker.read([(key, FAST)])
        if states and states[0].state == "half_open":
            break
        await asyncio.sleep(0.01)
    assert states and states[0].state == "half_open"
    # Reading took no probe slot: the first call after it is the probe.
    assert (await breaker.before_call(key, FAST)).probe


async def test_read_with_redis_down_is_unknown_not_an_error(key: str) -> None:
    client = Redis(host="127.0.0.1", port=closed_port(), socket_connect_timeout=0.5)
    try:
        assert await Breaker(client).read([(key, FAST)]) is None
    finally:
        await client.aclose()


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        BreakerPolicy(failure_threshold=0)
    with pytest.raises(ValueError):
        BreakerPolicy(window_s=0)
    with pytest.raises(ValueError):
        BreakerPolicy(probe_lease_s=0)
