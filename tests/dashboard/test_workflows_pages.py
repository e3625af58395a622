"""The workflows pages in-process against the real database: a version as YAML with its versions and runs, the
diff of two versions, and the "start a run" form generated from an input schema, its errors in place."""

from __future__ import annotations

import html
import re
from typing import Any

import httpx

from tests.support.runs import create_workflow, name, start_run
from tests.support.signin import SignIn
from tests.support.tenants import MakeTenant, TenantKey

XSS = "<script>alert(1)</script>"
SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["customer", "count", "tier"],
    "properties": {
        "customer": {"type": "string", "title": "Customer name", "maxLength": 40, "description": f"who {XSS}"},
        "count": {"type": "integer", "default": 3},
        "ratio": {"type": "number"},
        "urgent": {"type": "boolean", "default": True},
        "tier": {"enum": ["gold", "silver", 7]},
        "address": {"type": "object", "required": ["city"],
                    "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]+$"}}},
        "tags": {"type": "array", "items": {"type": "string"}, "default": ["a"]},
    },
}


def csrf_of(page: str) -> str:
    token = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert token, page[:500]
    return token.group(1)


def hidden(page: str, field: str) -> str:
    found = re.search(rf'name="{field}" value="([^"]*)"', page)
    assert found, page[:500]
    return found.group(1)


def block_of(page: str, field_id: str) -> str:
    """The markup of one generated field: from its control to the end of its wrapper."""
    start = page.index(f'id="{field_id}"')
    return page[start:page.index("</div>", start)]


async def test_a_version_shows_as_yaml_with_its_versions_their_runs_and_links_to_compare(
    client: httpx.AsyncClient, make_tenant: MakeTenant, sign_in: SignIn
) -> None:
    tenant, other = await make_tenant(), await make_tenant()
    workflow = name()
    for steps in ([{"id": "a", "tool": "echo", "args": {"v": XSS}}], [{"id": "b", "tool": "echo", "args": {}}]):
        await create_workflow(client, tenant.headers, workflow, steps)
    for version in (1, 1, 2):
        await start_run(client, tenant.headers, workflow, version=version)
    browser = await sign_in(tenant, ("operator",))

    latest = await browser.get(f"/workflows/{workflow}")
    assert latest.status_code == 200, latest.text
    text = latest.text
    assert re.search(r"steps:\n- id: b\n  args: \{\}\n  tool: echo", text), text
    first = (await browser.get(f"/workflows/{workflow}", params={"version": 1})).text
    assert XSS not in first and "v: &lt;script&gt;alert(1)&lt;/script&gt;" in first
    rows = dict(re.findall(r"version (\d)(?: \(shown\))?</(?:strong|a)></th>.*?<td>(\d+)</td>", text, re.S))
    assert rows == {"2": "1", "1": "2"}, rows
    assert f'href="/workflows/{workflow}/diff?from=1&amp;to=2"' in text
    assert f'href="/workflows/{workflow}/start?version=2"' in text
    viewer = (await (await sign_in(tenant, ("viewer",))).get(f"/workflows/{workflow}")).text
    assert "/start?" not in viewer  # no start link without runs:start
    assert (await browser.get(f"/workflows/{workflow}", params={"version": 9})).status_code == 404
    theirs = name()
    await create_workflow(client, other.headers, theirs, [{"id": "a", "tool": "echo", "args": {}}])
    for path in (f"/workflows/{theirs}", f"/workflows/{theirs}/diff?from=1&to=1", f"/workflows/{theirs}/start"):
        assert (await browser.get(path)).status_code == 404, path


async def test_the_diff_of_two_versions_marks_each_line(
    client: httpx.AsyncClient, tenant: TenantKey, sign_in: SignIn
) -> None:
    workflow = name()
    for value in ("one", "two", "three"):
        await create_workflow(client, tenant.headers, workflow, [{"id": "a", "tool": "echo", "args": {"v": value}},
                                                                 {"id": "z", "tool": "echo", "args": {}}])
    browser = await sign_in(tenant)
    page = await browser.get(f"/workflows/{workflow}/diff", params={"from": 1, "to": 3})
    assert page.status_code == 200, page.text
    rows = re.findall(r'<tr class="diff-(\w+)">.*?<span aria-hidden="true">(.)</span>'
                      r'<span class="visually-hidden">(\w+)</span>.*?<pre>(.*?)</pre>', page.text, re.S)
    changed = [(kind, mark, words, line) for kind, mark, words, line in rows if kind != "unchanged"]
    assert changed == [("removed", "−", "removed", "    v: one"), ("added", "+", "added", "    v: three")], rows
    assert "<caption>Changes from version 1 to version 3</caption>" in page.text
    same = await browser.get(f"/workflows/{workflow}/diff", params={"from": 2, "to": 2})
    assert "The two definitions are the same." in same.text
    for params in ({"from": 1}, {"from": "x", "to": 2}, {"from": 0, "to": 1}):
        bad = await browser.get(f"/workflows/{workflow}/diff", params=params)
        assert bad.status_code == 422 and "text/html" in bad.headers["content-type"], (params, bad.text[:300])
    assert (await browser.get(f"/workflows/{workflow}/diff", params={"from": 1, "to": 7})).status_code == 404


async def test_the_start_form_has_a_field_for_each_schema_type(
    client: httpx.AsyncClient, tenant: TenantKey, sign_in: SignIn
) -> None:
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [{"id": "a", "tool": "echo", "args": {}}],
                          input_schema=SCHEMA)
    browser = await sign_in(tenant, ("operator",))
    page = await browser.get(f"/workflows/{workflow}/start")
    assert page.status_code == 200, page.text
    text = page.text
    assert XSS not in text and "who &lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert re.search(r'<label for="f-2f-customer">Customer name \(required\)</label>\s*'
                     r'<input id="f-2f-customer" name="in/customer" aria-required="true"[^>]*maxlength="40"', text)
    assert 'name="in/count"' in text and 'inputmode="numeric"' in block_of(text, "f-2f-count")
    assert 'value="3"' in block_of(text, "f-2f-count")  # the schema's default
    assert 'inputmode="decimal"' in block_of(text, "f-2f-ratio")
    assert '<input type="checkbox" id="f-2f-urgent"' in text and "checked" in block_of(text, "f-2f-urgent")
    tier = text[text.index('id="f-2f-tier"'):text.index("</select>", text.index('id="f-2f-tier"'))]
    assert re.findall(r'<option value="(\d)">([^<]+)</option>', tier) == [("0", "gold"), ("1", "silver"), ("2", "7")]
    assert re.search(r'<fieldset id="f-2f-address">\s*<legend>address</legend>', text)
    assert 'name="in/address/city"' in text and 'name="in/address/zip"' in text
    assert re.search(r'<textarea id="f-2f-tags" name="in/tags"[^>]*>\[\s*&#34;a&#34;\s*\]</textarea>', text)
    assert 'name="input_json"' in text  # the plain JSON editor too

    plain = name()
    await create_workflow(client, tenant.headers, plain, [{"id": "a", "tool": "echo", "args": {}}],
                          input_schema={"type": "array"})
    only_json = (await browser.get(f"/workflows/{plain}/start")).text
    assert 'name="input_json"' in only_json and 'name="mode" value="form"' not in only_json


async def test_a_started_form_runs_and_its_errors_show_beside_their_fields(
    client: httpx.AsyncClient, tenant: TenantKey, sign_in: SignIn
) -> None:
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [{"id": "a", "tool": "echo", "args": {}}],
                          input_schema=SCHEMA)
    browser = await sign_in(tenant, ("operator",))
    page = (await browser.get(f"/workflows/{workflow}/start")).text
    base = {"csrf_token": csrf_of(page), "request": hidden(page, "request"), "mode": "form"}
    target = f"/workflows/{workflow}/start?version=1"

    bad = await browser.post(target, data={**base, "in/customer": "", "in/count": "2.5", "in/ratio": "lots",
                                           "in/tier": "9", "in/tags": "[1,", "in/address/zip": "12a"})
    assert bad.status_code == 422 and "text/html" in bad.headers["content-type"], bad.text[:500]
    text = bad.text
    assert "not a whole number" in block_of(text, "f-2f-count")
    assert "not a number" in block_of(text, "f-2f-ratio")
    assert "not one of the choices" in block_of(text, "f-2f-tier")
    assert "not JSON" in block_of(text, "f-2f-tags")
    assert 'value="2.5"' in block_of(text, "f-2f-count")  # what was sent stays in the field
    assert "<li>required</li>" in block_of(text, "f-2f-customer")  # the schema checked the rest meanwhile
    assert "does not match" in block_of(text, "f-2f-address-2f-zip")

    schema_bad = await browser.post(target, data={**base, "in/customer": "x" * 41, "in/count": "2", "in/tier": "0",
                                                  "in/address/zip": "12a", "in/tags": f'["{XSS}"]'})
    assert schema_bad.status_code == 422, schema_bad.text[:500]
    text = schema_bad.text
    assert "is too long" in block_of(text, "f-2f-customer")
    assert "<li>required</li>" in block_of(text, "f-2f-address-2f-city")
    assert "does not match" in block_of(text, "f-2f-address-2f-zip")
    assert XSS not in text

    good = await browser.post(target, data={**base, "in/customer": "Ada", "in/count": "2", "in/ratio": "0.5",
                                            "in/tier": "2", "in/address/city": "Paris", "in/tags": '["x"]'})
    assert good.status_code == 303, good.text[:800]
    run_id = good.headers["location"].removeprefix("/runs/")
    run = (await client.get(f"/api/v1/runs/{run_id}", headers=tenant.headers)).json()
    assert run["input"] == {"customer": "Ada", "count": 2, "ratio": 0.5, "urgent": False, "tier": 7,
                            "address": {"city": "Paris"}, "tags": ["x"]}, run["input"]
    again = await browser.post(target, data={**base, "in/customer": "Ada", "in/count": "2", "in/ratio": "0.5",
                                             "in/tier": "2", "in/address/city": "Paris", "in/tags": '["x"]'})
    assert again.headers["location"] == good.headers["location"]  # sent twice, started once
    events = (await client.get("/api/v1/audit/export", params={"format": "jsonl"}, headers=tenant.headers)).text
    assert events.count(f'"run:{run_id}"') == 1 and '"run.start"' in events


async def test_the_json_editor_starts_runs_and_shows_schema_errors_at_their_pointers(
    client: httpx.AsyncClient, tenant: TenantKey, sign_in: SignIn
) -> None:
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [{"id": "a", "tool": "echo", "args": {}}],
                          input_schema=SCHEMA)
    browser = await sign_in(tenant, ("operator",))
    page = (await browser.get(f"/workflows/{workflow}/start")).text
    base = {"csrf_token": csrf_of(page), "request": hidden(page, "request"), "mode": "json"}
    target = f"/workflows/{workflow}/start"
    bad = await browser.post(target, data={**base, "input_json": '{"customer": 5, "tier": "gold"}'})
    assert bad.status_code == 422
    errors = html.unescape(bad.text[bad.text.index('id="input-json-errors"'):])
    assert "/customer: 5 is not of type 'string'" in errors and "/count: required" in errors
    junk = await browser.post(target, data={**base, "input_json": "{oops"})
    assert junk.status_code == 422 and "not JSON" in junk.text
    good = await browser.post(target, data={**base, "input_json": '{"customer": "Bo", "count": 1, "tier": "gold"}'})
    assert good.status_code == 303, good.text[:500]
    viewer = await sign_in(tenant, ("viewer",))
    refused = await viewer.post(target, data={**base, "csrf_token": csrf_of((await viewer.get("/runs")).text),
                                              "input_json": "{}"})
    assert refused.status_code == 403 and "runs:start" in refused.text
