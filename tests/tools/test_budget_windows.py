"""Tenant budget windows off the hot path: a tenant without caps reserves and settles without touching its
hour and day windows; its spend still shows wherever windows are read, and the reconciler folds it in.
Caps set while such holds are in flight count them, and wait for a reservation that read no caps."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.budgets import service as budgets
from app.budgets.service import CAPS_LOCK_CLASS, Exhausted, Hold
from app.context import Ctx
from app.metrics import database_families
from app.pg import Conn
from tests.support.clock import clear_of_the_hour_boundary
from tests.support.db import connect
from tests.support.runs import create_workflow, name, start_run
from tests.support.tenants import TenantKey

pytestmark = pytest.mark.xdist_group("engine")

# No worker runs in these tests: the runs stay queued, and the budget calls are made here, as a worker makes them.
STEPS = [{"id": "a", "tool": "echo", "args": {}}]


async def queued_run(client: httpx.AsyncClient, tenant: TenantKey, **limits: Any) -> uuid.UUID:
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, STEPS)
    run = await start_run(client, tenant.headers, workflow, **({"limits": limits} if limits else {}))
    return uuid.UUID(run["id"])


async def hold(conn: Conn, tenant: TenantKey, run_id: uuid.UUID, usd: str) -> Hold | Exhausted:
    return await budgets.reserve(conn, tenant.tenant_id, run_id, "a", "tool", amount_usd=Decimal(usd),
                                 count_call=False)


async def held(conn: Conn, tenant: TenantKey, run_id: uuid.UUID, usd: str) -> Hold:
    result = await hold(conn, tenant, run_id, usd)
    assert isinstance(result, Hold) and result.id is not None, result
    return result


async def api_usage(client: httpx.AsyncClient, tenant: TenantKey) -> dict[str, Any]:
    r = await client.get("/api/v1/budgets/usage", headers=tenant.headers)
    assert r.status_code == 200, r.text
    return {period: (Decimal(r.json()[period]["spent_usd"]), Decimal(r.json()[period]["reserved_usd"]))
            for period in ("hour", "day")}


async def metric_spend(conn: Conn, tenant: TenantKey) -> dict[str, float]:
    families = await database_families(conn, tenant_label=True)
    spend = next(f for f in families if f.name == "steward_budget_spend_usd")
    return {s.labels["window"]: s.value for s in spend.samples if s.labels["tenant"] == str(tenant.tenant_id)}


async def windows_of(conn: Conn, tenant: TenantKey) -> dict[str, tuple[Decimal, Decimal]]:
    rows = await conn.fetch("SELECT period, spent_usd, reserved_usd FROM budget_window WHERE tenant_id = $1",
                            tenant.tenant_id)
    return {r["period"]: (r["spent_usd"], r["reserved_usd"]) for r in rows}


async def test_spend_of_a_tenant_without_caps_stays_off_its_windows_and_still_shows_everywhere(
    client: httpx.AsyncClient, tenant: TenantKey, owner: Conn, sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    await clear_of_the_hour_boundary(margin_s=60)
    run_id = await queued_run(client, tenant)
    h = await held(owner, tenant, run_id, "1.5")
    # A hold is never folded: nothing touched the windows, and the usage read counts it.
    assert await windows_of(owner, tenant) == {}
    assert await owner.fetchval("SELECT windowed FROM budget_reservation WHERE id = $1", h.id) is False
    assert await api_usage(client, tenant) == {"hour": (0, Decimal("1.5")), "day": (0, Decimal("1.5"))}
    await budgets.settle(owner, h, Decimal("1.25"))
    # Folded meanwhile or not (reconcilers of other test processes fold every tenant), the figures are one.
    expected = {"hour": (Decimal("1.25"), 0), "day": (Decimal("1.25"), 0)}
    assert await api_usage(client, tenant) == expected
    assert await metric_spend(owner, tenant) == {"hour": 1.25, "day": 1.25}
    ctx = Ctx(tenant_id=tenant.tenant_id, principal="test", roles=frozenset({"viewer"}))
    async with sessionmaker() as db:
        view = await budgets.overview(db, ctx, limit=10, cursor=None)
    assert view.hours[-1].spent_usd == Decimal("1.25") and view.hours[-1].cumulative_usd == Decimal("1.25")
    await budgets.fold_unwindowed(owner)
    assert await owner.fetchval("SELECT count(*) FROM budget_reservation WHERE tenant_id = $1 AND NOT windowed",
                                tenant.tenant_id) == 0
    assert await windows_of(owner, tenant) == {"hour": (Decimal("1.25"), 0), "day": (Decimal("1.25"), 0)}
    assert await api_usage(client, tenant) == expected
    assert await metric_spend(owner, tenant) == {"hour": 1.25, "day": 1.25}


async def test_caps_set_while_holds_without_caps_are_in_flight_count_them(
    client: httpx.AsyncClient, tenant: TenantKey, owner: Conn,
) -> None:
    await clear_of_the_hour_boundary(margin_s=60)
    first, second = await queued_run(client, tenant), await queued_run(client, tenant)
    early = await held(owner, tenant, first, "3")
    r = await client.put("/api/v1/budgets", json={"hourly_usd": "5"}, headers=tenant.headers)
    assert r.status_code == 200, r.text
    refused = await hold(owner, tenant, second, "3")
    assert isinstance(refused, Exhausted) and refused.limit == "hourly_usd", refused
    capped = await held(owner, tenant, second, "2")
    assert await owner.fetchval("SELECT windowed FROM budget_reservation WHERE id = $1", capped.id) is True
    # Settled but not folded yet, then folded: counted either way.
    await budgets.settle(owner, early, Decimal("3"))
    assert isinstance(await hold(owner, tenant, second, "0.5"), Exhausted)
    await budgets.fold_unwindowed(owner)
    assert isinstance(await hold(owner, tenant, second, "0.5"), Exhausted)
    await budgets.settle(owner, capped, Decimal("1"))
    await held(owner, tenant, second, "1")
    assert isinstance(await hold(owner, tenant, second, "0.01"), Exhausted)
    assert await api_usage(client, tenant) == {"hour": (4, 1), "day": (4, 1)}


async def test_setting_caps_waits_for_a_reservation_that_found_none(
    client: httpx.AsyncClient, tenant: TenantKey, owner: Conn, database_url: str,
) -> None:
    await clear_of_the_hour_boundary(margin_s=60)
    first, second = await queued_run(client, tenant), await queued_run(client, tenant)
    other = await connect(database_url)
    try:
        tx = other.transaction()
        await tx.start()
        await held(other, tenant, first, "3")  # read no caps; not committed yet
        put = asyncio.create_task(client.put("/api/v1/budgets", json={"hourly_usd": "5"}, headers=tenant.headers))
        # The update waits on the lock the reservation holds (a safety bound only: it comes at once).
        deadline = asyncio.get_running_loop().time() + 60
        while not await owner.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = $1::bigint::oid AND NOT granted",
            CAPS_LOCK_CLASS,
        ):
            assert not put.done(), f"caps were set without waiting: {(await put).text}"
            assert asyncio.get_running_loop().time() < deadline, "the caps update never waited on the lock"
            await asyncio.sleep(0.01)
        await tx.commit()
        assert (await put).status_code == 200
    finally:
        await other.close()
    refused = await hold(owner, tenant, second, "3")
    assert isinstance(refused, Exhausted) and refused.limit == "hourly_usd", refused


async def test_counting_chosen_calls_concurrently_never_passes_max_steps(
    client: httpx.AsyncClient, tenant: TenantKey, database_url: str, owner: Conn,
) -> None:
    run_id = await queued_run(client, tenant, max_steps=10)
    conns = [await connect(database_url) for _ in range(4)]
    try:
        async def turn(conn: Conn) -> int:
            async with conn.transaction():
                return await budgets.count_chosen_calls(conn, run_id, 3)

        counted = await asyncio.gather(*(turn(conn) for conn in conns))
    finally:
        for conn in conns:
            await conn.close()
    assert sum(counted) == 10 and sorted(counted)[0] == 1, counted
    assert await owner.fetchval("SELECT tool_calls FROM run_usage WHERE run_id = $1", run_id) == 10
    assert await budgets.count_chosen_calls(owner, run_id, 2) == 0
    # What was not counted with its turn is counted (and refused) when the call is made.
    refused = await budgets.reserve(owner, tenant.tenant_id, run_id, "a", "tool", amount_usd=Decimal(0))
    assert isinstance(refused, Exhausted) and refused.limit == "max_steps", refused
