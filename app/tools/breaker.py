"""Circuit breakers whose state every worker process shares through Redis.

The classic three states (as in resilience4j or Polly):

- closed: every call goes through. Failures are kept in a sliding window (a sorted set of failure
  times, trimmed on write); ``failure_threshold`` failures within ``window_s`` open the breaker.
  A success while closed writes nothing: it neither resets nor shortens the window, failures simply
  age out of it.
- open: calls are refused, with ``retry_in_s``, until ``open_s`` has passed since opening. Outcomes
  recorded while open (calls that started before it opened) change nothing.
- half_open (once ``open_s`` has passed): up to ``half_open_probes`` calls at once go through as
  probes. The first probe outcome recorded decides: success closes the breaker and clears the
  failure window, failure re-opens it for another ``open_s``. A probe slot is a lease that expires
  after ``probe_lease_s`` (default ``max(open_s, 30 s)``), so a worker that dies mid-probe does not
  wedge the breaker.

Each decision and record is one Lua script timed by the Redis server's clock (``TIME``), so workers
with skewed clocks agree and concurrent callers cannot both take the last probe slot. Every key
carries a TTL, so idle breakers leave nothing behind; a breaker left idle long after opening expires
to closed.

Redis is soft state (DESIGN.md): when it cannot be reached, calls are allowed and outcomes dropped,
with a warning at most once a minute.

The state gauge is read from Redis when the API is scraped (:meth:`Breaker.gauge_states`), not kept by the
process that last called the tool: a breaker opened by one worker and closed by another reads the same
everywhere.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

WARN_INTERVAL_S = 60.0
DEFAULT_MIN_PROBE_LEASE_S = 30.0

# Module-level: prometheus_client's default registry refuses a second metric of the same name.
BREAKER_TRANSITIONS = Counter("steward_breaker_transitions_total", "Breaker state changes made by this process", ["to"])

# KEYS: state hash, failure window (zset), probe leases (zset). Sets now (ms, server time),
# opened_at (ms or nil) and fmt (numbers go to Redis as fixed-point strings, not %.14g).
_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local state_key, failures_key, probes_key = KEYS[1], KEYS[2], KEYS[3]
local opened_at = redis.call('HGET', state_key, 'opened_at')
if opened_at then opened_at = tonumber(opened_at) end
local function fmt(x) return string.format('%.3f', x) end
"""

# ARGV: open_ms, max probes, lease_ms, state ttl_ms, token.
# Returns {state, allowed, retry_ms (-1: none), probe, first probe of this half-open period}.
_BEFORE_CALL = (
    _PRELUDE
    + """
local open_ms, max_probes, lease_ms, ttl_ms, token =
  tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5]
if not opened_at then return {'closed', 1, -1, 0, 0} end
local probe_at = opened_at + open_ms
if now < probe_at then return {'open', 0, math.ceil(probe_at - now), 0, 0} end
redis.call('ZREMRANGEBYSCORE', probes_key, '-inf', fmt(now))
if redis.call('ZCARD', probes_key) >= max_probes then return {'half_open', 0, -1, 0, 0} end
redis.call('ZADD', probes_key, fmt(now + lease_ms), token)
redis.call('PEXPIRE', probes_key, math.ceil(lease_ms))
local first = redis.call('HSETNX', state_key, 'half_open_at', fmt(now))
redis.call('PEXPIRE', state_key, ttl_ms)
return {'half_open', 1, -1, 1, first}
"""
)

# ARGV: ok, probe, threshold, window_ms, open_ms, state ttl_ms, failures ttl_ms, token.
# Returns {new state, state transitioned to ('' when none)}.
_RECORD = (
    _PRELUDE
    + """
local ok, probe, threshold = ARGV[1] == '1', ARGV[2] == '1', tonumber(ARGV[3])
local window_ms, open_ms, ttl_ms, failures_ttl_ms, token =
  tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], ARGV[7], ARGV[8]
local function open()
  redis.call('HSET', state_key, 'opened_at', fmt(now), 'probe_at', fmt(now + open_ms))
  redis.call('HDEL', state_key, 'half_open_at')
  redis.call('PEXPIRE', state_key, ttl_ms)
  redis.call('DEL', probes_key)
  return {'open', 'open'}
end
if opened_at then
  if now < opened_at + open_ms then return {'open', ''} end
  if not probe then return {'half_open', ''} end
  if ok then
    redis.call('DEL', state_key, failures_key, probes_key)
    return {'closed', 'closed'}
  end
  return open()
end
if ok then return {'closed', ''} end
redis.call('ZADD', failures_key, fmt(now), fmt(now) .. ':' .. token)
redis.call('ZREMRANGEBYSCORE', failures_key, '-inf', fmt(now - window_ms))
redis.call('PEXPIRE', failures_key, failures_ttl_ms)
if redis.call('ZCARD', failures_key) >= threshold then return open() end
return {'closed', ''}
"""
)

# ARGV: open_ms, window_ms. Read-only. Returns {state, failures in window, opened_at ('' or ms), retry_ms}.
_STATE = (
    _PRELUDE
    + """
local open_ms, window_ms = tonumber(ARGV[1]), tonumber(ARGV[2])
local failures = redis.call('ZCOUNT', failures_key, '(' .. fmt(now - window_ms), '+inf')
if not opened_at then return {'closed', failures, '', -1} end
local probe_at = opened_at + open_ms
if now < probe_at then return {'open', failures, fmt(opened_at), math.ceil(probe_at - now)} end
return {'half_open', failures, fmt(opened_at), -1}
"""
)


@dataclass(frozen=True)
class BreakerPolicy:
    failure_threshold: int = 5  # failures within window_s that open the breaker
    window_s: float = 60.0
    open_s: float = 30.0  # how long it stays open before letting probes through
    half_open_probes: int = 1  # calls let through at once while half-open
    probe_lease_s: float | None = None  # an unrecorded probe frees its slot after this; None: max(open_s, 30 s)

    def __post_init__(self) -> None:
        if self.failure_threshold < 1 or self.half_open_probes < 1:
            raise ValueError("failure_threshold and half_open_probes must be at least 1")
        if self.window_s <= 0 or self.open_s < 0 or (self.probe_lease_s is not None and self.probe_lease_s <= 0):
            raise ValueError("window_s and probe_lease_s must be positive, open_s not negative")

    @property
    def lease_s(self) -> float:
        return self.probe_lease_s if self.probe_lease_s is not None else max(self.open_s, DEFAULT_MIN_PROBE_LEASE_S)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    state: str  # "closed" | "open" | "half_open"
    retry_in_s: float | None  # when open: seconds until probes are allowed
    probe: bool  # this call is a half-open probe (its outcome decides closed/open)


# Redis unreachable: soft state, so fail open.
_FAIL_OPEN = Decision(allowed=True, state="closed", retry_in_s=None, probe=False)


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _ttl_ms(policy: BreakerPolicy) -> int:
    # Long enough to outlive an opening and its probes; short enough that idle breakers vanish.
    return _ms(3 * max(policy.window_s, policy.open_s + policy.lease_s))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _retry_s(retry_ms: Any) -> float | None:
    return None if int(retry_ms) < 0 else int(retry_ms) / 1000


def _glob(text: str) -> str:
    """``text`` matched literally in a SCAN pattern."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


def breaker_prefix(queue_prefix: str) -> str:
    """Where every process of one deployment keeps its breakers (the queue prefix keeps tests apart)."""
    return f"{queue_prefix}:breaker"


def tool_key(tenant_id: uuid.UUID, tool: str) -> str:
    """The breaker of one tenant's tool: every call of that tool, whichever run or worker, shares it."""
    return f"{tenant_id}:{tool}"


@dataclass(frozen=True)
class BreakerState:
    """A breaker as a person reads it: ``failures`` of ``threshold`` in the window; when open, when probes
    may go through (``retry_at``, by the Redis server's clock)."""

    state: str  # "closed" | "open" | "half_open"
    failures: int
    threshold: int
    window_s: float
    opened_at: datetime | None
    retry_in_s: float | None
    retry_at: datetime | None


class Breaker:
    """Circuit breakers keyed by name (e.g. tenant and tool), state in Redis under ``prefix``."""

    def __init__(self, redis: Redis, prefix: str = "steward:breaker") -> None:
        self._redis = redis
        self._prefix = prefix
        self._before_call = redis.register_script(_BEFORE_CALL)
        self._record = redis.register_script(_RECORD)
        self._state = redis.register_script(_STATE)
        self._warned_at = -math.inf
        self._suppressed = 0

    def _keys(self, key: str) -> list[str]:
        # One hash tag for all three keys: a Lua script may only touch keys of one cluster slot.
        base = f"{self._prefix}:{{{key}}}"
        return [f"{base}:state", f"{base}:failures", f"{base}:probes"]

    async def before_call(self, key: str, policy: BreakerPolicy) -> Decision:
        """Whether a call may go through now; a probe slot taken here is freed by ``record`` or its lease.

        Fails open: with Redis unreachable every call is allowed.
        """
        args: list[int | str] = [
            _ms(policy.open_s),
            policy.half_open_probes,
            _ms(policy.lease_s),
            _ttl_ms(policy),
            uuid.uuid4().hex,
        ]
        try:
            state, allowed, retry_ms, probe, first_probe = await self._before_call(keys=self._keys(key), args=args)
        except (RedisError, OSError) as exc:
            self._warn("before_call", key, exc)
            return _FAIL_OPEN
        decision = Decision(allowed=bool(allowed), state=_text(state), retry_in_s=_retry_s(retry_ms), probe=bool(probe))
        if first_probe:
            BREAKER_TRANSITIONS.labels("half_open").inc()
        return decision

    async def record(self, key: str, policy: BreakerPolicy, ok: bool, *, probe: bool) -> str:
        """Record a call's outcome; returns the breaker's state after it.

        Only failures while closed and probe outcomes while half-open change anything. With Redis
        unreachable the outcome is dropped (logged) and "closed" returned.
        """
        args: list[int | str] = [
            int(ok),
            int(probe),
            policy.failure_threshold,
            _ms(policy.window_s),
            _ms(policy.open_s),
            _ttl_ms(policy),
            _ms(2 * policy.window_s),
            uuid.uuid4().hex,
        ]
        try:
            state, moved_to = await self._record(keys=self._keys(key), args=args)
        except (RedisError, OSError) as exc:
            self._warn("record", key, exc)
            return "closed"
        new_state = _text(state)
        if moved_to:
            BREAKER_TRANSITIONS.labels(_text(moved_to)).inc()
        return new_state

    async def state(self, key: str, policy: BreakerPolicy) -> dict[str, Any]:
        """The breaker as seen now, for the API and metrics. Redis errors propagate."""
        state, failures, opened_at, retry_ms = await self._state(
            keys=self._keys(key), args=[_ms(policy.open_s), _ms(policy.window_s)]
        )
        opened = _text(opened_at)
        return {
            "state": _text(state),
            "failures": int(failures),
            "opened_at": datetime.fromtimestamp(float(opened) / 1000, UTC) if opened else None,
            "retry_in_s": _retry_s(retry_ms),
        }

    async def read(self, keys: Sequence[tuple[str, BreakerPolicy]]) -> list[BreakerState] | None:
        """The state of each breaker in ``keys`` (read only; nothing is taken or moved), or None when Redis
        is not answering: soft state, so a page shows it as unknown rather than failing."""
        try:
            found = await asyncio.gather(*(self.state(key, policy) for key, policy in keys))
        except (RedisError, OSError) as exc:
            self._warn("read", ",".join(key for key, _ in keys[:3]), exc)
            return None
        read_at = datetime.now(UTC)
        return [
            BreakerState(
                state=s["state"], failures=s["failures"], threshold=policy.failure_threshold,
                window_s=policy.window_s, opened_at=s["opened_at"], retry_in_s=s["retry_in_s"],
                retry_at=read_at + timedelta(seconds=s["retry_in_s"]) if s["retry_in_s"] is not None else None,
            )
            for s, (_, policy) in zip(found, keys, strict=True)
        ]

    async def reset(self, key: str) -> None:
        """Close the breaker and forget its failures. Redis errors propagate."""
        await self._redis.delete(*self._keys(key))

    async def gauge_states(self) -> dict[str, int]:
        """Every breaker Redis keeps anything for, by key (:func:`tool_key`), as the state gauge shows it:
        2 open, 1 half-open (``open_s`` has passed), 0 closed with failures in its window. Breakers that are
        closed with no recent failures have no keys and are left out. Read only; Redis errors propagate.

        Found with SCAN rather than an index: an index key would sit in another cluster slot than the
        breaker's own keys, which the scripts may not touch. As in the scripts, the Redis server's clock
        decides between open and half-open (``probe_at``, written when the breaker opened)."""
        start = len(self._prefix) + 2  # past "<prefix>:{"
        found: set[str] = set()
        opened: set[str] = set()
        async for name in self._redis.scan_iter(match=_glob(self._prefix) + ":{*}:*", count=1000):
            key, _, part = _text(name)[start:].rpartition("}:")
            found.add(key)
            if part == "state":
                opened.add(key)
        ordered = sorted(opened)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.time()
            for key in ordered:
                pipe.hmget(self._keys(key)[0], ["opened_at", "probe_at", "half_open_at"])
            (seconds, micros), *held = await pipe.execute()
        now_ms = int(seconds) * 1000 + int(micros) / 1000
        states = dict.fromkeys(found, 0)
        for key, (opened_at, probe_at, half_open_at) in zip(ordered, held, strict=True):
            if opened_at is None:  # expired or closed since the scan
                continue
            if probe_at is None:  # opened before probe_at was written: half-open once a probe went through
                states[key] = 1 if half_open_at is not None else 2
            else:
                states[key] = 1 if now_ms >= float(probe_at) else 2
        return states

    def _warn(self, action: str, key: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned_at < WARN_INTERVAL_S:
            self._suppressed += 1
            log.debug("breaker %s for %r: Redis unreachable (%r)", action, key, exc)
            return
        log.warning(
            "breaker %s for %r: Redis unreachable (%r); allowing calls and dropping outcomes "
            "(%d similar errors since the last warning)",
            action,
            key,
            exc,
            self._suppressed,
        )
        self._warned_at = now
        self._suppressed = 0
