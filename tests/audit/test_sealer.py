"""The workers' sealer: a row an action commits is sealed within the documented bound."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from app.audit import sealer
from app.audit.verify import verify_chain
from app.config import Settings
from app.pg import Conn
from tests.support.tenants import TenantKey
from tests.support.workers import FAST
from workers.main import run_worker

# The test's own sealer interval; the bound asserted is the documented one for it (sealer.bound_s).
INTERVAL_S = 0.5
# How long the test waits for the condition at most (not the bound: the bound is asserted on the age).
PATIENCE_S = 120.0


@pytest.fixture(params=[True, False], ids=["notified", "interval-only"])
async def sealing_worker(
    request: pytest.FixtureRequest, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Settings]:
    """A worker (its queues and its sealer) running in this process, sealing every INTERVAL_S; woken by
    commits, or (the second param) listening on a channel nobody notifies, so only its interval seals."""
    if not request.param:
        monkeypatch.setattr(sealer, "CHANNEL", f"steward_audit_nobody_{secrets.token_hex(4)}")
    mine = settings.model_copy(update={**FAST, "audit_seal_interval_s": INTERVAL_S})
    task = asyncio.create_task(run_worker(mine, concurrency=2))
    yield mine
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def put_secret(client: httpx.AsyncClient, tenant: TenantKey) -> str:
    """An audited action through the API; the target of its audit row."""
    name = f"s_{secrets.token_hex(4)}"
    response = await client.put(f"/api/v1/secrets/{name}", json={"value": "v"}, headers=tenant.headers)
    assert response.status_code < 300, response.text
    return f"secret:{name}"


async def sealed_after(owner: Conn, tenant: TenantKey, action: Callable[[], Awaitable[str]]) -> float:
    """Run ``action``; the seconds from just before it until its audit row is seen sealed."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    target = await action()
    while True:
        seq = await owner.fetchval("SELECT seq FROM audit_event WHERE tenant_id = $1 AND target = $2",
                                   tenant.tenant_id, target)
        if seq is not None:
            return loop.time() - started
        assert loop.time() - started < PATIENCE_S, f"{target} still unsealed after {PATIENCE_S} s"
        await asyncio.sleep(0.02)


async def test_a_committed_row_is_sealed_within_the_bound(
    client: httpx.AsyncClient, owner: Conn, tenant: TenantKey, sealing_worker: Settings
) -> None:
    bound = sealer.bound_s(sealing_worker)
    assert bound == INTERVAL_S + sealer.PASS_ALLOWANCE_S
    # The worker is up once it has sealed a first row (its start is not part of the bound).
    await sealed_after(owner, tenant, lambda: put_secret(client, tenant))

    ages = [await sealed_after(owner, tenant, lambda: put_secret(client, tenant)) for _ in range(3)]

    assert max(ages) <= bound, (ages, bound)
    result = await verify_chain(owner, tenant.tenant_id)
    assert result.ok and result.rows == 4 and result.unsealed.rows == 0, result.as_dict()


LISTENERS = ("SELECT pid FROM pg_stat_activity WHERE application_name = 'steward-audit-sealer' "
             "AND datname = current_database()")


async def test_a_lost_listening_connection_is_opened_again_and_rows_stay_sealed_within_the_bound(
    client: httpx.AsyncClient, owner: Conn, tenant: TenantKey, settings: Settings
) -> None:
    mine = settings.model_copy(update={**FAST, "audit_seal_interval_s": INTERVAL_S})
    task = asyncio.create_task(run_worker(mine, concurrency=2))
    try:
        await sealed_after(owner, tenant, lambda: put_secret(client, tenant))  # up
        before = {r["pid"] for r in await owner.fetch(LISTENERS)}
        assert before
        await owner.execute(f"SELECT pg_terminate_backend(pid) FROM ({LISTENERS}) l")

        # Sealed all the same (the interval does not need the listener), and within the bound.
        age = await sealed_after(owner, tenant, lambda: put_secret(client, tenant))
        assert age <= sealer.bound_s(mine), age
        # The sealer listens again, on a connection of its own.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PATIENCE_S
        while not ({r["pid"] for r in await owner.fetch(LISTENERS)} - before):
            assert loop.time() < deadline, "the sealer did not listen again"
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    result = await verify_chain(owner, tenant.tenant_id)
    assert result.ok and result.unsealed.rows == 0, result.as_dict()
