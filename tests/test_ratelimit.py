"""Rate limits per principal and per tenant (app/ratelimit.py): real Redis, apps with small limits."""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, cast

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app import ratelimit
from app.auth.keys import hash_api_key
from app.config import Settings
from app.context import Ctx
from app.main import create_app
from app.ratelimit import RateLimited, RateLimiter
from app.tenants.models import ApiKey
from tests.support.tenants import MakeApiKey, MakeTenant, TenantKey

PROBLEM = "application/problem+json"
URL = "/api/v1/workflows"
# Refills so slowly that no token comes back while a test runs: counts are exact.
SLOW = 0.01
OFF = {
    "rate_limit_principal_rps": 0.0,
    "rate_limit_principal_burst": 1,
    "rate_limit_tenant_rps": 0.0,
    "rate_limit_tenant_burst": 1,
}


@asynccontextmanager
async def limited(settings: Settings, **limits: Any) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """An app (lifespan running) with the given limits, both off unless set, and its own key prefix."""
    s = settings.model_copy(update={**OFF, "queue_prefix": f"rltest-{secrets.token_hex(4)}", **limits})
    application = create_app(s)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield application, client


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def statuses(client: httpx.AsyncClient, key: str, n: int) -> list[int]:
    return [(await client.get(URL, headers=auth(key))).status_code for _ in range(n)]


def counted(scope: str) -> float:
    return REGISTRY.get_sample_value("steward_rate_limited_total", {"scope": scope}) or 0.0


def errors_counted() -> float:
    return REGISTRY.get_sample_value("steward_rate_limit_errors_total") or 0.0


async def key_id(sessionmaker: async_sessionmaker[AsyncSession], key: str) -> uuid.UUID:
    async with sessionmaker() as session:
        found: uuid.UUID = (
            await session.execute(select(ApiKey.id).where(ApiKey.key_hash == hash_api_key(key)))
        ).scalar_one()
    return found


def redis_of(application: FastAPI) -> Redis:
    redis: Redis = application.state.runtime.redis
    return redis


async def tokens_in(redis: Redis, key: str) -> float:
    """The tokens a bucket held after its last write (redis-py types hget as maybe-sync)."""
    value = await cast(Awaitable[bytes | None], redis.hget(key, "tokens"))
    assert value is not None, f"no bucket at {key}"
    return float(value)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- one bucket -----------------------------------------------------------------------------------


async def test_burst_is_admitted_then_429_with_retry_after(
    settings: Settings, tenant: TenantKey, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    before = counted("principal")
    async with limited(settings, rate_limit_principal_rps=SLOW, rate_limit_principal_burst=3) as (application, client):
        assert await statuses(client, tenant.key, 3) == [200, 200, 200]
        response = await client.get(URL, headers=tenant.headers)

        assert response.status_code == 429, response.text
        assert response.headers["content-type"] == PROBLEM
        # One token comes back every 100 s; a few ms of it have passed.
        assert response.headers["retry-after"] in {"99", "100"}
        body = response.json()
        assert body["type"].endswith("/rate-limited")
        assert body["status"] == 429 and body["title"] == "Too many requests"
        assert body["limit"] == "principal" and body["retry_after_s"] == int(response.headers["retry-after"])
        assert "API key" in body["detail"] and "tenant" not in body["detail"]
        assert counted("principal") == before + 1

        # The bucket lives under the documented key and expires once it would be full again (300 s + 1 s).
        prefix = application.state.settings.queue_prefix
        principal_key = f"{prefix}:rl:p:key:{await key_id(sessionmaker, tenant.key)}"
        redis = redis_of(application)
        assert 0 < await redis.pttl(principal_key) <= 301_000
        assert await tokens_in(redis, principal_key) < 0.01
        # The tenant limit is off: no tenant bucket was written.
        assert not await redis.exists(f"{prefix}:rl:t:{tenant.tenant_id}")


async def test_bucket_refills_with_time(settings: Settings, tenant: TenantKey) -> None:
    # A token every 2 s: slow enough that a loaded test machine does not refill the bucket mid-burst.
    async with limited(settings, rate_limit_principal_rps=0.5, rate_limit_principal_burst=2) as (_, client):
        assert await statuses(client, tenant.key, 2) == [200, 200]
        refused = await client.get(URL, headers=tenant.headers)
        assert refused.status_code == 429
        retry_after = int(refused.headers["retry-after"])
        assert retry_after in {1, 2}  # 2 s less the time the requests took, rounded up

        # Retry-After is honest: once it has passed there is a token again, and only one.
        await asyncio.sleep(retry_after)
        assert await statuses(client, tenant.key, 2) == [200, 429]


# --- principal and tenant ---------------------------------------------------------------------------


async def test_principal_limit_is_per_key(settings: Settings, tenant: TenantKey, make_api_key: MakeApiKey) -> None:
    second = await make_api_key(tenant.tenant_id)
    async with limited(settings, rate_limit_principal_rps=SLOW, rate_limit_principal_burst=2) as (_, client):
        assert await statuses(client, tenant.key, 3) == [200, 200, 429]
        assert await statuses(client, second, 3) == [200, 200, 429]


async def test_tenant_limit_is_shared_by_its_keys_and_not_by_other_tenants(
    settings: Settings, tenant: TenantKey, make_api_key: MakeApiKey, make_tenant: MakeTenant
) -> None:
    second = await make_api_key(tenant.tenant_id)
    other = await make_tenant()
    before = counted("tenant")
    async with limited(settings, rate_limit_tenant_rps=SLOW, rate_limit_tenant_burst=3) as (_, client):
        assert await statuses(client, tenant.key, 2) == [200, 200]
        assert await statuses(client, second, 1) == [200]

        response = await client.get(URL, headers=auth(second))
        assert response.status_code == 429
        assert response.json()["limit"] == "tenant"
        assert "tenant" in response.json()["detail"]
        assert await statuses(client, tenant.key, 1) == [429]
        assert counted("tenant") == before + 2

        assert await statuses(client, other.key, 3) == [200, 200, 200]


async def test_a_refused_request_takes_no_token_from_the_other_bucket(
    settings: Settings,
    tenant: TenantKey,
    make_api_key: MakeApiKey,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    second = await make_api_key(tenant.tenant_id)
    limits = {
        "rate_limit_principal_rps": SLOW,
        "rate_limit_principal_burst": 2,
        "rate_limit_tenant_rps": SLOW,
        "rate_limit_tenant_burst": 3,
    }
    async with limited(settings, **limits) as (application, client):
        # The first key's principal bucket refuses its third request: the tenant keeps that token ...
        assert await statuses(client, tenant.key, 3) == [200, 200, 429]
        # ... so the second key gets it; then the tenant bucket refuses, and the key keeps its token.
        response = await client.get(URL, headers=auth(second))
        assert response.status_code == 200
        response = await client.get(URL, headers=auth(second))
        assert response.status_code == 429 and response.json()["limit"] == "tenant"

        prefix = application.state.settings.queue_prefix
        second_key = f"{prefix}:rl:p:key:{await key_id(sessionmaker, second)}"
        assert 1 <= await tokens_in(redis_of(application), second_key) < 1.01


async def test_refused_by_both_reports_the_longer_wait(settings: Settings, tenant: TenantKey) -> None:
    limits = {
        "rate_limit_principal_rps": 1.0,
        "rate_limit_principal_burst": 1,
        "rate_limit_tenant_rps": SLOW,
        "rate_limit_tenant_burst": 1,
    }
    async with limited(settings, **limits) as (_, client):
        assert await statuses(client, tenant.key, 1) == [200]
        response = await client.get(URL, headers=tenant.headers)
        assert response.status_code == 429
        assert response.json()["limit"] == "tenant"
        assert response.headers["retry-after"] in {"99", "100"}


# --- switched off ---------------------------------------------------------------------------------


async def test_rps_zero_turns_both_limits_off(settings: Settings, tenant: TenantKey) -> None:
    async with limited(settings) as (application, client):
        assert set(await statuses(client, tenant.key, 20)) == {200}
        prefix = application.state.settings.queue_prefix
        assert [key async for key in redis_of(application).scan_iter(f"{prefix}:rl:*")] == []


async def test_rps_zero_turns_only_that_limit_off(
    settings: Settings, tenant: TenantKey, make_api_key: MakeApiKey
) -> None:
    second = await make_api_key(tenant.tenant_id)
    limits = {"rate_limit_principal_burst": 1, "rate_limit_tenant_rps": SLOW, "rate_limit_tenant_burst": 4}
    async with limited(settings, **limits) as (application, client):
        # A principal burst of 1 would refuse the second request, were the principal limit on.
        assert await statuses(client, tenant.key, 3) == [200, 200, 200]
        assert await statuses(client, second, 2) == [200, 429]
        prefix = application.state.settings.queue_prefix
        assert [key async for key in redis_of(application).scan_iter(f"{prefix}:rl:p:*")] == []


# --- atomicity --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limits", "admitted"),
    [
        ({"rate_limit_principal_rps": SLOW, "rate_limit_principal_burst": 10}, 10),
        ({"rate_limit_tenant_rps": SLOW, "rate_limit_tenant_burst": 10}, 10),
        (
            {
                "rate_limit_principal_rps": SLOW,
                "rate_limit_principal_burst": 10,
                "rate_limit_tenant_rps": SLOW,
                "rate_limit_tenant_burst": 7,
            },
            7,
        ),
    ],
)
async def test_concurrent_requests_never_exceed_the_burst(
    settings: Settings, tenant: TenantKey, limits: dict[str, Any], admitted: int
) -> None:
    before = errors_counted()
    async with limited(settings, **limits) as (_, client):
        responses = await asyncio.gather(*(client.get(URL, headers=tenant.headers) for _ in range(50)))
    assert errors_counted() == before, "a check failed open (Redis too slow?): the count below means nothing"
    codes = [response.status_code for response in responses]
    assert codes.count(200) == admitted
    assert codes.count(429) == 50 - admitted


# --- Redis unreachable: fail open -------------------------------------------------------------------


async def test_redis_unreachable_admits_requests_and_warns_once(
    settings: Settings, tenant: TenantKey, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No back-off: every request asks the dead Redis, so every one must fail open and be counted.
    monkeypatch.setattr(ratelimit, "ERROR_BACKOFF_S", 0.0)
    before = errors_counted()
    dead = {"redis_url": f"redis://127.0.0.1:{closed_port()}/13"}
    limits = {"rate_limit_principal_rps": SLOW, "rate_limit_principal_burst": 1, **dead}
    with caplog.at_level(logging.DEBUG, logger="app.ratelimit"):
        async with limited(settings, **limits) as (_, client):
            assert await statuses(client, tenant.key, 5) == [200] * 5
    assert errors_counted() == before + 5
    warnings = [r for r in caplog.records if r.name == "app.ratelimit" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "admitting requests unchecked" in warnings[0].getMessage()


async def test_after_a_redis_error_checks_back_off(settings: Settings, tenant: TenantKey) -> None:
    before = errors_counted()
    dead = {"redis_url": f"redis://127.0.0.1:{closed_port()}/13"}
    async with limited(settings, rate_limit_tenant_rps=SLOW, rate_limit_tenant_burst=1, **dead) as (app_, client):
        assert await statuses(client, tenant.key, 3) == [200] * 3
        limiter: RateLimiter = app_.state.rate_limiter
        # Only the first request tried Redis; the others were admitted during the back-off.
        assert limiter._skip_until > time.monotonic()
    assert errors_counted() == before + 3


async def test_redis_that_never_answers_is_cut_off_by_the_timeout(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ratelimit, "REDIS_TIMEOUT_S", 0.3)
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accept, read, never answer
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    redis = Redis.from_url(f"redis://127.0.0.1:{port}/13", socket_timeout=30)
    limits = {"rate_limit_principal_rps": SLOW, "rate_limit_principal_burst": 1}
    try:
        limiter = RateLimiter(redis, "rltest")
        ctx = Ctx(tenant_id=uuid.uuid4(), principal=f"user:{uuid.uuid4()}", roles=frozenset())
        started = time.monotonic()
        await limiter.check(ctx, settings.model_copy(update={**OFF, **limits}))  # admitted: no exception
        assert time.monotonic() - started < 1.5  # the client's own socket timeout is 30 s here
    finally:
        await redis.aclose()
        server.close()


# --- the limiter on its own -----------------------------------------------------------------------


async def test_user_principals_are_named_in_the_detail(settings: Settings) -> None:
    redis = Redis.from_url(settings.redis_url or "")
    prefix = f"rltest-{secrets.token_hex(4)}"
    limits = {"rate_limit_principal_rps": SLOW, "rate_limit_principal_burst": 1}
    try:
        limiter = RateLimiter(redis, prefix)
        ctx = Ctx(tenant_id=uuid.uuid4(), principal=f"user:{uuid.uuid4()}", roles=frozenset())
        s = settings.model_copy(update={**OFF, **limits})
        await limiter.check(ctx, s)
        with pytest.raises(RateLimited) as refused:
            await limiter.check(ctx, s)
        assert "this user" in refused.value.detail
        assert refused.value.scope == "principal"
        assert refused.value.headers == {"Retry-After": str(refused.value.retry_after_s)}
        assert await redis.exists(f"{prefix}:rl:p:{ctx.principal}")
    finally:
        await redis.aclose()


async def test_a_check_is_one_evalsha(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    redis = Redis.from_url(settings.redis_url or "")
    limits = {
        "rate_limit_principal_rps": 5.0,
        "rate_limit_principal_burst": 10,
        "rate_limit_tenant_rps": 5.0,
        "rate_limit_tenant_burst": 10,
    }
    s = settings.model_copy(update={**OFF, **limits})
    try:
        limiter = RateLimiter(redis, f"rltest-{secrets.token_hex(4)}")
        ctx = Ctx(tenant_id=uuid.uuid4(), principal=f"key:{uuid.uuid4()}", roles=frozenset())
        await limiter.check(ctx, s)  # the first call may load the script first (NOSCRIPT)

        sent: list[str] = []
        execute = redis.execute_command

        async def counting(*args: Any, **options: Any) -> Any:
            sent.append(str(args[0]).upper())
            return await execute(*args, **options)

        monkeypatch.setattr(redis, "execute_command", counting)
        for _ in range(3):
            await limiter.check(ctx, s)
        assert sent == ["EVALSHA"] * 3
    finally:
        await redis.aclose()
