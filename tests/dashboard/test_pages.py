"""The dashboard's pages, in-process against the real database: sign-in, tenant scoping, escaping."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.security_headers import CSP
from tests.support.runs import create_workflow, name, start_run, wait_run
from tests.support.signin import SignIn, app_client
from tests.support.tenants import MakeTenant, TenantKey

XSS = "<script>alert(1)</script>"


async def test_signed_out_visitors_are_sent_to_sign_in_and_back(app: FastAPI) -> None:
    async with app_client(app) as browser:
        root = await browser.get("/")
        assert (root.status_code, root.headers["location"]) == (303, "/runs")
        runs = await browser.get("/runs?status=failed")
        assert runs.status_code == 303
        assert runs.headers["location"] == "/auth/login?next=" + quote("/runs?status=failed", safe="")


async def test_an_api_key_is_no_dashboard_session(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    page = await client.get("/runs", headers=tenant.headers)
    assert page.status_code == 303 and page.headers["location"].startswith("/auth/login"), page.text


async def test_the_runs_page_lists_the_tenants_runs_and_escapes_what_users_wrote(
    client: httpx.AsyncClient, make_tenant: MakeTenant, sign_in: SignIn
) -> None:
    tenant, other = await make_tenant(), await make_tenant()
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [{"id": "a", "tool": "echo", "args": {"v": "x"}}])
    await create_workflow(client, other.headers, workflow, [{"id": "a", "tool": "echo", "args": {"v": "x"}}])
    mine = await start_run(client, tenant.headers, workflow, {"note": XSS})
    theirs = await start_run(client, other.headers, workflow)
    browser = await sign_in(tenant)

    page = await browser.get("/runs")
    assert page.status_code == 200, page.text
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CSP
    assert f'href="/runs/{mine["id"]}"' in page.text
    assert theirs["id"] not in page.text
    assert tenant.name in page.text  # the header names the tenant
    # No inline script (the strict policy holds): scripts come from /static, by src.
    assert re.findall(r"<script[^>]*>", page.text) == [
        "<script src=\"/static/vendor/htmx/htmx.min.js\" defer>", "<script src=\"/static/dashboard.js\" defer>",
        "<script src=\"/static/runs.js\" defer>"]

    filtered = await browser.get("/runs", params={"status": "succeeded", "workflow": workflow})
    assert filtered.status_code == 200 and mine["id"] not in filtered.text

    run = await browser.get(f"/runs/{mine['id']}")
    assert run.status_code == 200, run.text
    at = run.text.find(XSS)
    assert at == -1, run.text[max(0, at - 300):at + 50]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in run.text  # shown as the user wrote it, as text
    assert 'href="/runs"' in run.text


async def test_another_tenants_run_is_the_same_404_page_as_no_run(
    client: httpx.AsyncClient, make_tenant: MakeTenant, sign_in: SignIn
) -> None:
    tenant, other = await make_tenant(), await make_tenant()
    workflow = name()
    await create_workflow(client, other.headers, workflow, [{"id": "a", "tool": "echo", "args": {}}])
    theirs = await start_run(client, other.headers, workflow)
    browser = await sign_in(tenant)
    for run_id in (theirs["id"], str(uuid.uuid4())):
        page = await browser.get(f"/runs/{run_id}")
        assert page.status_code == 404, page.text
        assert page.headers["content-type"].startswith("text/html")
        assert run_id in page.text and "Back to runs" in page.text


@pytest.mark.parametrize("cursor", ["junk", "aGVsbG8"])
async def test_a_bad_cursor_or_filter_is_never_a_500(
    make_tenant: MakeTenant, sign_in: SignIn, cursor: str
) -> None:
    browser = await sign_in(await make_tenant())
    page = await browser.get("/runs", params={"cursor": cursor})
    assert page.status_code == 422 and page.headers["content-type"].startswith("text/html"), page.text
    assert "not a cursor from this list" in page.text
    unknown = await browser.get("/runs", params={"status": "nonsense"})
    assert unknown.status_code == 422 and "/query/status" in unknown.text


def csrf_of(page: str) -> str:
    token = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert token, page[:500]
    return token.group(1)


async def test_an_operator_pauses_resumes_and_cancels_a_run_from_its_page(
    client: httpx.AsyncClient, tenant: TenantKey, sign_in: SignIn
) -> None:
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [{"id": "w", "wait": {"signal": "go"}}])
    run = await start_run(client, tenant.headers, workflow)  # no worker: it stays where the engine put it
    browser = await sign_in(tenant, ("operator",))
    url = f"/runs/{run['id']}"

    async def act(action: str) -> str:
        page = await browser.get(url)
        answer = await browser.post(f"{url}/{action}", data={"csrf_token": csrf_of(page.text)})
        assert (answer.status_code, answer.headers.get("location")) == (303, url), answer.text
        status: str = (await client.get(f"/api/v1/runs/{run['id']}", headers=tenant.headers)).json()["status"]
        return status

    assert await act("pause") == "paused"
    page = (await browser.get(url)).text
    assert 'disabled aria-describedby="why-pause"' in page and "the run is paused" in page
    assert await act("resume") != "paused"
    assert await act("cancel") == "cancelled"
    # The engine refuses what the run's state does not allow: a page saying so, not a 500.
    refused = await browser.post(f"{url}/retry", data={"csrf_token": csrf_of((await browser.get(url)).text)})
    assert refused.status_code == 409 and "cancelled" in refused.text, refused.text
    events = (await client.get("/api/v1/audit/events", params={"target": f"run:{run['id']}"},
                               headers=tenant.headers)).json()["items"]
    assert {"run.pause", "run.resume", "run.cancel"} <= {event["action"] for event in events}, events


async def test_a_viewer_sees_why_the_controls_are_off_and_cannot_post_them(
    client: httpx.AsyncClient, tenant: TenantKey, sign_in: SignIn
) -> None:
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [{"id": "w", "wait": {"signal": "go"}}])
    run = await start_run(client, tenant.headers, workflow)
    browser = await sign_in(tenant, ("viewer",))
    url = f"/runs/{run['id']}"
    page = (await browser.get(url)).text
    assert page.count("needs the runs:operate permission") == 4
    refused = await browser.post(f"{url}/pause", data={"csrf_token": csrf_of(page)})
    assert refused.status_code == 403 and "runs:operate" in refused.text
    forged = await (await sign_in(tenant, ("operator",))).post(f"{url}/pause", data={"csrf_token": "forged"})
    assert forged.status_code == 403 and "CSRF" in forged.text
    status = (await client.get(f"/api/v1/runs/{run['id']}", headers=tenant.headers)).json()["status"]
    assert status != "paused"


async def gated_run(client: httpx.AsyncClient, tenant: TenantKey) -> dict[str, Any]:
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [{"id": "ok", "approval": {"reason": f"ship {XSS}?"}}])
    return await start_run(client, tenant.headers, workflow)


async def test_an_approver_decides_from_the_inbox_and_a_rejection_needs_a_comment(
    client: httpx.AsyncClient, tenant: TenantKey, sign_in: SignIn
) -> None:
    approved_run, rejected_run = await gated_run(client, tenant), await gated_run(client, tenant)
    browser = await sign_in(tenant, ("approver",))
    inbox = await browser.get("/approvals")
    assert inbox.status_code == 200, inbox.text
    assert approved_run["id"] in inbox.text and rejected_run["id"] in inbox.text
    assert XSS not in inbox.text  # the reason is escaped
    pending = (await client.get("/api/v1/approvals", params={"status": "pending"}, headers=tenant.headers)).json()
    by_run = {a["run_id"]: a["id"] for a in pending["items"]}
    token = csrf_of(inbox.text)

    empty = await browser.post(f"/approvals/{by_run[rejected_run['id']]}", data={
        "csrf_token": token, "decision": "reject", "comment": "  "})
    assert empty.status_code == 422 and "/form/comment" in empty.text, empty.text
    rejected = await browser.post(f"/approvals/{by_run[rejected_run['id']]}", data={
        "csrf_token": token, "decision": "reject", "comment": "not today"})
    assert (rejected.status_code, rejected.headers.get("location")) == (303, "/approvals"), rejected.text
    approved = await browser.post(f"/approvals/{by_run[approved_run['id']]}", data={
        "csrf_token": token, "decision": "approve"})
    assert approved.status_code == 303, approved.text
    again = await browser.post(f"/approvals/{by_run[approved_run['id']]}", data={
        "csrf_token": token, "decision": "approve"})
    assert again.status_code == 409 and "already approved" in again.text, again.text

    for run, status in ((approved_run, "succeeded"), (rejected_run, "failed")):
        read = (await client.get(f"/api/v1/runs/{run['id']}", headers=tenant.headers)).json()
        assert read["status"] == status, read
    assert approved_run["id"] not in (await browser.get("/approvals")).text


async def test_viewers_and_the_runs_starter_see_the_request_without_the_buttons(
    client: httpx.AsyncClient, tenant: TenantKey, sign_in: SignIn
) -> None:
    run = await gated_run(client, tenant)
    viewer = await sign_in(tenant, ("viewer",))
    page = (await viewer.get("/approvals")).text
    assert run["id"] in page and "needs the approvals:decide permission" in page
    assert 'value="approve"' not in page
    refused = await viewer.post("/approvals/" + str(uuid.uuid4()), data={"csrf_token": csrf_of(page),
                                                                          "decision": "approve"})
    assert refused.status_code == 403


async def test_four_eyes_the_starter_sees_why_they_cannot_decide(
    client: httpx.AsyncClient, tenant: TenantKey, sign_in: SignIn
) -> None:
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [{"id": "ok", "approval": {"reason": "mine"}}])
    starter = await sign_in(tenant, ("operator", "approver"))
    token = csrf_of((await starter.get("/runs")).text)
    started = await starter.post("/api/v1/runs", json={"workflow": workflow, "input": {}},
                                 headers={"X-CSRF-Token": token})
    assert started.status_code == 201, started.text
    page = (await starter.get("/approvals")).text
    assert started.json()["id"] in page and "four-eyes: you started this run" in page


@pytest.mark.xdist_group("engine")
async def test_a_failed_runs_page_shows_each_attempt_and_links_its_events(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, sign_in: SignIn
) -> None:
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [
        {"id": "boom", "tool": "fail", "args": {"message": f"upstream {XSS}"},
         "retry": {"max_attempts": 2, "jitter": False, "backoff_base_s": 0.01}}])
    run = await wait_run(client, tenant.headers, (await start_run(client, tenant.headers, workflow))["id"])
    assert run["status"] == "failed", run
    browser = await sign_in(tenant)
    page = (await browser.get(f"/runs/{run['id']}", params={"tab": "steps"})).text
    assert XSS not in page
    assert page.count("fail: upstream &lt;script&gt;alert(1)&lt;/script&gt;") == 2  # both attempts, escaped
    assert 'hx-trigger' not in page  # an ended run's page does not poll
    events = (await browser.get(f"/runs/{run['id']}", params={"tab": "events"})).text
    first_event = run["events"][0]["id"]
    assert f'id="event-{first_event}"' in events
    assert f'href="/runs/{run["id"]}?tab=events&amp;after={first_event - 1}#event-{first_event}"' in events


async def test_runs_filter_by_day_page_with_their_filters_and_jump_to_a_run(
    client: httpx.AsyncClient, make_tenant: MakeTenant, sign_in: SignIn
) -> None:
    tenant = await make_tenant()
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [{"id": "w", "wait": {"signal": "go"}}])
    runs = [await start_run(client, tenant.headers, workflow) for _ in range(3)]
    browser = await sign_in(tenant)
    today = datetime.now(UTC).date()
    listed = (await browser.get("/runs", params={"since": today.isoformat(), "until": today.isoformat(),
                                                 "workflow": workflow, "limit": 2})).text
    shown = re.findall(r"href=\"/runs/([0-9a-f-]{36})\"", listed)
    assert shown == [runs[2]["id"], runs[1]["id"]], (shown, [r["id"] for r in runs])
    older = re.search(r'<a rel="next" href="([^"]+)"', listed)
    assert older, listed
    rest = (await browser.get(older.group(1).replace("&amp;", "&"))).text
    assert runs[0]["id"] in rest and runs[1]["id"] not in rest  # the next page keeps the filters
    tomorrow = (await browser.get("/runs", params={"since": (today + timedelta(days=1)).isoformat()})).text
    assert runs[0]["id"] not in tomorrow
    jump = await browser.get("/runs", params={"run": f" {runs[1]['id']} "})
    assert (jump.status_code, jump.headers["location"]) == (303, f"/runs/{runs[1]['id']}")
    bad = await browser.get("/runs", params={"run": "nope"})
    assert bad.status_code == 422 and "/query/run" in bad.text
    bad_day = await browser.get("/runs", params={"since": "yesterday"})
    assert bad_day.status_code == 422, bad_day.text


async def test_workflows_and_their_versions(
    client: httpx.AsyncClient, make_tenant: MakeTenant, sign_in: SignIn
) -> None:
    tenant, other = await make_tenant(), await make_tenant()
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [{"id": "a", "tool": "echo", "args": {"v": XSS}}])
    await create_workflow(client, tenant.headers, workflow, [{"id": "b", "tool": "echo", "args": {}}])
    hidden = name()
    await create_workflow(client, other.headers, hidden, [{"id": "a", "tool": "echo", "args": {}}])
    browser = await sign_in(tenant)
    listing = (await browser.get("/workflows")).text
    assert f'href="/workflows/{workflow}"' in listing and hidden not in listing
    latest = (await browser.get(f"/workflows/{workflow}")).text
    assert "version 2" in latest and "- id: b" in latest and f'href="/workflows/{workflow}?version=1"' in latest
    first = (await browser.get(f"/workflows/{workflow}", params={"version": 1})).text
    assert XSS not in first and "&lt;script&gt;" in first  # the definition as YAML, escaped
    assert (await browser.get(f"/workflows/{hidden}")).status_code == 404
