"""The operations pages in-process, against the real database and Redis: tools with their circuit breakers,
budgets against the API's figures, and the audit log's search, verification and downloads."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from app.config import Settings
from app.pg import Conn
from tests.fakes.tool_server import ToolServer
from tests.support.audit import add, add_unsealed, entries, rows, tamper
from tests.support.clock import clear_of_the_hour_boundary
from tests.support.runs import create_workflow, name, start_run, wait_for, wait_run
from tests.support.signin import SignIn
from tests.support.tenants import MakeTenant, TenantKey
from tests.support.tools import http_tool, register

pytestmark = pytest.mark.xdist_group("engine")

XSS = "<script>alert(1)</script>"
BASE = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def csrf_of(page: str) -> str:
    token = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert token, page[:500]
    return token.group(1)


def row_of(page: str, tool: str) -> str:
    """The registry table's row of ``tool``."""
    found = re.search(rf'<tr data-tool="{re.escape(tool)}">(.*?)</tr>', page, re.DOTALL)
    assert found, page[:3000]
    return found.group(1)


def breaker_of(html: str) -> str:
    found = re.search(r'<span class="breaker breaker-[a-z_]+">([^<]+)</span>', html)
    assert found, html[:2000]
    return found.group(1)


def nav(page: str) -> list[str]:
    found = re.search(r'<nav aria-label="Main">(.*?)</nav>', page, re.DOTALL)
    assert found, page[:1000]
    return re.findall(r">([^<]+)</a>", found.group(1))


# --- tools ------------------------------------------------------------------------------------------------


async def test_the_tools_page_shows_the_registry_and_a_breaker_tripped_by_failing_calls(
    client: httpx.AsyncClient, make_tenant: MakeTenant, sign_in: SignIn, worker: Settings, tool_server: ToolServer,
) -> None:
    tenant, other = await make_tenant(), await make_tenant()
    await register(client, tenant.headers, name="backup", executor=http_tool(tool_server.url + "/echo"),
                   effect="write", required_roles=["operator"],
                   autonomy={"mode": "conditional", "condition": "args.amount > 100"})
    await register(client, tenant.headers, name="flaky_api", fallback="backup", retry={"max_attempts": 1},
                   breaker={"failure_threshold": 2, "window_s": 600, "open_s": 600},
                   executor=http_tool(tool_server.url + "/fail"))
    browser = await sign_in(tenant)

    page = await browser.get("/tools")
    assert page.status_code == 200, page.text
    assert "Tools" in nav(page.text)
    backup = row_of(page.text, "backup")
    assert ">write<" in backup and "conditional" in backup and "args.amount &gt; 100" in backup
    assert "operator" in backup
    flaky = row_of(page.text, "flaky_api")
    assert 'href="/tools/backup">backup</a>' in flaky  # its fallback
    assert breaker_of(flaky) == "closed" and "0 of 2 failures in 600 s" in flaky
    assert breaker_of(row_of(page.text, "echo")) == "closed"  # builtins, on the first page
    assert 'hx-get="/tools/_live"' in page.text and 'hx-trigger="every 3s"' in page.text

    # Trip it the way production does: calls through a worker, failing until the breaker opens.
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [{"id": "call", "tool": "flaky_api", "args": {}}])
    for _ in range(2):
        run = await wait_run(client, tenant.headers, (await start_run(client, tenant.headers, workflow))["id"])
        assert run["status"] == "failed"

    live = await browser.get("/tools/_live")
    assert live.status_code == 200 and "<html" not in live.text
    flaky = row_of(live.text, "flaky_api")
    assert breaker_of(flaky) == "open" and "2 of 2 failures" in flaky
    assert re.search(r"probes from <time datetime=\"[^\"]+\">[^<]+</time> \(in (\d+) s\)", flaky), flaky
    assert breaker_of(row_of(live.text, "backup")) == "closed"

    detail = await browser.get("/tools/flaky_api")
    assert detail.status_code == 200, detail.text
    assert breaker_of(detail.text) == "open" and 'hx-get="/tools/flaky_api/breaker"' in detail.text
    fragment = await browser.get("/tools/flaky_api/breaker")
    assert fragment.status_code == 200 and breaker_of(fragment.text) == "open"

    # Another tenant's tool of the same name has its own breaker; this tenant's tools are not listed there.
    await register(client, other.headers, name="flaky_api", executor=http_tool(tool_server.url + "/fail"))
    theirs = await (await sign_in(other)).get("/tools")
    assert breaker_of(row_of(theirs.text, "flaky_api")) == "closed"
    assert 'data-tool="backup"' not in theirs.text


async def test_a_breaker_past_its_open_time_shows_half_open(
    client: httpx.AsyncClient, tenant: TenantKey, sign_in: SignIn, worker: Settings, tool_server: ToolServer,
) -> None:
    await register(client, tenant.headers, name="brief", retry={"max_attempts": 1},
                   breaker={"failure_threshold": 1, "window_s": 600, "open_s": 0.5},
                   executor=http_tool(tool_server.url + "/fail"))
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [{"id": "call", "tool": "brief", "args": {}}])
    assert (await wait_run(client, tenant.headers,
                           (await start_run(client, tenant.headers, workflow))["id"]))["status"] == "failed"
    browser = await sign_in(tenant)
    seen = []
    for _ in range(100):  # until the open half-second has passed (by the Redis server's clock)
        fragment = (await browser.get("/tools/brief/breaker")).text
        seen.append(breaker_of(fragment))
        if seen[-1] == "half-open":
            break
        await asyncio.sleep(0.05)
    assert seen[-1] == "half-open" and set(seen) <= {"open", "half-open"}, seen
    assert "letting a probe through" in fragment


async def test_a_tools_definition_is_shown_formatted_with_secrets_redacted_and_escaped(
    client: httpx.AsyncClient, tenant: TenantKey, make_tenant: MakeTenant, sign_in: SignIn,
) -> None:
    assert (await client.put("/api/v1/secrets/pay_key", json={"value": "vault-value-1"},
                             headers=tenant.headers)).status_code in (200, 201, 204)
    schema = {"type": "object", "properties": {
        "card": {"type": "string", "writeOnly": True, "default": "4111-1111-1111-1111", "examples": ["4242-4242"]},
        "note": {"type": "string", "default": "visible default"},
    }}
    executor = http_tool("https://pay.example.com/charge", headers={
        "Authorization": "Bearer ${{ secrets.pay_key }}", "X-Api-Key": "literal-key-5c1e", "Accept": "text/plain"})
    await register(client, tenant.headers, name="pay", description=f"Charges {XSS}", input_schema=schema,
                   executor=executor)
    await register(client, tenant.headers, name="pay", description="Charges, v2", input_schema=schema,
                   executor=executor)
    browser = await sign_in(tenant)

    page = await browser.get("/tools/pay")
    assert page.status_code == 200, page.text
    assert "version 2" in page.text and 'href="/tools/pay?version=1"' in page.text
    for secret in ("vault-value-1", "literal-key-5c1e", "4111-1111-1111-1111", "4242-4242"):
        assert secret not in page.text
    assert "Bearer ${{ secrets.pay_key }}" in page.text  # a reference, not a value
    assert "visible default" in page.text and "text/plain" in page.text
    spec = json.loads(re.search(r'<pre class="json"[^>]*>(.*?)</pre>', page.text, re.DOTALL).group(1)  # type: ignore[union-attr]
                      .replace("&#34;", '"'))
    assert spec["executor"]["headers"]["X-Api-Key"] == "[redacted]"
    assert spec["input_schema"]["properties"]["card"]["default"] == "[redacted]"

    first = await browser.get("/tools/pay", params={"version": 1})
    assert first.status_code == 200 and "latest is 2" in first.text
    assert XSS not in first.text and "&lt;script&gt;" in first.text.split('<pre class="json"')[1]
    assert "Charges &lt;script&gt;" in first.text

    builtin = await browser.get("/tools/echo")
    assert builtin.status_code == 200 and "builtin" in builtin.text

    other = await sign_in(await make_tenant())
    for url in ("/tools/pay", "/tools/pay/breaker", "/tools/nothing_here"):
        missing = await other.get(url)
        assert missing.status_code == 404 and missing.headers["content-type"].startswith("text/html"), url


async def test_the_tools_list_pages_by_name(client: httpx.AsyncClient, tenant: TenantKey, sign_in: SignIn) -> None:
    for tool in ("alpha", "beta", "gamma"):
        await register(client, tenant.headers, name=tool, executor={"kind": "builtin", "name": "echo"})
    browser = await sign_in(tenant)
    first = await browser.get("/tools", params={"limit": 2})
    assert re.findall(r'<tr data-tool="([^"]+)">', first.text)[:2] == ["alpha", "beta"]
    more = re.search(r'<a rel="next" href="(/tools\?cursor=[^"]+)">', first.text)
    assert more, first.text
    second = await browser.get(more.group(1).replace("&amp;", "&") + "&limit=2")
    found = re.findall(r'<tr data-tool="([^"]+)">', second.text)
    assert found == ["gamma"]  # and no builtins past the first page
    assert "/tools/_live?cursor=" in second.text


# --- budgets ----------------------------------------------------------------------------------------------


async def test_the_budgets_page_matches_the_api_and_lists_runs_a_budget_paused(
    client: httpx.AsyncClient, make_tenant: MakeTenant, sign_in: SignIn, worker: Settings,
) -> None:
    await clear_of_the_hour_boundary(margin_s=60)
    tenant, other = await make_tenant(), await make_tenant()
    assert (await client.put("/api/v1/budgets", json={"hourly_usd": "40", "daily_usd": "50"},
                             headers=tenant.headers)).status_code == 200
    await register(client, tenant.headers, name="paid", cost_usd="1.25", executor={"kind": "builtin", "name": "echo"})
    workflow = name()
    steps = [{"id": "a", "tool": "paid", "args": {}}, {"id": "b", "needs": ["a"], "tool": "paid", "args": {}},
             {"id": "c", "needs": ["b"], "tool": "paid", "args": {}}]
    await create_workflow(client, tenant.headers, workflow, steps, limits={"max_cost_usd": 2.5})
    run = await start_run(client, tenant.headers, workflow)
    await wait_for(client, tenant.headers, run["id"], lambda r: r["status"] == "paused")
    usage = (await client.get("/api/v1/budgets/usage", headers=tenant.headers)).json()
    assert usage["day"]["spent_usd"] == "2.5"

    browser = await sign_in(tenant)
    page = await browser.get("/budgets")
    assert page.status_code == 200, page.text
    assert "Budgets" in nav(page.text)
    now = re.search(r'<section aria-labelledby="now-title".*?</section>', page.text, re.DOTALL).group(0)  # type: ignore[union-attr]
    assert f"${usage['hour']['spent_usd']}</strong> spent" in now and "of a $40 cap" in now
    assert f"${usage['day']['spent_usd']}</strong> spent" in now and "of a $50 cap" in now
    # The chart, with its text alternative, and the same figures as a table.
    svg = re.search(r"<svg .*?</svg>", page.text, re.DOTALL).group(0)  # type: ignore[union-attr]
    assert 'role="img"' in svg and "<title id=" in svg and "<desc id=" in svg and 'class="cap"' in svg
    assert len(re.findall(r'<rect [^>]*class="bar"', svg)) == datetime.now(UTC).hour + 1
    hour = datetime.now(UTC).strftime("%H:00")
    table = re.search(r'<table class="burn-table">.*?</table>', page.text, re.DOTALL).group(0)  # type: ignore[union-attr]
    this_hour = re.search(rf">{hour}</time></th>(.*?)</tr>", table, re.DOTALL).group(1)  # type: ignore[union-attr]
    assert re.findall(r'<td class="mono">([^<]+)</td>', this_hour) == ["$2.5", "$0", "$2.5", "$47.5"]
    top = re.search(r"<caption>Today \(UTC\)</caption>.*?</table>", page.text, re.DOTALL).group(0)  # type: ignore[union-attr]
    assert workflow in top and "$2.5" in top
    paused = re.search(r'<table class="paused-runs">.*?</table>', page.text, re.DOTALL).group(0)  # type: ignore[union-attr]
    assert f'href="/runs/{run["id"]}"' in paused and "past its $2.5" in paused

    theirs = await (await sign_in(other)).get("/budgets")
    assert theirs.status_code == 200 and run["id"] not in theirs.text and workflow not in theirs.text
    assert "No run is paused on a budget." in theirs.text


# --- audit ------------------------------------------------------------------------------------------------


def events_of(page: str) -> list[int]:
    table = re.search(r'<table class="audit">.*?</table>', page, re.DOTALL)
    return [int(seq) for seq in re.findall(r"<tr>\s*<td>(\d+)</td>", table.group(0))] if table else []


async def seeded(owner: Conn, tenant: TenantKey) -> None:
    """Six events an hour apart from 12:00: alice starts things 1-3, bob cancels run 2, the system pauses run 3,
    and bob names a thing with markup."""
    at = [BASE + timedelta(hours=i) for i in range(6)]
    items = [
        *entries(3, actor="user:alice", action="run.start", at=at[:3]),
        *entries(1, start=4, actor="user:bob", action="run.cancel", target="run:2", at=at[3:4]),
        *entries(1, start=5, actor="system", action="run.pause", target="run:3", at=at[4:5]),
        *entries(1, start=6, actor="user:bob", action="thing.name", target=f"thing:{XSS}", at=at[5:6]),
    ]
    await add(owner, tenant.tenant_id, items)


async def test_the_audit_page_searches_pages_and_escapes(
    owner: Conn, make_tenant: MakeTenant, sign_in: SignIn
) -> None:
    tenant, other = await make_tenant(), await make_tenant()
    await seeded(owner, tenant)
    await add(owner, other.tenant_id, entries(2, actor="user:mallory", action="run.start"))
    await add_unsealed(owner, tenant.tenant_id, entries(1, start=7, actor="user:carol"))  # no sealer runs here
    browser = await sign_in(tenant, ("auditor",))
    seqs = {r["target"]: r["seq"] for r in await rows(owner, tenant.tenant_id)}

    page = await browser.get("/audit")
    assert page.status_code == 200, page.text
    assert "Audit" in nav(page.text)
    carol = re.search(r"<tr>\s*<td>(.*?)</td>(?:(?!</tr>).)*user:carol", page.text, re.DOTALL)
    assert carol and ">unsealed</span>" in carol.group(1), page.text  # listed before it is sealed
    shown = events_of(page.text)
    assert shown == sorted(shown, reverse=True) and len(shown) >= 6  # newest first (the sign-in adds events)
    assert "mallory" not in page.text
    assert XSS not in page.text and "thing:&lt;script&gt;" in page.text

    async def search(**params: str) -> list[int]:
        answer = await browser.get("/audit", params=params)
        assert answer.status_code == 200, answer.text
        return events_of(answer.text)

    assert await search(actor="user:bob") == [seqs[f"thing:{XSS}"], seqs["run:2"]]
    assert await search(action="run.start") == [seqs["thing:3"], seqs["thing:2"], seqs["thing:1"]]
    assert await search(target="run:3") == [seqs["run:3"]]
    assert await search(actor="user:alice", action="run.start", target="thing:2") == [seqs["thing:2"]]
    # A window: from 13:00 (inclusive) to 15:00 (exclusive), as a datetime-local field sends it.
    assert await search(since="2026-03-01T13:00", until="2026-03-01T15:00", actor="", action="", target="") == [
        seqs["thing:3"], seqs["thing:2"]]
    assert await search(since="2026-03-01T13:00:00+01:00", until="2026-03-01T12:30") == [seqs["thing:1"]]

    first = await browser.get("/audit", params={"actor": "user:alice", "limit": 2})
    assert events_of(first.text) == [seqs["thing:3"], seqs["thing:2"]]
    more = re.search(r'<a rel="next" href="([^"]+)">', first.text)
    assert more and "actor=user%3Aalice" in more.group(1)
    second = await browser.get(more.group(1).replace("&amp;", "&"))
    assert events_of(second.text) == [seqs["thing:1"]]


async def test_the_audit_downloads_are_the_apis_export_with_the_same_filters(
    owner: Conn, make_tenant: MakeTenant, sign_in: SignIn
) -> None:
    tenant = await make_tenant()
    await seeded(owner, tenant)
    browser = await sign_in(tenant, ("auditor",))
    page = await browser.get("/audit", params={"actor": "user:bob", "since": "2026-03-01T12:00"})
    links = dict(re.findall(r'<a href="([^"]+)" download>(JSONL|CSV)</a>', page.text))
    assert set(links.values()) == {"JSONL", "CSV"}
    by_kind = {kind: url.replace("&amp;", "&") for url, kind in links.items()}
    assert all(url.startswith("/api/v1/audit/export?") for url in by_kind.values())

    jsonl = await browser.get(by_kind["JSONL"])
    assert jsonl.status_code == 200 and jsonl.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in jsonl.text.splitlines()]
    assert [(e["actor"], e["target"]) for e in lines] == [("user:bob", "run:2"), ("user:bob", f"thing:{XSS}")]
    assert "attachment" in jsonl.headers["content-disposition"]

    spreadsheet = await browser.get(by_kind["CSV"])
    assert spreadsheet.status_code == 200 and spreadsheet.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(spreadsheet.text)))
    assert [(r["actor"], r["target"]) for r in table] == [("user:bob", "run:2"), ("user:bob", f"thing:{XSS}")]


async def test_verify_reports_an_intact_chain_then_the_first_tampered_row(
    owner: Conn, make_tenant: MakeTenant, sign_in: SignIn
) -> None:
    tenant, other = await make_tenant(), await make_tenant()
    await seeded(owner, tenant)
    await add(owner, other.tenant_id, entries(3))
    browser = await sign_in(tenant, ("auditor",))
    page = await browser.get("/audit")
    token = csrf_of(page.text)

    await add_unsealed(owner, tenant.tenant_id, entries(2, start=7))  # no sealer runs here
    ok = await browser.post("/audit/verify", data={"csrf_token": token})
    assert ok.status_code == 200, ok.text
    kept = await rows(owner, tenant.tenant_id)
    count, pending = sum(r["seq"] is not None for r in kept), sum(r["seq"] is None for r in kept)
    assert re.search(rf"<strong>Intact.</strong> {count} rows checked", ok.text), ok.text
    assert pending >= 2 and f"{pending} newer rows not sealed yet" in ok.text, ok.text

    chain = await rows(owner, tenant.tenant_id)
    victim = chain[2]
    await tamper(owner, "UPDATE audit_event SET data = '{\"i\": 999}' WHERE id = $1", victim["id"])
    broken = await browser.post("/audit/verify", data={"csrf_token": token})
    assert broken.status_code == 200
    assert f"<strong>Broken</strong> at row {victim['seq']}: hash mismatch." in broken.text
    assert f"<caption>Row {victim['seq']} as stored</caption>" in broken.text
    assert str(victim["id"]) in broken.text and "999" in broken.text
    assert f"{victim['seq']} rows read before the break" in broken.text

    # The other tenant's chain is its own, and still intact.
    theirs = await sign_in(other, ("auditor",))
    mine = await theirs.post("/audit/verify", data={"csrf_token": csrf_of((await theirs.get("/audit")).text)})
    assert "<strong>Intact.</strong>" in mine.text

    refused = await browser.post("/audit/verify", data={"csrf_token": "wrong"})
    assert refused.status_code == 403


# --- everyone: links, permissions, bad input -----------------------------------------------------------------


async def test_links_show_only_for_roles_that_may_read(make_tenant: MakeTenant, sign_in: SignIn) -> None:
    tenant = await make_tenant()
    viewer = await (await sign_in(tenant, ("viewer",))).get("/runs")
    assert {"Tools", "Budgets"} <= set(nav(viewer.text)) and "Audit" not in nav(viewer.text)
    auditor = await sign_in(tenant, ("auditor",))
    assert "Audit" in nav((await auditor.get("/audit")).text)
    refused = await (await sign_in(tenant, ("viewer",))).get("/audit")
    assert refused.status_code == 403 and "audit:read" in refused.text


@pytest.mark.parametrize(("url", "params", "says"), [
    ("/tools", {"cursor": "junk"}, "not a cursor from this list"),
    ("/tools/_live", {"cursor": "junk"}, "not a cursor from this list"),
    ("/tools/no%20such", {}, ""),
    ("/tools/echo", {"version": "-1"}, ""),
    ("/tools/echo", {"version": "x" * 30}, ""),
    ("/budgets", {"cursor": "aGVsbG8"}, "not a cursor from this list"),
    ("/audit", {"since": "yesterday"}, "is not a time"),
    ("/audit", {"since": "2026-03-02T00:00", "until": "2026-03-01T00:00"}, "after `until`"),
    ("/audit", {"actor": "a" * 300}, ""),
    ("/audit", {"cursor": "junk"}, "not a cursor from this list"),
])
async def test_bad_input_is_a_422_page(
    make_tenant: MakeTenant, sign_in: SignIn, url: str, params: dict[str, str], says: str
) -> None:
    browser = await sign_in(await make_tenant(), ("admin",))
    page = await browser.get(url, params=params)
    assert page.status_code == 422 and page.headers["content-type"].startswith("text/html"), (url, page.text[:300])
    assert says in page.text
