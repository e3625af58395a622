"""The runs list, in-process against the real database: its columns and badges, each filter (and a 422
page for a bad one), bulk actions answering per run, and (over real HTTP) the tenant's live stream."""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from app.runs.service import BULK_MAX
from tests.dashboard.test_stream import events, signed_in
from tests.support.db import connect
from tests.support.runs import create_workflow, name, start_run
from tests.support.signin import SignIn
from tests.support.tenants import MakeTenant, TenantKey

WAIT = [{"id": "w", "wait": {"signal": "go"}}]
GATE = [{"id": "ok", "approval": {"reason": "ship it?"}}]


def rows(page: str) -> dict[str, str]:
    """The list's rows by run id (the whole row's HTML)."""
    return dict(re.findall(r'<tr data-run="([0-9a-f-]{36})">(.*?)</tr>', page, re.S))


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found, page
    return found.group(1)


def outcomes(page: str) -> dict[str, str]:
    """A bulk answer's rows: run id -> outcome, and the result text."""
    found = re.findall(r'<tr data-run="([0-9a-f-]{36})" data-outcome="(\w+)">.*?</td>\s*<td>(.*?)</td>', page, re.S)
    return {run_id: f"{outcome}: {' '.join(re.sub(r'<[^>]+>', '', text).split())}"
            for run_id, outcome, text in found}


async def runs_of(client: httpx.AsyncClient, tenant: TenantKey, steps: list[dict[str, Any]], n: int) -> list[str]:
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, steps)
    return [(await start_run(client, tenant.headers, workflow))["id"] for _ in range(n)]


async def test_each_row_shows_usage_against_limits_and_pending_approvals(
    client: httpx.AsyncClient, tenant: TenantKey, sign_in: SignIn, settings: Settings
) -> None:
    (waiting,) = await runs_of(client, tenant, WAIT, 1)
    (gated,) = await runs_of(client, tenant, GATE, 1)
    limited = await client.put(f"/api/v1/runs/{waiting}/limits", json={"max_tokens": 5000, "max_cost_usd": "2"},
                               headers=tenant.headers)
    assert limited.status_code == 200, limited.text
    owner = await connect(settings.database_url or "")
    try:  # what an agent's model turns would have spent
        await owner.execute("UPDATE run_usage SET tokens = 1234, cost_usd = 0.5 WHERE run_id = $1", uuid.UUID(waiting))
    finally:
        await owner.close()
    browser = await sign_in(tenant)

    page = await browser.get("/runs")
    assert page.status_code == 200, page.text
    listed = rows(page.text)
    row = " ".join(re.sub(r"<[^>]+>", " ", listed[waiting]).split())
    assert "waiting" in row and "1234 of 5000" in row and "$0.5 of $2" in row, row
    assert 'max="5000.0" value="1234.0"' in listed[waiting]
    assert "pending" not in row
    assert "1 pending" in listed[gated]
    assert 'form="bulk"' not in page.text and 'id="bulk"' not in page.text  # a viewer gets no bulk controls

    api = (await client.get("/api/v1/runs", params={"awaiting_approval": "true"}, headers=tenant.headers)).json()
    assert [(r["id"], r["pending_approvals"]) for r in api["items"]] == [(gated, 1)]
    mine = (await client.get("/api/v1/runs", params={"limit": 5}, headers=tenant.headers)).json()["items"]
    usage = next(r["usage"] for r in mine if r["id"] == waiting)
    assert {**usage, "limits": None} == {"tokens": 1234, "cost_usd": "0.5", "agent_steps": 0, "limits": None}
    assert usage["limits"]["max_tokens"] == 5000 and float(usage["limits"]["max_cost_usd"]) == 2


async def test_each_filter_narrows_the_list_and_the_next_page_keeps_them(
    client: httpx.AsyncClient, tenant: TenantKey, sign_in: SignIn, settings: Settings
) -> None:
    waiting = await runs_of(client, tenant, WAIT, 3)
    (gated,) = await runs_of(client, tenant, GATE, 1)
    owner = await connect(settings.database_url or "")
    try:  # as the engine leaves a run its budget stopped
        await owner.execute("UPDATE run SET status = 'paused', status_reason = 'budget_exhausted' WHERE id = $1",
                            uuid.UUID(waiting[0]))
    finally:
        await owner.close()
    cancelled = await client.post(f"/api/v1/runs/{waiting[1]}/cancel", headers=tenant.headers)
    assert cancelled.status_code == 200, cancelled.text
    browser = await sign_in(tenant)

    async def shown(**params: str) -> list[str]:
        page = await browser.get("/runs", params=params)
        assert page.status_code == 200, page.text
        return list(rows(page.text))

    assert await shown(reason="budget_exhausted") == [waiting[0]]
    assert await shown(reason="run_timeout") == []
    assert await shown(status="cancelled") == [waiting[1]]
    assert await shown(approval="pending") == [gated]
    workflow = (await client.get(f"/api/v1/runs/{gated}", headers=tenant.headers)).json()["workflow"]
    assert await shown(workflow=workflow) == [gated]
    today = datetime.now(UTC).date()
    assert await shown(until=(today - timedelta(days=1)).isoformat()) == []
    assert set(await shown(since=today.isoformat())) == {*waiting, gated}
    # The first page follows the tenant's runs with its filters; a later page keeps them and does not.
    first = (await browser.get("/runs", params={"status": "waiting", "limit": "1"})).text
    assert 'hx-get="/runs?status=waiting&amp;limit=1"' in first and 'data-stream="/runs/stream"' in first
    older = re.search(r'<a rel="next" href="([^"]+)"', first)
    assert older and "status=waiting" in older.group(1)
    second = (await browser.get(older.group(1).replace("&amp;", "&"))).text
    assert list(rows(second)) == [waiting[2]] and "data-stream" not in second
    # What the live refresh asks for: the rows alone.
    part = await browser.get("/runs", params={"status": "waiting"}, headers={"HX-Request": "true",
                                                                                "HX-Target": "runs-live"})
    assert part.text.count('id="runs-live"') == 1
    assert "<html" not in part.text and waiting[2] in part.text

    api = (await client.get("/api/v1/runs", params={"reason": "budget_exhausted"}, headers=tenant.headers)).json()
    assert [r["id"] for r in api["items"]] == [waiting[0]]


@pytest.mark.parametrize("params", [
    {"status": "nonsense"}, {"reason": "<script>"}, {"reason": "x" * 65}, {"approval": "yes"},
    {"since": "yesterday"}, {"since": "2026-02-02", "until": "2026-02-01"}, {"workflow": "w" * 129},
    {"limit": "0"}, {"cursor": "junk"},
])
async def test_a_bad_filter_is_a_422_page(make_tenant: MakeTenant, sign_in: SignIn, params: dict[str, str]) -> None:
    browser = await sign_in(await make_tenant())
    page = await browser.get("/runs", params=params)
    assert page.status_code == 422 and page.headers["content-type"].startswith("text/html"), page.text
    assert "<script>" not in page.text.split("<main", 1)[1]


async def test_a_bulk_cancel_answers_per_run_and_never_touches_another_tenants_run(
    client: httpx.AsyncClient, make_tenant: MakeTenant, sign_in: SignIn
) -> None:
    tenant, other = await make_tenant(), await make_tenant()
    first, second, done_already = await runs_of(client, tenant, WAIT, 3)
    (theirs,) = await runs_of(client, other, WAIT, 1)
    assert (await client.post(f"/api/v1/runs/{done_already}/cancel", headers=tenant.headers)).status_code == 200
    nobody = str(uuid.uuid4())
    browser = await sign_in(tenant, ("operator",))
    token = csrf_of((await browser.get("/runs")).text)

    answer = await browser.post("/runs/bulk", data={
        "csrf_token": token, "action": "cancel", "run": [first, done_already, theirs, nobody, second]})
    assert answer.status_code == 200, answer.text
    assert outcomes(answer.text) == {
        first: "done: done: now cancelled", done_already: "not_allowed: not allowed: the run is cancelled",
        theirs: "not_found: not found", nobody: "not_found: not found", second: "done: done: now cancelled"}
    assert "Cancel: 2 of 5 done" in answer.text
    assert f'href="/runs/{theirs}"' not in answer.text
    status = {run_id: (await client.get(f"/api/v1/runs/{run_id}", headers=headers)).json()["status"]
              for run_id, headers in ((first, tenant.headers), (second, tenant.headers), (theirs, other.headers))}
    assert status == {first: "cancelled", second: "cancelled", theirs: "waiting"}
    # Audited like the single-run action: one run.cancel per run done, by the signed-in person.
    audit = await client.get("/api/v1/audit/events", params={"action": "run.cancel"}, headers=tenant.headers)
    assert audit.status_code == 200, audit.text
    actors = {e["target"]: e["actor"] for e in audit.json()["items"]}
    assert set(actors) == {f"run:{first}", f"run:{second}", f"run:{done_already}"}  # once each, the API's too
    assert actors[f"run:{first}"] == actors[f"run:{second}"] != actors[f"run:{done_already}"]

    # htmx asks for the fragment; an action that fits no run is a row each, not a failure of all.
    part = await browser.post("/runs/bulk", data={"csrf_token": token, "action": "resume", "run": [first]},
                              headers={"HX-Request": "true"})
    assert part.status_code == 200 and "<html" not in part.text
    assert outcomes(part.text) == {first: "not_allowed: not allowed: the run is cancelled"}


async def test_bulk_over_the_filters_is_capped_and_bad_requests_are_422_pages(
    client: httpx.AsyncClient, tenant: TenantKey, sign_in: SignIn, settings: Settings
) -> None:
    runs = await runs_of(client, tenant, WAIT, 2)
    workflow = (await client.get(f"/api/v1/runs/{runs[0]}", headers=tenant.headers)).json()["workflow"]
    browser = await sign_in(tenant, ("operator",))
    token = csrf_of((await browser.get("/runs")).text)

    matching = await browser.post("/runs/bulk", data={
        "csrf_token": token, "action": "pause", "scope": "matching", "workflow": workflow, "status": "waiting"})
    assert matching.status_code == 200, matching.text
    assert outcomes(matching.text) == {run_id: "done: done: now paused" for run_id in runs}

    nothing = await browser.post("/runs/bulk", data={
        "csrf_token": token, "action": "pause", "scope": "matching", "workflow": workflow, "status": "running"})
    assert nothing.status_code == 200 and "No run matches these filters" in nothing.text, nothing.text

    for data, pointer in (
        ({"action": "pause"}, "/form/run"),
        ({"action": "explode", "run": runs[0]}, "/form/action"),
        ({"action": "pause", "run": "nope"}, "/form/run"),
        ({"action": "pause", "run": [str(uuid.uuid4()) for _ in range(BULK_MAX + 1)]}, "/form/run"),
        ({"action": "pause", "run": [str(uuid.uuid4()) for _ in range(3 * BULK_MAX)]}, "/form"),
        ({"action": "pause", "scope": "matching", "status": "bogus"}, "/query/status"),
        ({"action": "pause", "scope": "matching", "since": "soon"}, "/form/since"),
    ):
        refused = await browser.post("/runs/bulk", data={"csrf_token": token, **data})
        assert refused.status_code == 422 and pointer in refused.text, (data, refused.status_code, refused.text[:500])
    # More than BULK_MAX matching: refused as a whole, saying so, and nothing is touched.
    owner = await connect(settings.database_url or "")
    try:
        await owner.execute(
            "INSERT INTO run (id, tenant_id, workflow_id, workflow_version_id, workflow_name, workflow_version, "
            "status, priority, input, version) SELECT gen_random_uuid(), tenant_id, workflow_id, workflow_version_id, "
            "workflow_name, workflow_version, 'waiting', priority, input, 1 FROM run, generate_series(1, $2) "
            "WHERE id = $1", uuid.UUID(runs[0]), BULK_MAX)
    finally:
        await owner.close()
    too_many = await browser.post("/runs/bulk", data={
        "csrf_token": token, "action": "cancel", "scope": "matching", "workflow": workflow})
    assert too_many.status_code == 422 and f"more than {BULK_MAX} runs match" in too_many.text, too_many.text
    cancelled = await client.get("/api/v1/runs", params={"workflow": workflow, "status": "cancelled"},
                                 headers=tenant.headers)
    assert cancelled.json()["items"] == []

    viewer = await sign_in(tenant)
    forbidden = await viewer.post("/runs/bulk", data={"csrf_token": csrf_of((await viewer.get("/runs")).text),
                                                      "action": "cancel", "run": runs[0]})
    assert forbidden.status_code == 403 and "runs:operate" in forbidden.text
    no_csrf = await browser.post("/runs/bulk", data={"action": "cancel", "run": runs[0]})
    assert no_csrf.status_code == 403
    assert (await client.get(f"/api/v1/runs/{runs[0]}", headers=tenant.headers)).json()["status"] == "paused"


async def test_the_tenant_stream_tells_its_tenants_changes_only(
    base_url: str, client: httpx.AsyncClient, make_tenant: MakeTenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    tenant, other = await make_tenant(), await make_tenant()
    workflow = name()
    for who in (tenant, other):
        await create_workflow(client, who.headers, workflow, WAIT)
    mine, theirs = await signed_in(base_url, sessionmaker, tenant), await signed_in(base_url, sessionmaker, other)
    try:
        async with mine.stream("GET", "/runs/stream") as my_stream, \
                theirs.stream("GET", "/runs/stream") as their_stream:
            assert my_stream.status_code == their_stream.status_code == 200
            assert my_stream.headers["content-type"].startswith("text/event-stream")
            told: asyncio.Queue[str] = asyncio.Queue()

            async def collect() -> None:
                async for event in events(my_stream.aiter_lines()):
                    await told.put(event)

            reader = asyncio.create_task(collect())
            try:
                await start_run(client, other.headers, workflow)
                # The other tenant's stream hears its run: the one listener has handled that notification...
                assert await asyncio.wait_for(anext(events(their_stream.aiter_lines())), timeout=20) == "changed"
                # ...and told this tenant's stream nothing (it would have been set in the same callback).
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(told.get(), timeout=1.0)
                run = await start_run(client, tenant.headers, workflow)
                assert await asyncio.wait_for(told.get(), timeout=20) == "changed"
                signalled = await client.post(f"/api/v1/runs/{run['id']}/signals/go", json={}, headers=tenant.headers)
                assert signalled.status_code == 200, signalled.text
                assert await asyncio.wait_for(told.get(), timeout=20) == "changed"
            finally:
                reader.cancel()
        # A reconnect with Last-Event-ID is told at once.
        async with mine.stream("GET", "/runs/stream", headers={"Last-Event-ID": "3"}) as again:
            assert await asyncio.wait_for(anext(events(again.aiter_lines())), timeout=20) == "changed"
    finally:
        await mine.aclose()
        await theirs.aclose()
