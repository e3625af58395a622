"""A provider's ``max_tokens_param``: the answer cap goes out as ``max_tokens`` or ``max_completion_tokens``."""

from __future__ import annotations

import httpx
import pytest

from app.config import Settings
from tests.fakes.model_server import ModelServer, Turn
from tests.support.providers import add_provider, model_name
from tests.support.runs import create_workflow, name, start_run, step, wait_run
from tests.support.tenants import TenantKey

pytestmark = pytest.mark.xdist_group("engine")


async def test_each_provider_sends_the_cap_under_its_parameter_name(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, model_server: ModelServer
) -> None:
    plain, reasoning = model_name(), model_name()
    model_server.script(plain, [Turn.final("plain answer")])
    model_server.script(reasoning, [Turn.final("reasoned answer")])
    await add_provider(client, tenant.headers, model_server, plain, name="local")
    await add_provider(client, tenant.headers, model_server, reasoning, name="openai",
                       max_tokens_param="max_completion_tokens")
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [
        {"id": "plain", "llm": {"model": f"local/{plain}", "prompt": "hi", "max_tokens": 300}},
        {"id": "reasoning", "llm": {"model": f"openai/{reasoning}", "prompt": "hi", "max_tokens": 300}},
    ])
    run = await wait_run(client, tenant.headers, (await start_run(client, tenant.headers, workflow, {}))["id"])
    assert run["status"] == "succeeded", run
    assert step(run, "reasoning")["output"] == "reasoned answer"
    (sent_plain,) = model_server.calls(plain)
    assert sent_plain.body["max_tokens"] == 300 and "max_completion_tokens" not in sent_plain.body
    (sent_reasoning,) = model_server.calls(reasoning)
    assert sent_reasoning.body["max_completion_tokens"] == 300 and "max_tokens" not in sent_reasoning.body
