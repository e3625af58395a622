"""A run page's event stream, over real HTTP: a change to the run reaches an open stream as ``changed``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.support.browser import local_user
from tests.support.runs import create_workflow, name, start_run
from tests.support.signin import first_form
from tests.support.tenants import MakeTenant, TenantKey


async def signed_in(
    base_url: str, sessionmaker: async_sessionmaker[AsyncSession], tenant: TenantKey
) -> httpx.AsyncClient:
    person = await local_user(sessionmaker, tenant.tenant_id, roles=("viewer",))
    http = httpx.AsyncClient(base_url=base_url, timeout=30)
    fields = first_form((await http.get("/auth/login")).text).fields
    answer = await http.post("/auth/local", data={**fields, "username": person.username, "password": person.password})
    assert answer.status_code == 303, answer.text
    return http


async def events(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The names of the stream's events, as they arrive."""
    async for line in lines:
        if line.startswith("event: "):
            yield line.removeprefix("event: ")


async def test_a_change_reaches_an_open_stream_and_another_tenants_run_is_404(
    base_url: str, client: httpx.AsyncClient, make_tenant: MakeTenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    tenant, other = await make_tenant(), await make_tenant()
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [{"id": "w", "wait": {"signal": "go"}}])
    run = await start_run(client, tenant.headers, workflow)
    http = await signed_in(base_url, sessionmaker, tenant)
    try:
        async with http.stream("GET", f"/runs/{run['id']}/stream") as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            names = events(stream.aiter_lines())
            signalled = await client.post(f"/api/v1/runs/{run['id']}/signals/go", json={}, headers=tenant.headers)
            assert signalled.status_code == 200, signalled.text
            assert await asyncio.wait_for(anext(names), timeout=20) == "changed"
        # Reconnecting with Last-Event-ID: told at once that something may have changed meanwhile.
        async with http.stream("GET", f"/runs/{run['id']}/stream", headers={"Last-Event-ID": "1"}) as again:
            assert await asyncio.wait_for(anext(events(again.aiter_lines())), timeout=20) == "changed"
    finally:
        await http.aclose()
    stranger = await signed_in(base_url, sessionmaker, other)
    try:
        refused = await stranger.get(f"/runs/{run['id']}/stream")
        assert refused.status_code == 404
    finally:
        await stranger.aclose()
