"""Traces and run events: the queue hand-off is a ``send`` producer span that the worker's ``process`` span
continues, each run event keeps the trace it was written in (the API returns it, the dashboard links it
with ``STEWARD_TRACE_URL``), and with tracing off there is neither a trace id nor a span."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from app.config import Settings
from tests.fakes.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.support.env import ROOT
from tests.support.processes import api_and_worker
from tests.support.runs import create_workflow, name, start_run, wait_run
from tests.support.signin import SignIn
from tests.support.tenants import MakeTenant, TenantKey

TRACE_URL = "https://tempo.example/trace/{trace_id}"
# a first; b and c after it, side by side. With one step per worker job, the worker that ran a runs one of
# them inline and sends the other through the queue.
STEPS = [{"id": "a", "tool": "echo"}, {"id": "b", "needs": ["a"], "tool": "echo"},
         {"id": "c", "needs": ["a"], "tool": "echo"}]


@dataclass(frozen=True)
class Traced:
    tenant: TenantKey
    run: dict[str, Any]
    events: list[dict[str, Any]]
    spans: list[ReceivedSpan]


async def _run_and_events(settings: Settings, make_tenant: MakeTenant, logs: Any, receiver: OtlpReceiver,
                          **env: str) -> tuple[TenantKey, dict[str, Any], list[dict[str, Any]]]:
    tenant = await make_tenant()
    async with (api_and_worker(settings, logs, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.base_url,
                               OTEL_BSP_SCHEDULE_DELAY="50", STEWARD_WORKER_BATCH="1", **env) as url,
                httpx.AsyncClient(base_url=url, timeout=30) as client):
        workflow = name()
        await create_workflow(client, tenant.headers, workflow, STEPS)
        run = await wait_run(client, tenant.headers, (await start_run(client, tenant.headers, workflow))["id"])
        assert run["status"] == "succeeded", run
        answer = await client.get(f"/api/v1/runs/{run['id']}/events", headers=tenant.headers)
        assert answer.status_code == 200, answer.text
        # Both processes stop on the way out: what they buffered is sent then.
    return tenant, run, answer.json()["items"]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def traced(settings: Settings, make_tenant: MakeTenant, tmp_path_factory: pytest.TempPathFactory) -> Traced:
    """A run of STEPS through `steward api` and `steward worker` sending spans to a real OTLP receiver."""
    with OtlpReceiver() as receiver:
        tenant, run, events = await _run_and_events(settings, make_tenant, tmp_path_factory.mktemp("traced"),
                                                    receiver, OTEL_TRACES_EXPORTER="otlp")
        return Traced(tenant, run, events, receiver.spans)


@pytest.mark.xdist_group("processes")
async def test_the_send_span_is_the_parent_of_the_process_span_in_the_trace_of_the_request(
    traced: Traced, settings: Settings
) -> None:
    run_id, trace_id, queue = traced.run["id"], traced.run["trace_id"], f"{settings.queue_prefix}:normal"
    of_run = [s for s in traced.spans if s.attributes.get("steward.run.id") == run_id]
    sends = {s.attributes["steward.step.id"]: s for s in of_run if s.name == f"send {queue}"}
    processes = {s.attributes["steward.step.id"]: s for s in of_run if s.name == f"process {queue}"}
    (request,) = [s for s in traced.spans if s.kind == "SPAN_KIND_SERVER" and s.name == "POST /api/v1/runs"
                  and s.trace_id == trace_id]
    assert trace_id is not None and {s.trace_id for s in of_run} == {trace_id}
    assert set(processes) == {"a", "b", "c"}

    # The request queued a: its send span is the request's child, and the parent of a's process span.
    send = sends["a"]
    assert send.kind == "SPAN_KIND_PRODUCER" and send.service == "steward-api"
    assert send.parent_id == request.span_id and processes["a"].parent_id == send.span_id
    assert {key: send.attributes.get(key) for key in (
        "messaging.system", "messaging.destination.name", "messaging.operation.type", "steward.tenant.id",
        "steward.step.attempt")} == {
        "messaging.system": "arq", "messaging.destination.name": queue, "messaging.operation.type": "send",
        "steward.tenant.id": str(traced.tenant.tenant_id), "steward.step.attempt": 1}
    assert processes["a"].kind == "SPAN_KIND_CONSUMER"

    # The worker that ran a sent one of b and c through the queue (a send span, child of a's process
    # span) and ran the other inline (no send: a child of a's process span).
    (queued,) = set(sends) - {"a"}
    (inline,) = {"b", "c"} - {queued}
    assert sends[queued].service == "steward-worker" and sends[queued].parent_id == processes["a"].span_id
    assert processes[queued].parent_id == sends[queued].span_id
    assert processes[inline].parent_id == processes["a"].span_id


@pytest.mark.xdist_group("processes")
async def test_the_events_of_a_traced_run_carry_its_trace_id(traced: Traced) -> None:
    trace_id = traced.run["trace_id"]
    types = [event["type"] for event in traced.events]
    assert types.count("step_started") == 3 and "run_succeeded" in types, types
    # Written by the request, by the claims and by the attempts' outcomes: all in the run's one trace.
    assert {(event["type"], event["trace_id"]) for event in traced.events} == {(t, trace_id) for t in types}
    assert {event["trace_id"] for event in traced.run["events"]} == {trace_id}


@pytest.mark.xdist_group("processes")
async def test_the_run_page_links_the_trace_when_a_trace_url_is_set(
    traced: Traced, app: FastAPI, sign_in: SignIn
) -> None:
    trace_id, run_id = traced.run["trace_id"], traced.run["id"]
    browser = await sign_in(traced.tenant)
    link = (f'<a class="mono" href="https://tempo.example/trace/{trace_id}" rel="external noreferrer">'
            f'{trace_id}</a>')
    plain = app.state.settings
    app.state.settings = plain.model_copy(update={"trace_url": TRACE_URL})
    try:
        for path in (f"/runs/{run_id}", f"/runs/{run_id}/live"):
            page = await browser.get(path)
            assert page.status_code == 200, page.text
            assert page.text.count(link) == 1, path
        events = await browser.get(f"/runs/{run_id}", params={"tab": "events"})
    finally:
        app.state.settings = plain
    assert events.status_code == 200, events.text
    # The run's trace, and one link per event.
    assert events.text.count(link) == 1 + len(traced.events)


@pytest.mark.xdist_group("processes")
async def test_without_a_trace_url_the_run_page_shows_the_trace_id_as_text(
    traced: Traced, app: FastAPI, sign_in: SignIn
) -> None:
    assert app.state.settings.trace_url is None
    trace_id, run_id = traced.run["trace_id"], traced.run["id"]
    browser = await sign_in(traced.tenant)
    page = await browser.get(f"/runs/{run_id}", params={"tab": "events"})
    assert page.status_code == 200, page.text
    assert page.text.count(f'<span class="mono">{trace_id}</span>') == 1 + len(traced.events)
    assert "tempo.example" not in page.text and f'">{trace_id}</a>' not in page.text


@pytest.mark.xdist_group("processes")
async def test_with_tracing_off_events_have_no_trace_id_and_no_span_is_sent(
    settings: Settings, make_tenant: MakeTenant, tmp_path: Any
) -> None:
    with OtlpReceiver() as receiver:
        # An endpoint is set, but the exporter `none` turns tracing off.
        _, run, events = await _run_and_events(settings, make_tenant, tmp_path, receiver,
                                               OTEL_TRACES_EXPORTER="none")
        spans = receiver.spans
    assert run["trace_id"] is None
    assert len(events) >= 7 and [event["trace_id"] for event in events] == [None] * len(events)
    assert spans == []


@pytest.mark.parametrize("command", ["api", "worker"])
@pytest.mark.parametrize("bad", ["ftp://tempo.example/trace/{trace_id}", "https://tempo.example/trace",
                                 "tempo.example/trace/{trace_id}"])
def test_a_bad_trace_url_is_refused_at_start(command: str, bad: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEWARD_")}
    result = subprocess.run([sys.executable, "-m", "app.cli", command], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env={**env, "STEWARD_TRACE_URL": bad})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"steward {command}: invalid setting trace_url: Value error, STEWARD_TRACE_URL must be an http(s) address "
        "with {trace_id} in it, e.g. https://tempo.example/trace/{trace_id}"]
