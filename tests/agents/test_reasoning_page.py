"""The dashboard's reasoning chain of an agent step: every model turn and tool result, in order, escaped."""

from __future__ import annotations

import httpx
import pytest

from app.config import Settings
from tests.fakes.model_server import ModelServer, Turn
from tests.support.providers import add_provider, model_name
from tests.support.runs import create_workflow, name, start_run, wait_run
from tests.support.signin import SignIn
from tests.support.tenants import TenantKey

pytestmark = pytest.mark.xdist_group("engine")
XSS = "<img src=x onerror=alert(1)>"


async def test_the_reasoning_chain_shows_turns_calls_and_refusals_in_place(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, model_server: ModelServer, sign_in: SignIn
) -> None:
    model = model_name()
    model_server.script(model, [
        Turn.tool_calls([("echo", {"said": XSS})], content="Let me echo that."),
        Turn.tool_calls([("no_such_tool", {})]),
        Turn.final(f"Done: {XSS}"),
    ])
    await add_provider(client, tenant.headers, model_server, model, name="local")
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [
        {"id": "agent", "agent": {"model": f"local/{model}", "instructions": "Echo.", "input": "go",
                                  "tools": ["echo"]}}])
    run = await wait_run(client, tenant.headers, (await start_run(client, tenant.headers, workflow))["id"])
    assert run["status"] == "succeeded", run

    browser = await sign_in(tenant)
    run_page = (await browser.get(f"/runs/{run['id']}?tab=budget")).text
    # The budget meter counts against max_steps (25) the agent's 3 turns and the 1 call that ran (the
    # unknown tool was refused before it could count).
    assert "4 of 25" in run_page, run_page[run_page.find('class="meters"'):][:800]
    link = f"/runs/{run['id']}/steps/agent/conversation"
    assert f'href="{link}"' in (await browser.get(f"/runs/{run['id']}?tab=reasoning")).text
    page = await browser.get(link)
    assert page.status_code == 200, page.text
    text = page.text
    assert XSS not in text and "&lt;img src=x onerror=alert(1)&gt;" in text
    turns = [text.index(f"Model turn {seq}") for seq in range(3) if f"Model turn {seq}" in text]
    assert len(text.split("<h2>Model turn")) - 1 == 3, text
    assert turns == sorted(turns)
    assert "Let me echo that." in text and "Tool echo" in text
    # The unknown tool is refused and the refusal is shown where the model heard it.
    assert "refused or failed" in text and "no_such_tool" in text
    assert (await browser.get(f"/runs/{run['id']}/steps/nope/conversation")).status_code == 404
