"""Traces: off by default; with an OTLP endpoint, the API and workers send the spans of a run (request,
step attempts, agent, model and tool calls) to a real OTLP/HTTP receiver, without arguments or secrets."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NonRecordingSpan

from app import tracing
from app.config import Settings
from tests.fakes.model_server import ModelServer, Turn
from tests.fakes.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.fakes.tool_server import ToolServer
from tests.support.processes import api_and_worker
from tests.support.providers import add_provider, model_name
from tests.support.runs import create_workflow, name, start_run, wait_for, wait_run
from tests.support.tenants import MakeTenant
from tests.support.tools import http_tool, register

SECRET = "tok-0f9e8d7c6b5a4f3e"
CARD = "4000000000000077"


def test_tracing_is_off_unless_an_exporter_or_endpoint_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                     "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(variable, raising=False)
    assert not tracing.enabled()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    assert tracing.enabled()
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not tracing.enabled()
    monkeypatch.delenv("OTEL_SDK_DISABLED")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert not tracing.enabled()


def test_content_is_built_only_when_asked_for_and_the_span_is_sampled() -> None:
    sampled = TracerProvider().get_tracer("test").start_span("chat m")
    assert sampled.is_recording()
    assert tracing.records_content(sampled, Settings(trace_content=True))
    assert not tracing.records_content(sampled, Settings())
    assert not tracing.records_content(NonRecordingSpan(sampled.get_span_context()), Settings(trace_content=True))


def test_content_longer_than_the_cap_is_cut_within_it_and_marked() -> None:
    assert tracing.cut("short", 256) == "short"
    text = "é" * 1000  # two bytes each: the cut must not split one
    cut = tracing.cut(text, 256)
    assert len(cut.encode()) <= 256 and cut.endswith("…[truncated: 2000 bytes]") and cut.startswith("éé")


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as server:
        yield server


@pytest.mark.xdist_group("processes")
async def test_a_runs_spans_reach_the_collector_with_genai_attributes_and_no_secrets(
    settings: Settings, make_tenant: MakeTenant, tool_server: ToolServer, receiver: OtlpReceiver, tmp_path: Path,
) -> None:
    tenant = await make_tenant()
    model = model_name()
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.base_url, "OTEL_BSP_SCHEDULE_DELAY": "50",
            "OTEL_TRACES_EXPORTER": "otlp", "STEWARD_TRACE_CONTENT": ""}  # empty: the default, off
    with ModelServer() as models:
        models.script(model, [Turn.tool_calls([("charge", {"card": CARD})], usage=(120, 30)),
                              Turn.final("charged", usage=(160, 5))])
        async with (api_and_worker(settings, tmp_path, **otel) as url,
                    httpx.AsyncClient(base_url=url, timeout=30) as client):
            await client.put("/api/v1/secrets/pay_key", json={"value": SECRET}, headers=tenant.headers)
            card = {"type": "object", "properties": {"card": {"type": "string", "writeOnly": True}}}
            await register(client, tenant.headers, name="charge", input_schema=card, executor=http_tool(
                tool_server.url + "/echo", headers={"Authorization": "Bearer ${{ secrets.pay_key }}"}))
            await add_provider(client, tenant.headers, models, model, name="local")
            workflow, waits = name(), name()
            await create_workflow(client, tenant.headers, workflow, [
                {"id": "agent", "agent": {"model": f"local/{model}", "input": "pay", "tools": ["charge"]}}])
            await create_workflow(client, tenant.headers, waits, [
                {"id": "a", "tool": "echo"}, {"id": "w", "needs": ["a"], "wait": {"signal": "go"}},
                {"id": "b", "needs": ["w"], "tool": "echo"}])
            run = await start_run(client, tenant.headers, workflow)
            done = await wait_run(client, tenant.headers, run["id"], timeout=60)
            assert done["status"] == "succeeded"
            paused = await start_run(client, tenant.headers, waits)
            await wait_for(client, tenant.headers, paused["id"], lambda r: r["status"] == "waiting", timeout=30)
            signalled = await client.post(f"/api/v1/runs/{paused['id']}/signals/go", json={"payload": {}},
                                          headers=tenant.headers)
            assert signalled.status_code == 200, signalled.text
            resumed = await wait_run(client, tenant.headers, paused["id"], timeout=30)
            assert resumed["status"] == "succeeded"
            assert (await client.get("/healthz")).status_code == 200
        # Both processes have stopped: what they buffered was sent on the way out.

    spans = receiver.spans
    by_name = {s.name: s for s in spans}
    services = {s.service for s in spans}
    assert {"steward-api", "steward-worker"} <= services, services
    assert any(s.service == "steward-api" and s.name.startswith("POST /api/v1/runs") for s in spans), by_name.keys()
    assert not any("healthz" in s.name or "metrics" in s.name for s in spans)

    process = next(s for s in spans
                   if s.name.startswith("process ") and s.attributes.get("steward.run.id") == run["id"])
    assert process.kind == "SPAN_KIND_CONSUMER"
    assert process.attributes["messaging.system"] == "arq"
    assert process.attributes["messaging.destination.name"] == f"{settings.queue_prefix}:normal"
    assert (process.attributes["steward.step.id"], process.attributes["steward.step.kind"]) == ("agent", "agent")
    assert process.attributes["steward.tenant.id"] == str(tenant.tenant_id)

    # The request that started the run and the worker's first attempt are one trace, which the run shows.
    started = [s for s in spans if s.kind == "SPAN_KIND_SERVER" and s.name == "POST /api/v1/runs"
               and s.trace_id == process.trace_id]
    assert len(started) == 1 and started[0].service == "steward-api" and done["trace_id"] == process.trace_id
    # Named by the route the router found (not by the instrumentation's own scan of every route).
    assert started[0].attributes["http.route"] == "/api/v1/runs"
    assert not [s.name for s in spans if s.kind == "SPAN_KIND_SERVER" and " " not in s.name]
    # A run that waited goes on in the trace of the request that woke it, linked to its first trace.
    def step_span(step_id: str) -> ReceivedSpan:
        return next(s for s in spans if s.name.startswith("process ") and s.attributes.get("steward.run.id")
                    == paused["id"] and s.attributes["steward.step.id"] == step_id)
    first, after = step_span("a"), step_span("b")
    assert first.trace_id == resumed["trace_id"] and after.trace_id != first.trace_id
    assert after.links == [first.trace_id]
    assert any(s.name.startswith("POST /api/v1/runs/{run_id}/signals") and s.trace_id == after.trace_id
               for s in spans), sorted({s.name for s in spans})

    agent = by_name["invoke_agent agent"]
    assert agent.parent_id == process.span_id and agent.attributes["gen_ai.operation.name"] == "invoke_agent"
    chats = [s for s in spans if s.name == f"chat {model}"]
    assert len(chats) == 2 and all(c.parent_id == agent.span_id for c in chats)
    assert chats[0].attributes["gen_ai.provider.name"] == "local"
    assert chats[0].attributes["gen_ai.request.model"] == model
    assert sorted((c.attributes["gen_ai.usage.input_tokens"], c.attributes["gen_ai.usage.output_tokens"])
                  for c in chats) == [(120, 30), (160, 5)]
    tool = by_name["execute_tool charge"]
    assert tool.attributes["gen_ai.tool.name"] == "charge" and tool.attributes["gen_ai.tool.call.id"]
    assert tool.trace_id == process.trace_id
    # The tool call went out with the trace: the tool server saw a traceparent of this trace.
    sent = [c.headers.get("traceparent", "") for c in tool_server.calls_to("/echo")]
    assert any(header.split("-")[1] == tool.trace_id for header in sent if header), sent

    everything = repr(spans)
    assert SECRET not in everything and CARD not in everything
    # Content is opt-in: without STEWARD_TRACE_CONTENT no span has any of it.
    assert not [(s.name, key) for s in spans for key in s.attributes if key in tracing.CONTENT_ATTRIBUTES]
    # Database spans are asked for separately (STEWARD_TRACE_DB, tests/test_tracing_db.py).
    assert not any("db.system" in s.attributes or "db.system.name" in s.attributes for s in spans)


@pytest.mark.xdist_group("processes")
async def test_with_trace_content_on_spans_carry_prompts_answers_and_tool_io_redacted_and_cut(
    settings: Settings, make_tenant: MakeTenant, tool_server: ToolServer, receiver: OtlpReceiver, tmp_path: Path,
) -> None:
    tenant = await make_tenant()
    model = model_name()
    limit = 1024
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.base_url, "OTEL_BSP_SCHEDULE_DELAY": "50",
            "OTEL_TRACES_EXPORTER": "otlp", "STEWARD_TRACE_CONTENT": "true",
            "STEWARD_TRACE_CONTENT_MAX_BYTES": str(limit)}
    answer = "charged: " + "z" * 3000  # longer than the cap
    with ModelServer() as models:
        models.script(model, [Turn.tool_calls([("charge", {"card": CARD, "amount": 12})]), Turn.final(answer)])
        async with (api_and_worker(settings, tmp_path, **otel) as url,
                    httpx.AsyncClient(base_url=url, timeout=30) as client):
            await client.put("/api/v1/secrets/pay_key", json={"value": SECRET}, headers=tenant.headers)
            schema = {"type": "object", "properties": {"card": {"type": "string", "writeOnly": True},
                                                       "amount": {"type": "number"}}}
            # The tool answers with the request's headers: the secret comes back, the card does not.
            await register(client, tenant.headers, name="charge", input_schema=schema,
                           response="${{ body.headers }}", executor=http_tool(
                               tool_server.url + "/echo", headers={"Authorization": "Bearer ${{ secrets.pay_key }}"}))
            await add_provider(client, tenant.headers, models, model, name="local")
            workflow = name()
            await create_workflow(client, tenant.headers, workflow, [
                {"id": "agent", "agent": {"model": f"local/{model}", "instructions": "You take payments.",
                                          "input": "charge 12 to my card", "tools": ["charge"]}}])
            run = await start_run(client, tenant.headers, workflow)
            done = await wait_run(client, tenant.headers, run["id"], timeout=60)
            assert done["status"] == "succeeded", done
    assert any(SECRET in str(call.headers) for call in tool_server.calls_to("/echo"))  # it was really sent

    spans = [s for s in receiver.spans if s.trace_id == done["trace_id"]]
    chats = sorted((s for s in spans if s.name == f"chat {model}"), key=lambda s: s.attributes["steward.turn"])
    assert len(chats) == 2
    first_in = json.loads(chats[0].attributes["gen_ai.input.messages"])
    assert first_in == [{"role": "system", "parts": [{"type": "text", "content": "You take payments."}]},
                        {"role": "user", "parts": [{"type": "text", "content": "charge 12 to my card"}]}]
    [first_out] = json.loads(chats[0].attributes["gen_ai.output.messages"])
    assert first_out["role"] == "assistant" and first_out["finish_reason"] == "tool_call"
    [call] = first_out["parts"]
    assert call["type"] == "tool_call" and call["name"] == "charge"
    assert call["arguments"] == {"card": "[redacted]", "amount": 12}

    tool = next(s for s in spans if s.name == "execute_tool charge")
    assert json.loads(tool.attributes["gen_ai.tool.call.arguments"]) == {"card": "[redacted]", "amount": 12}
    result = json.loads(tool.attributes["gen_ai.tool.call.result"])
    assert result["authorization"] == "Bearer [redacted]", result

    second_in = json.loads(chats[1].attributes["gen_ai.input.messages"])
    assert [m["role"] for m in second_in] == ["system", "user", "assistant", "tool"]
    assert second_in[2]["parts"][0]["arguments"] == {"card": "[redacted]", "amount": 12}
    response = second_in[3]["parts"][0]
    assert response["type"] == "tool_call_response" and response["id"] == call["id"]
    assert "Bearer [redacted]" in response["response"]
    # The answer is longer than the cap: cut, within the cap, saying so.
    answered = chats[1].attributes["gen_ai.output.messages"]
    assert len(answered.encode()) <= limit and answered.endswith("bytes]") and "…[truncated: " in answered
    assert answered.startswith('[{"role": "assistant", "parts": [{"type": "text", "content": "charged: zzz')

    # Neither the writeOnly value nor the secret is in any attribute or event of any span sent.
    everything = receiver.spans
    assert not [(s.name, key) for s in everything for key, value in s.attributes.items()
                if CARD in str(value) or SECRET in str(value)]
    assert CARD not in repr(everything) and SECRET not in repr(everything)


@pytest.mark.xdist_group("processes")
async def test_a_sampled_out_request_produces_no_worker_spans(
    settings: Settings, make_tenant: MakeTenant, receiver: OtlpReceiver, tmp_path: Path,
) -> None:
    tenant = await make_tenant()
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.base_url, "OTEL_BSP_SCHEDULE_DELAY": "50",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"}
    async with (api_and_worker(settings, tmp_path, **otel) as url,
                httpx.AsyncClient(base_url=url, timeout=30) as client):
        workflow = name()
        await create_workflow(client, tenant.headers, workflow, [{"id": "a", "tool": "echo"},
                                                                 {"id": "b", "needs": ["a"], "tool": "echo"}])
        run = await wait_run(client, tenant.headers, (await start_run(client, tenant.headers, workflow))["id"])
        assert run["status"] == "succeeded"
    # The decision not to sample travelled with the run: its steps followed it, nothing was sent.
    assert run["trace_id"] is not None
    assert [s.name for s in receiver.spans] == []
