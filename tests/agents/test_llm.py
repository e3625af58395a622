"""``llm`` steps: one model call with a templated prompt, text or JSON output, usage and cost recorded."""

from __future__ import annotations

from decimal import Decimal

import httpx
import pytest

from app.config import Settings
from tests.fakes.model_server import ModelServer, Turn
from tests.support.providers import add_provider, model_name
from tests.support.runs import create_workflow, name, run_events, start_run, step, wait_run
from tests.support.tenants import TenantKey

pytestmark = pytest.mark.xdist_group("engine")


async def test_llm_step_renders_the_prompt_and_records_usage_and_cost(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, model_server: ModelServer
) -> None:
    model = model_name()
    model_server.script(model, [Turn.final("Paris.", usage=(1000, 50))])
    await add_provider(client, tenant.headers, model_server, model)
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [
        {"id": "ask", "llm": {"model": f"local/{model}", "system": "Answer in one word.",
                              "prompt": "Capital of ${{ input.country }}?"}},
        {"id": "after", "needs": ["ask"], "tool": "echo", "args": {"said": "${{ steps.ask.output }}"}},
    ])
    run = await wait_run(client, tenant.headers, (await start_run(client, tenant.headers, workflow,
                                                                  {"country": "France"}))["id"])
    assert run["status"] == "succeeded", run
    assert step(run, "ask")["output"] == "Paris."
    assert step(run, "after")["output"] == {"said": "Paris."}
    (request,) = model_server.calls(model)
    assert request.messages == [{"role": "system", "content": "Answer in one word."},
                                 {"role": "user", "content": "Capital of France?"}]
    assert request.body["max_tokens"] == worker.model_max_output_tokens
    (turn,) = [e for e in await run_events(client, tenant.headers, run["id"]) if e["type"] == "model_called"]
    # 1000 * $2/M + 50 * $8/M
    assert turn["data"]["input_tokens"] == 1000 and turn["data"]["output_tokens"] == 50
    assert Decimal(turn["data"]["cost_usd"]) == Decimal("0.0024")
    usage = (await client.get("/api/v1/budgets/usage", params={"run": run["id"]}, headers=tenant.headers)).json()
    assert Decimal(str(usage["run"]["cost_usd"])) == Decimal("0.0024"), usage
    assert usage["run"]["tokens"] == 1050


async def test_llm_json_output_is_validated_against_the_schema(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, model_server: ModelServer
) -> None:
    good, bad = model_name(), model_name()
    model_server.script(good, [Turn.final('```json\n{"city": "Paris", "population": 2100000}\n```')])
    model_server.script(bad, [Turn.final('{"city": 42}')])
    await add_provider(client, tenant.headers, model_server, good, bad)
    schema = {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}
    results = {}
    for model in (good, bad):
        workflow = name()
        await create_workflow(client, tenant.headers, workflow, [
            {"id": "ask", "llm": {"model": f"local/{model}", "prompt": "Where?", "output_schema": schema}}])
        run = await start_run(client, tenant.headers, workflow)
        results[model] = await wait_run(client, tenant.headers, run["id"])
    assert step(results[good], "ask")["output"] == {"city": "Paris", "population": 2100000}
    assert model_server.calls(good)[0].body["response_format"] == {"type": "json_object"}
    failed = step(results[bad], "ask")
    assert results[bad]["status"] == "failed" and failed["error"]["class"] == "output_invalid"
    assert "city: 42 is not of type 'string'" in failed["error"]["message"]


async def test_model_steps_are_checked_when_the_workflow_is_created(
    client: httpx.AsyncClient, tenant: TenantKey, model_server: ModelServer
) -> None:
    model = model_name()
    await add_provider(client, tenant.headers, model_server, model)
    too_many = [f"t{i}" for i in range(21)]
    r = await client.post("/api/v1/workflows", headers=tenant.headers, json={"name": name(), "definition": {"steps": [
        {"id": "a", "llm": {"model": "nobody/x", "prompt": "hi"}},
        {"id": "b", "llm": {"model": f"local/{model}-nope", "prompt": "hi"}},
        {"id": "c", "agent": {"model": f"local/{model}", "input": "go", "tools": too_many}},
        {"id": "d", "agent": {"model": f"local/{model}", "input": "go", "tools": ["echo", "missing"]}},
        {"id": "e", "llm": {"model": "no-slash", "output": "text", "output_schema": {"type": "object"}}},
    ]}})
    assert r.status_code == 422, r.text
    errors = {e["pointer"]: e["message"] for e in r.json()["errors"]}
    assert "unknown provider 'nobody'" in errors["/definition/steps/0/llm/model"]
    assert "has no model" in errors["/definition/steps/1/llm/model"]
    assert "at most 20 tools" in errors["/definition/steps/2/agent/tools"]
    assert "unknown tool 'missing'" in errors["/definition/steps/3/agent/tools/1"]
    assert "<provider>/<model>" in errors["/definition/steps/4/llm/model"]
    assert "missing required field 'prompt'" in errors["/definition/steps/4/llm"]
    assert "needs output 'json'" in errors["/definition/steps/4/llm/output"]


async def test_a_model_server_on_a_private_address_needs_the_tenant_allowlist(
    client: httpx.AsyncClient, tenant: TenantKey, strict_worker: Settings, model_server: ModelServer
) -> None:
    model = model_name()
    model_server.script(model, [Turn.final("hello")])
    await add_provider(client, tenant.headers, model_server, model)
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [
        {"id": "ask", "llm": {"model": f"local/{model}", "prompt": "hi"}}])
    run = await wait_run(client, tenant.headers, (await start_run(client, tenant.headers, workflow))["id"])
    assert run["status"] == "failed" and step(run, "ask")["error"]["class"] == "forbidden_destination", run
    assert model_server.calls(model) == []
    await client.put("/api/v1/settings", json={"http_allowlist": ["127.0.0.1"]}, headers=tenant.headers)
    run = await wait_run(client, tenant.headers, (await start_run(client, tenant.headers, workflow))["id"])
    assert run["status"] == "succeeded" and step(run, "ask")["output"] == "hello", run


async def test_a_hanging_model_hits_the_step_timeout_and_a_garbled_answer_fails_the_step(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, model_server: ModelServer
) -> None:
    slow, garbled = model_name(), model_name()
    model_server.script(slow, [Turn.hang(30)])
    model_server.script(garbled, [Turn.raw("<html>502 Bad Gateway</html>")])
    await add_provider(client, tenant.headers, model_server, slow, garbled)
    runs = {}
    for model in (slow, garbled):
        workflow = name()
        await create_workflow(client, tenant.headers, workflow, [
            {"id": "ask", "timeout_s": 0.5, "retry": {"max_attempts": 2, "backoff_base_s": 0.05},
             "llm": {"model": f"local/{model}", "prompt": "hi"}}])
        runs[model] = await start_run(client, tenant.headers, workflow)
    hung = step(await wait_run(client, tenant.headers, runs[slow]["id"]), "ask")
    assert hung["status"] == "failed" and [a["error"]["class"] for a in hung["attempts"]] == ["timeout", "timeout"]
    assert len(model_server.calls(slow)) == 2
    bad = step(await wait_run(client, tenant.headers, runs[garbled]["id"]), "ask")
    assert bad["error"]["class"] == "model_bad_response" and len(bad["attempts"]) == 1, bad
    assert "not JSON" in bad["error"]["message"]
