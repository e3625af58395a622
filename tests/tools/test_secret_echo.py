"""A tool that echoes a credential back never gets it recorded: not as a JSON key, not cut in two."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.config import Settings
from app.tools.redact import REDACTED, cut_scrubbed, redact_spec, scrub, secret_forms
from tests.fakes.tool_server import ToolServer
from tests.support.runs import create_workflow, name, start_run, step, wait_run
from tests.support.tenants import TenantKey
from tests.support.tools import http_tool, register

SECRET = "tok-5e4d3c2b1a09f8e7d6c5"
MIN_RESPONSE_BYTES = 1024  # the smallest max_response_bytes a tool may set


# --- the pure parts ----------------------------------------------------------------------------------


def test_scrub_replaces_secrets_in_keys_and_values() -> None:
    value = {SECRET: {"nested": [f"Bearer {SECRET}", {f"x{SECRET}y": 1}]}, "plain": "ok"}
    assert scrub(value, {SECRET}) == {REDACTED: {"nested": [f"Bearer {REDACTED}", {f"x{REDACTED}y": 1}]}, "plain": "ok"}


def test_a_spec_shown_to_people_keeps_secret_references_and_hides_literal_credentials() -> None:
    spec = {
        "name": "pay",
        "executor": {"kind": "http", "url": "https://x.example", "headers": {
            "Authorization": "Bearer ${{ secrets.pay_key }}", "X-Api-Key": "sk-live-123",
            "Cookie": "session=abc; ${{ secrets.c }}", "Accept": "application/json", "X-Token": "${{ secrets.t }}",
        }},
        "input_schema": {"type": "object", "properties": {
            "card": {"type": "string", "writeOnly": True, "default": "4111", "examples": ["4242"], "enum": ["1"]},
            "nested": {"type": "object", "writeOnly": True, "properties": {"pin": {"const": "0000"}}},
            "note": {"type": "string", "default": "kept"},
        }},
    }
    shown = redact_spec(spec)
    headers = shown["executor"]["headers"]
    assert headers == {"Authorization": "Bearer ${{ secrets.pay_key }}", "X-Api-Key": REDACTED, "Cookie": REDACTED,
                       "Accept": "application/json", "X-Token": "${{ secrets.t }}"}
    card = shown["input_schema"]["properties"]["card"]
    assert (card["default"], card["examples"], card["enum"], card["type"]) == (REDACTED, REDACTED, REDACTED, "string")
    assert shown["input_schema"]["properties"]["nested"]["properties"]["pin"]["const"] == REDACTED
    assert shown["input_schema"]["properties"]["note"]["default"] == "kept"
    assert spec["executor"]["headers"]["X-Api-Key"] == "sk-live-123"  # the stored spec is left alone


def test_scrub_replaces_a_longer_secret_before_one_it_contains() -> None:
    assert scrub("abc-abcdef", {"abc", "abcdef"}) == f"{REDACTED}-{REDACTED}"


def test_a_secret_escaped_inside_a_json_string_is_found_too() -> None:
    secret = 'pa"ss\\wörd'
    raw = json.dumps({"echo": secret}).encode()
    assert secret_forms([secret])  # as is, \\-escaped, and \\u-escaped
    scrubbed, truncated = cut_scrubbed(raw, 10_000, secret_forms([secret]))
    assert not truncated
    assert json.loads(scrubbed) == {"echo": REDACTED}


# Letters that "[redacted]" does not use, so a secret can never be read inside the marker itself.
secrets_st = st.text(alphabet="bfghkmno-", min_size=1, max_size=12)


@given(
    secret=secrets_st,
    parts=st.lists(st.one_of(st.just(None), st.text(alphabet="bfghkmnoxyz", max_size=30)), max_size=8),
    limit=st.integers(min_value=0, max_value=120),
    extra=st.integers(min_value=0, max_value=20),
)
def test_a_cut_body_keeps_no_part_of_a_secret_at_its_end(
    secret: str, parts: list[str | None], limit: int, extra: int
) -> None:
    # Bodies made of filler and whole secrets, read as the tool executor reads them: the limit plus the
    # longest form past it (or less, when the body ends first).
    body = "".join(secret if part is None else part for part in parts).encode()
    forms = secret_forms([secret])
    received = body[: limit + len(forms[0]) + extra]
    cut, truncated = cut_scrubbed(received, limit, forms)
    assert len(cut) <= limit
    assert truncated == (len(received.replace(secret.encode(), REDACTED.encode())) > limit)
    text = cut.decode()
    if truncated:
        # What a reader sees cannot be completed into the secret: no proper prefix of it ends the text.
        assert not any(text.endswith(secret[:k]) for k in range(1, len(secret)))
    assert secret not in text


# --- through a real worker and a real tool server ------------------------------------------------------

pytestmark_engine = pytest.mark.xdist_group("engine")


async def run_tool(client: httpx.AsyncClient, tenant: TenantKey, url: str, **spec: object) -> dict[str, object]:
    secret_name = "echo_key"
    await client.put(f"/api/v1/secrets/{secret_name}", json={"value": SECRET}, headers=tenant.headers)
    tool = f"t_{name()}"
    await register(client, tenant.headers, name=tool, executor=http_tool(
        url, headers={"Authorization": "Bearer ${{ secrets.echo_key }}"}), **spec)
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [{"id": "call", "tool": tool}])
    run = await start_run(client, tenant.headers, workflow)
    return await wait_run(client, tenant.headers, run["id"])


@pytestmark_engine
async def test_a_secret_echoed_as_a_json_key_is_redacted(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, tool_server: ToolServer
) -> None:
    run = await run_tool(client, tenant, tool_server.url + "/echo-as-key")
    assert run["status"] == "succeeded", run["steps"]
    assert step(run, "call")["output"]["body"] == {"by_header": {f"Bearer {REDACTED}": True}}
    everything = [run, (await client.get(f"/api/v1/runs/{run['id']}/events", headers=tenant.headers)).json()]
    assert SECRET[:6] not in json.dumps(everything)


@pytest.mark.parametrize("into_secret", [1, 5, len(SECRET) - 1])
@pytestmark_engine
async def test_a_response_cut_inside_the_secret_keeps_no_prefix_of_it(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, tool_server: ToolServer, into_secret: int
) -> None:
    # The cut at max_response_bytes falls `into_secret` characters into the echoed secret.
    before = MIN_RESPONSE_BYTES - len("Bearer ") - into_secret
    run = await run_tool(client, tenant, f"{tool_server.url}/pad?before={before}",
                         max_response_bytes=MIN_RESPONSE_BYTES)
    assert run["status"] == "succeeded", run["steps"]
    output = step(run, "call")["output"]
    assert output["truncated"] is True
    assert output["body"] == ("x" * before + f"Bearer {REDACTED}" + "y" * 4096)[:MIN_RESPONSE_BYTES]
    assert SECRET[:into_secret] not in output["body"].replace("x", "")
