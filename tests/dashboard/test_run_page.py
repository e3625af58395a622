"""A run's page, in-process against the real database and workers: its tabs and its forms."""

from __future__ import annotations

import html
import json
import re
import uuid
from typing import Any

import httpx

from app.config import Settings
from tests.support.runs import create_workflow, name, start_run, step, wait_for, wait_run
from tests.support.signin import SignIn
from tests.support.tenants import MakeTenant, TenantKey
from tests.support.tools import register

XSS = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
WAITS = [{"id": "w", "wait": {"signal": "go"}}]


def csrf_of(page: str) -> str:
    token = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert token, page[:500]
    return token.group(1)


def no_raw_xss(page: str) -> None:
    at = page.find(XSS)
    assert at == -1, page[max(0, at - 300):at + 50]


async def audit_actions(client: httpx.AsyncClient, tenant: TenantKey, run_id: str) -> list[str]:
    events = (await client.get("/api/v1/audit/events", params={"target": f"run:{run_id}"},
                               headers=tenant.headers)).json()["items"]
    return [event["action"] for event in events]


async def test_the_graph_tab_draws_each_step_with_its_status_and_links_to_its_details(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, sign_in: SignIn
) -> None:
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [
        {"id": "fetch", "tool": "echo", "args": {"v": XSS}},
        {"id": "each", "needs": ["fetch"], "map": {"items": [1, 2, 3], "tool": "echo", "args": {"i": "${{ item }}"}}},
        {"id": "check", "needs": ["fetch"], "tool": "fail", "args": {"message": XSS}},
        {"id": "join", "needs": ["each", "check"], "tool": "echo", "args": {}},
    ])
    run = await wait_run(client, tenant.headers, (await start_run(client, tenant.headers, workflow))["id"])
    assert run["status"] == "failed", run
    browser = await sign_in(tenant)
    page = await browser.get(f"/runs/{run['id']}")  # the graph is the first tab
    assert page.status_code == 200, page.text
    # Layers top to bottom: fetch above each and check (side by side), join below them.
    y = {step_id: float(found) for step_id, found in re.findall(
        r'aria-label="[^"]*\(step (\w+),[^"]*" class="dag-node[^"]*">\s*<title>[^<]*</title>\s*'
        r'<rect x="[\d.]+" y="([\d.]+)"', page.text)}
    assert y["fetch"] < y["each"] == y["check"] < y["join"], y
    assert f'href="/runs/{run["id"]}?tab=graph" aria-current="page"' in page.text
    text = page.text
    assert 'aria-label="fetch succeeded (step fetch, tool, succeeded)"' in text
    assert 'aria-label="each succeeded · 3/3 (step each, map, succeeded, 3 of 3 items done)"' in text
    assert 'aria-label="check failed (step check, tool, failed)"' in text
    assert re.search(r'aria-label="join (cancelled|pending) \(step join, tool, (cancelled|pending)\)"', text)
    assert f'href="/runs/{run["id"]}?tab=steps#step-fetch"' in text
    assert text.count('class="dag-edge"') == 4
    assert ">succeeded · 3/3</text>" in text  # the status in words, not only a colour
    no_raw_xss(text)
    # The link's target: the step's details on the steps tab, with its attempts and their errors.
    details = (await browser.get(f"/runs/{run['id']}", params={"tab": "steps"})).text
    assert 'id="step-check"' in details and f"fail: {ESCAPED}" in details
    no_raw_xss(details)


async def test_the_timeline_shows_every_attempt_failed_ones_marked_and_waits(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, sign_in: SignIn
) -> None:
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [
        {"id": "boom", "tool": "fail", "args": {"message": "no"},
         "retry": {"max_attempts": 3, "jitter": False, "backoff_base_s": 0.01}},
        {"id": "w", "wait": {"signal": "go"}},
    ])
    run = await start_run(client, tenant.headers, workflow)
    await wait_for(client, tenant.headers, run["id"], lambda r: step(r, "boom")["status"] == "failed", 30)
    page = await (await sign_in(tenant)).get(f"/runs/{run['id']}", params={"tab": "timeline"})
    assert page.status_code == 200, page.text
    attempts = re.findall(r"<title>boom: attempt (\d), failed, from (\S+) to (\S+) \(", page.text)
    assert [n for n, _, _ in attempts] == ["1", "2", "3"]
    assert [start for _, start, _ in attempts] == sorted(start for _, start, _ in attempts)  # retries in order
    assert re.findall(r'class="gantt-label">([^<]+)</text>', page.text) == ["✕ #1", "✕ #2", "✕ #3"]
    assert re.findall(r"<title>boom: backoff before a retry", page.text)  # the wait before a retry
    # The failure ended the run, and the wait with it.
    assert re.search(r"<title>w: waited for a signal, cancelled, from \S+ to \S+ \(", page.text), page.text
    other = name()
    await create_workflow(client, tenant.headers, other, WAITS)
    waiting = await start_run(client, tenant.headers, other)
    still = (await (await sign_in(tenant)).get(f"/runs/{waiting['id']}", params={"tab": "timeline"})).text
    assert re.search(r"<title>w: waited for a signal, waiting, from \S+ until now", still), still
    assert 'class="gantt-bar gantt-wait gantt-waiting" role="img"' in still and "still going" in still
    assert "<caption>Attempts and waits of the run</caption>" in page.text  # the chart as a table too
    assert "still going" not in page.text


async def test_the_timeline_shows_an_approval_steps_wait_from_its_request(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, sign_in: SignIn
) -> None:
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [{"id": "ok", "approval": {"reason": "ship it?"}}])
    run = await start_run(client, tenant.headers, workflow)
    await wait_for(client, tenant.headers, run["id"], lambda r: step(r, "ok")["status"] == "waiting", 30)
    page = (await (await sign_in(tenant)).get(f"/runs/{run['id']}", params={"tab": "timeline"})).text
    assert re.search(r"<title>ok: waited for an approval, waiting, from \S+ until now", page), page


async def test_the_steps_tab_pages_a_maps_items_and_the_events_tab_filters_and_pages(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, sign_in: SignIn
) -> None:
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [
        {"id": "each", "map": {"items": "${{ input.items }}", "tool": "echo",
                               "args": {"i": "${{ item }}", "note": XSS}, "concurrency": 20}},
        {"id": "after", "needs": ["each"], "tool": "echo", "args": {}},
    ])
    run = await start_run(client, tenant.headers, workflow, {"items": list(range(120))})
    assert (await wait_run(client, tenant.headers, run["id"], 60))["status"] == "succeeded"
    browser = await sign_in(tenant)
    url = f"/runs/{run['id']}"

    async def items(**params: Any) -> tuple[list[int], str]:
        page = await browser.get(url, params={"tab": "steps", **params})
        assert page.status_code == 200, page.text
        shown = [int(i) for i in re.findall(r'<tr><th scope="row">(\d+)</th>', page.text)]
        return shown, page.text

    first, text = await items()
    assert first == list(range(50))  # not all 120
    assert f'href="{url}?tab=steps&amp;items=each&amp;items_after=49#step-each"' in text
    no_raw_xss(text)
    assert "&lt;script&gt;" in text  # the items' output, as JSON
    second, text = await items(items="each", items_after=49)
    assert second == list(range(50, 100)) and 'id="step-each" open' in text
    last, text = await items(items="each", items_after=99)
    assert last == list(range(100, 120)) and "Next items of each" not in text

    async def events(**params: Any) -> tuple[list[int], str]:
        page = await browser.get(url, params={"tab": "events", **params})
        assert page.status_code == 200, page.text
        return [int(i) for i in re.findall(r'<li id="event-(\d+)">', page.text)], page.text

    everything = [event["id"] for event in (await client.get(
        f"/api/v1/runs/{run['id']}/events", params={"limit": 500}, headers=tenant.headers)).json()["items"]]
    assert len(everything) > 100
    page_one, text = await events()
    assert page_one == everything[:50]
    assert f'href="{url}?tab=events&amp;after={everything[49]}"' in text
    page_two, _ = await events(after=everything[49])
    assert page_two == everything[50:100]
    # A deep link opens the page that holds the event.
    deep, _ = await events(after=everything[120] - 1)
    assert deep[0] == everything[120]
    started, text = await events(type="step_succeeded", step="after")
    assert len(started) == 1 and "step_succeeded" in text and '<option value="after" selected>' in text
    none, text = await events(type="no_such_type")
    assert none == [] and "No events match" in text


async def test_a_signal_is_sent_from_the_page_and_bad_json_is_a_422_page(
    client: httpx.AsyncClient, tenant: TenantKey, sign_in: SignIn
) -> None:
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, WAITS)
    run = await start_run(client, tenant.headers, workflow)
    url = f"/runs/{run['id']}"
    viewer = (await (await sign_in(tenant, ("viewer",))).get(url)).text
    assert 'disabled aria-describedby="why-signal"' in viewer and "needs the runs:start permission" in viewer
    browser = await sign_in(tenant, ("operator",))
    page = (await browser.get(url)).text
    assert 'id="signal-name" name="name" maxlength="128" required value="go"' in page
    assert 'aria-describedby="why-signal"' not in page
    bad = await browser.post(f"{url}/signal", data={"csrf_token": csrf_of(page), "name": "go", "payload": "{nope"})
    assert bad.status_code == 422 and "/form/payload" in bad.text, bad.text
    nan = await browser.post(f"{url}/signal", data={"csrf_token": csrf_of(page), "name": "go", "payload": "NaN"})
    assert nan.status_code == 422, nan.text
    sent = await browser.post(f"{url}/signal", data={
        "csrf_token": csrf_of(page), "name": "go", "payload": json.dumps({"note": XSS})})
    assert (sent.status_code, sent.headers["location"]) == (303, url), sent.text
    done = await wait_run(client, tenant.headers, run["id"])
    assert done["status"] == "succeeded" and step(done, "w")["output"] == {"note": XSS}
    assert "run.signal" in await audit_actions(client, tenant, run["id"])
    after = (await browser.get(url)).text
    assert "the run waits for no signal" in after
    no_raw_xss(after)


async def test_start_again_previews_the_changes_shows_schema_errors_and_starts_a_new_run(
    client: httpx.AsyncClient, tenant: TenantKey, sign_in: SignIn
) -> None:
    workflow = name()
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "note": {"type": "string"}},
              "required": ["n"]}
    await create_workflow(client, tenant.headers, workflow, WAITS, input_schema=schema)
    run = await start_run(client, tenant.headers, workflow, {"n": 1, "note": "old"})
    url = f"/runs/{run['id']}"
    viewer = await sign_in(tenant, ("viewer",))
    assert "needs the runs:start permission" in (await viewer.get(url)).text
    assert (await viewer.get(f"{url}/again")).status_code == 403
    browser = await sign_in(tenant, ("operator",))
    form = await browser.get(f"{url}/again")
    assert form.status_code == 200

    def textarea(page: str) -> str:
        found = re.search(r'<textarea id="again-input"[^>]*>(.*?)</textarea>', page, re.DOTALL)
        assert found, page
        return html.unescape(found.group(1))

    assert json.loads(textarea(form.text)) == {"n": 1, "note": "old"}
    token = csrf_of(form.text)
    edited = json.dumps({"n": 2, "note": XSS})
    preview = await browser.post(f"{url}/again/preview", data={"csrf_token": token, "input": edited})
    assert preview.status_code == 200, preview.text
    marks = [(mark, html.unescape(line).strip()) for mark, line in re.findall(
        r'<tr class="diff-(added|removed)">.*?<code>(.*?)</code>', preview.text, re.DOTALL)]
    assert marks == [("removed", '"n": 1,'), ("removed", '"note": "old"'), ("added", '"n": 2,'),
                     ("added", f'"note": "{XSS}"')]
    assert '<span class="visually-hidden">added</span>' in preview.text  # not only a colour
    no_raw_xss(preview.text)
    assert ESCAPED in preview.text  # in the diff and back in the textarea

    not_json = await browser.post(f"{url}/again", data={"csrf_token": token, "input": "{\"n\": "})
    assert not_json.status_code == 422 and "/form/input" in not_json.text
    assert textarea(not_json.text) == '{"n": '  # the form again, with what was typed
    refused = await browser.post(f"{url}/again", data={"csrf_token": token, "input": json.dumps({"n": "x"})})
    assert refused.status_code == 422 and "/input/n" in refused.text, refused.text
    assert textarea(refused.text) == json.dumps({"n": "x"})

    started = await browser.post(f"{url}/again", data={"csrf_token": token, "input": edited})
    assert started.status_code == 303, started.text
    new_id = started.headers["location"].removeprefix("/runs/")
    assert new_id != run["id"]
    new = (await client.get(f"/api/v1/runs/{new_id}", headers=tenant.headers)).json()
    assert (new["workflow"], new["workflow_version"], new["input"]) == (workflow, 1, {"n": 2, "note": XSS})
    assert "run.start" in await audit_actions(client, tenant, new_id)


async def test_raising_limits_resumes_a_run_paused_on_its_budget(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, sign_in: SignIn
) -> None:
    await register(client, tenant.headers, name="paid", cost_usd="1.00", executor={"kind": "builtin", "name": "echo"})
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [
        {"id": "a", "tool": "paid", "args": {}}, {"id": "b", "needs": ["a"], "tool": "paid", "args": {}},
        {"id": "c", "needs": ["b"], "tool": "paid", "args": {}}], limits={"max_cost_usd": 2})
    run = await start_run(client, tenant.headers, workflow)
    await wait_for(client, tenant.headers, run["id"], lambda r: r["status"] == "paused", 30)
    url = f"/runs/{run['id']}"
    operator = (await (await sign_in(tenant, ("operator",))).get(url, params={"tab": "budget"})).text
    assert 'disabled aria-describedby="why-limits"' in operator and "needs the budgets:write permission" in operator
    admin = await sign_in(tenant, ("admin",))
    page = await admin.get(url, params={"tab": "budget"})
    assert 'aria-describedby="why-limits"' not in page.text
    limit = re.search(r'id="limit-max_cost_usd" name="max_cost_usd" [^>]*value="([^"]*)"', page.text)
    assert limit and float(limit.group(1)) == 2, page.text
    token = csrf_of(page.text)
    bad = await admin.post(f"{url}/limits", data={"csrf_token": token, "max_cost_usd": "lots"})
    assert bad.status_code == 422 and "/form/max_cost_usd" in bad.text, bad.text
    raised = await admin.post(f"{url}/limits", data={"csrf_token": token, "max_cost_usd": "5"})
    assert (raised.status_code, raised.headers["location"]) == (303, f"{url}?tab=budget"), raised.text
    done = await wait_run(client, tenant.headers, run["id"])
    assert done["status"] == "succeeded", done
    assert {"run.limits", "run.resume"} <= set(await audit_actions(client, tenant, run["id"]))
    # A finished run's limits are no longer raised here: said, and refused if posted anyway.
    ended = (await admin.get(url, params={"tab": "budget"})).text
    assert "the run is succeeded, not paused" in ended
    refused = await admin.post(f"{url}/limits", data={"csrf_token": token, "max_cost_usd": "9"})
    assert refused.status_code == 409, refused.text
    usage = (await client.get("/api/v1/budgets/usage", params={"run": run["id"]}, headers=tenant.headers)).json()
    assert usage["run"]["limits"]["max_cost_usd"] == 5  # the refused change was not kept


async def test_an_operators_pause_is_resumed_not_raised(
    client: httpx.AsyncClient, tenant: TenantKey, sign_in: SignIn
) -> None:
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, WAITS)
    run = await start_run(client, tenant.headers, workflow)
    assert (await client.post(f"/api/v1/runs/{run['id']}/pause", headers=tenant.headers)).status_code == 200
    page = (await (await sign_in(tenant, ("admin",))).get(f"/runs/{run['id']}", params={"tab": "budget"})).text
    assert "paused by an operator, not by a budget" in page


async def test_another_tenants_run_is_404_on_every_new_route_and_bad_input_is_422(
    client: httpx.AsyncClient, make_tenant: MakeTenant, sign_in: SignIn
) -> None:
    tenant, other = await make_tenant(), await make_tenant()
    workflow = name()
    await create_workflow(client, other.headers, workflow, WAITS)
    theirs = await start_run(client, other.headers, workflow)
    browser = await sign_in(tenant, ("admin",))
    token = csrf_of((await browser.get("/runs")).text)
    for run_id in (theirs["id"], str(uuid.uuid4())):
        url = f"/runs/{run_id}"
        for tab in ("graph", "timeline", "steps", "events", "reasoning", "budget"):
            for path in (url, f"{url}/live"):
                answer = await browser.get(path, params={"tab": tab})
                assert answer.status_code == 404, (path, tab, answer.status_code)
        assert (await browser.get(f"{url}/again")).status_code == 404
        for path, data in ((f"{url}/again/preview", {"input": "{}"}), (f"{url}/again", {"input": "{}"}),
                           (f"{url}/signal", {"name": "go"}), (f"{url}/limits", {"max_steps": "9"})):
            answer = await browser.post(path, data={"csrf_token": token, **data})
            assert answer.status_code == 404, (path, answer.status_code, answer.text[:300])
    status = (await client.get(f"/api/v1/runs/{theirs['id']}", headers=other.headers)).json()["status"]
    assert status == "waiting"
    mine_wf = name()
    await create_workflow(client, tenant.headers, mine_wf, WAITS)
    mine = f"/runs/{(await start_run(client, tenant.headers, mine_wf))['id']}"
    for params in ({"tab": "nope"}, {"tab": "events", "after": "x"}, {"tab": "steps", "items_after": "-9"},
                   {"tab": "events", "type": "t" * 200}):
        answer = await browser.get(mine, params=params)
        assert answer.status_code == 422 and answer.headers["content-type"].startswith("text/html"), params
    for data in ({"name": ""}, {"name": "n" * 129}, {"name": "go", "payload": "[" * 100_000}):
        answer = await browser.post(f"{mine}/signal", data={"csrf_token": token, **data})
        assert answer.status_code == 422, (data, answer.status_code)
    deep = await browser.post(f"{mine}/again/preview", data={"csrf_token": token, "input": "[" * 50_000})
    assert deep.status_code == 422 and 'id="again-input"' in deep.text


async def test_the_events_api_filters_as_the_events_tab_does(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings
) -> None:
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [
        {"id": "a", "tool": "echo", "args": {}}, {"id": "b", "needs": ["a"], "tool": "echo", "args": {}}])
    run = await wait_run(client, tenant.headers, (await start_run(client, tenant.headers, workflow))["id"])
    url = f"/api/v1/runs/{run['id']}/events"
    found = (await client.get(url, params={"type": "step_succeeded", "step": "b"}, headers=tenant.headers)).json()
    assert [(e["type"], e["step_id"]) for e in found["items"]] == [("step_succeeded", "b")]
    every = (await client.get(url, params={"type": "step_succeeded"}, headers=tenant.headers)).json()["items"]
    assert [e["step_id"] for e in every] == ["a", "b"]
