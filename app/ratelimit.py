"""Token-bucket rate limits per principal (API key or user) and per tenant, kept in Redis.

Every authenticated API request takes one token from two buckets: the caller's
(``<queue_prefix>:rl:p:<principal>``) and its tenant's (``<queue_prefix>:rl:t:<tenant_id>``). A bucket
holds at most ``burst`` tokens and refills at ``rps`` tokens a second; ``rps = 0`` turns it off. One Lua
script (EVALSHA, one round trip) refills both from the Redis server's clock, then takes a token from both
or from neither, so concurrent requests on any number of API replicas never get past the burst and a
request refused by one bucket costs nothing in the other. A refused request raises :class:`RateLimited`:
429 problem+json with ``Retry-After``.

Buckets are soft state (DESIGN.md): each key expires once it would have refilled completely, and when
Redis cannot be reached (or answers slower than ``REDIS_TIMEOUT_S``) requests are admitted unchecked
(for ``ERROR_BACKOFF_S`` without asking Redis again), counted in ``steward_rate_limit_errors_total``,
with a warning at most once a minute. Failing closed would turn a Redis outage, which loses no run,
into a full API outage.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

from fastapi import Request
from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.config import Settings
from app.context import Ctx
from app.errors import AppError

log = logging.getLogger(__name__)

WARN_INTERVAL_S = 60.0
# A hung Redis must not hold every request for the client's 5 s socket timeout: past this, admit. Not
# much shorter: an event loop busy with a burst of requests must not time checks out (and admit them).
REDIS_TIMEOUT_S = 2.0
# After a failed check, admit without asking Redis for this long (one slow request a second, not all).
ERROR_BACKOFF_S = 1.0
# Bucket keys live until they would be full again, but no longer than this (nearly-off limits).
MAX_TTL_MS = 86_400_000

# Module-level: prometheus_client's default registry refuses a second metric of the same name.
RATE_LIMITED = Counter("steward_rate_limited_total", "API requests refused by a rate limit", ["scope"])
RATE_LIMIT_ERRORS = Counter(
    "steward_rate_limit_errors_total", "API requests admitted unchecked because Redis could not be asked"
)

# KEYS: principal bucket, tenant bucket. ARGV per bucket (principal, then tenant): rps, burst, ttl_ms;
# rps 0 skips that bucket. A bucket is a hash {tokens, ts} (seconds, server time), absent meaning full.
# Returns {0, 0} when admitted (a token taken from each bucket), else {bucket refused (1 principal,
# 2 tenant: the one with the longer wait), ms until it holds a token}; a refusal writes nothing.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local levels = {}
local refused, wait = 0, 0
for i = 1, 2 do
  local rate, burst = tonumber(ARGV[3 * i - 2]), tonumber(ARGV[3 * i - 1])
  if rate > 0 then
    local state = redis.call('HMGET', KEYS[i], 'tokens', 'ts')
    local tokens, ts = tonumber(state[1]), tonumber(state[2])
    if tokens == nil or ts == nil then
      tokens = burst
    else
      tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
    end
    levels[i] = tokens
    if tokens < 1 and (1 - tokens) / rate > wait then
      refused, wait = i, (1 - tokens) / rate
    end
  end
end
if refused > 0 then return {refused, math.ceil(wait * 1000)} end
for i, tokens in pairs(levels) do
  redis.call('HSET', KEYS[i], 'tokens', string.format('%.6f', tokens - 1), 'ts', string.format('%.6f', now))
  redis.call('PEXPIRE', KEYS[i], ARGV[3 * i])
end
return {0, 0}
"""

_SCOPES = {1: "principal", 2: "tenant"}


class RateLimited(AppError):
    """429: a rate limit refused the request; ``Retry-After`` says when one more would be admitted."""

    status = 429
    type = "rate-limited"
    title = "Too many requests"

    def __init__(self, detail: str, *, scope: str, retry_after_s: int) -> None:
        super().__init__(detail, limit=scope, retry_after_s=retry_after_s)
        self.scope = scope
        self.retry_after_s = retry_after_s
        # Sent by app.http.app_error_handler.
        self.headers = {"Retry-After": str(retry_after_s)}


def _bucket_args(rps: float, burst: int) -> list[Any]:
    if rps <= 0:
        return [0, burst, 0]
    # Once a bucket would be full again it is the same as no bucket: let the key expire then.
    ttl_ms = min(MAX_TTL_MS, math.ceil(burst / rps * 1000) + 1000)
    return [repr(float(rps)), burst, ttl_ms]


def _who(principal: str) -> str:
    kind = principal.split(":", 1)[0]
    return {"key": "this API key", "user": "this user"}.get(kind, "this principal")


class RateLimiter:
    """The two buckets of every request, in the Redis database of ``redis``, keys under ``prefix``."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis = redis
        self._prefix = prefix
        self._take = redis.register_script(_TAKE)
        self._skip_until = -math.inf
        self._warned_at = -math.inf
        self._suppressed = 0

    def keys(self, ctx: Ctx) -> list[str]:
        return [f"{self._prefix}:rl:p:{ctx.principal}", f"{self._prefix}:rl:t:{ctx.tenant_id}"]

    async def check(self, ctx: Ctx, settings: Settings) -> None:
        """Take a token from the principal's and the tenant's bucket, or raise :class:`RateLimited`.

        Both or neither: a refused request leaves both buckets as they were. Fails open (see module doc).
        """
        p_rps, t_rps = settings.rate_limit_principal_rps, settings.rate_limit_tenant_rps
        if p_rps <= 0 and t_rps <= 0:
            return
        if time.monotonic() < self._skip_until:
            RATE_LIMIT_ERRORS.inc()
            return
        args = _bucket_args(p_rps, settings.rate_limit_principal_burst) + _bucket_args(
            t_rps, settings.rate_limit_tenant_burst
        )
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                refused, retry_ms = await self._take(keys=self.keys(ctx), args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            self._skip_until = time.monotonic() + ERROR_BACKOFF_S
            RATE_LIMIT_ERRORS.inc()
            self._warn(exc)
            return
        if not refused:
            return
        scope = _SCOPES[int(refused)]
        RATE_LIMITED.labels(scope).inc()
        retry_after_s = max(1, math.ceil(int(retry_ms) / 1000))
        if scope == "tenant":
            rps, burst, whose = t_rps, settings.rate_limit_tenant_burst, "this tenant"
        else:
            rps, burst, whose = p_rps, settings.rate_limit_principal_burst, _who(ctx.principal)
        raise RateLimited(
            f"rate limit of {whose} exceeded ({rps:g} requests/s, burst {burst}); retry in {retry_after_s} s",
            scope=scope,
            retry_after_s=retry_after_s,
        )

    def _warn(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned_at < WARN_INTERVAL_S:
            self._suppressed += 1
            log.debug("rate limit check failed, request admitted: %r", exc)
            return
        log.warning(
            "rate limit check failed: Redis unreachable or slow (%r); admitting requests unchecked "
            "(%d similar errors since the last warning)",
            exc,
            self._suppressed,
        )
        self._warned_at = now
        self._suppressed = 0


def _limiter(request: Request) -> RateLimiter:
    """The app's limiter, made on first use for the runtime's Redis client (the script is registered once)."""
    state = request.app.state
    redis: Redis = state.runtime.redis
    limiter: RateLimiter | None = getattr(state, "rate_limiter", None)
    if limiter is None or limiter.redis is not redis:
        settings: Settings = state.settings
        limiter = RateLimiter(redis, settings.queue_prefix)
        state.rate_limiter = limiter
    return limiter


async def check_rate(request: Request, ctx: Ctx) -> None:
    """Admit the authenticated request or raise :class:`RateLimited` (429 with ``Retry-After``)."""
    await _limiter(request).check(ctx, request.app.state.settings)
