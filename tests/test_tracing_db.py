"""Database spans (``STEWARD_TRACE_DB``): each statement a client span inside the request and step spans,
statement text without parameters, and nothing from the background loops (reconciler, health checks,
metrics) that run outside any trace. Off, with tracing on: no database span (tests/test_tracing.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.config import Settings
from tests.fakes.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.support.processes import api_and_worker
from tests.support.runs import create_workflow, name, start_run, wait_for, wait_run
from tests.support.tenants import MakeTenant

MARKER = "in-7d1c5e9a3b-put"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as server:
        yield server


def is_db(span: ReceivedSpan) -> bool:
    return span.attributes.get("db.system") == "postgresql"


@pytest.mark.xdist_group("processes")
async def test_statements_are_spans_inside_requests_and_steps_only_without_parameters(
    settings: Settings, make_tenant: MakeTenant, receiver: OtlpReceiver, tmp_path: Path,
) -> None:
    tenant = await make_tenant()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.base_url, "OTEL_BSP_SCHEDULE_DELAY": "50",
           "OTEL_TRACES_EXPORTER": "otlp", "STEWARD_TRACE_DB": "true", "STEWARD_RECONCILE_INTERVAL_S": "1"}
    async with (api_and_worker(settings, tmp_path, **env) as url,
                httpx.AsyncClient(base_url=url, timeout=30) as client):
        chain, waits = name(), name()
        await create_workflow(client, tenant.headers, chain, [
            {"id": "a", "tool": "echo", "args": {"note": "${{ input.note }}"}},
            {"id": "b", "needs": ["a"], "tool": "echo", "args": {"note": "${{ input.note }}"}}])
        await create_workflow(client, tenant.headers, waits, [{"id": "w", "wait": {"signal": "never"}}])
        run = await start_run(client, tenant.headers, chain, {"note": MARKER})
        done = await wait_run(client, tenant.headers, run["id"], timeout=30)
        assert done["status"] == "succeeded"
        # Only the reconciler fails a run past its deadline: once it has, its loop has polled while
        # statements were traced, and so have the health checks and metrics scrapes below.
        overdue = await start_run(client, tenant.headers, waits, {"note": MARKER}, limits={"timeout_s": 1})
        failed = await wait_for(client, tenant.headers, overdue["id"], lambda r: r["status"] == "failed", timeout=30)
        assert failed["error"]["class"] == "run_timeout"
        for _ in range(3):
            assert (await client.get("/readyz")).status_code == 200
            assert (await client.get("/metrics")).status_code == 200
    # Both processes have stopped: what they buffered was sent on the way out.

    spans = receiver.spans
    by_id = {s.span_id: s for s in spans}
    statements = [s for s in spans if is_db(s)]
    assert statements and all(s.kind == "SPAN_KIND_CLIENT" and s.attributes["db.statement"] for s in statements)

    request = next(s for s in spans if s.kind == "SPAN_KIND_SERVER" and s.name == "POST /api/v1/runs"
                   and s.trace_id == done["trace_id"])
    steps = [s for s in spans if s.name.startswith("process ") and s.attributes.get("steward.run.id") == run["id"]]
    assert sorted(s.attributes["steward.step.id"] for s in steps) == ["a", "b"]
    for parent in (request, *steps):
        children = [s for s in statements if s.parent_id == parent.span_id]
        assert children and all(s.trace_id == parent.trace_id for s in children), parent.name
        assert {s.service for s in children} == {parent.service}

    # No statement started a trace: each one's parent is a span of ours that was sent too.
    orphans = [s for s in statements if s.parent_id not in by_id or is_db(by_id[s.parent_id])]
    assert orphans == [], sorted({s.attributes["db.statement"] for s in orphans})
    assert {s.trace_id for s in statements} <= {s.trace_id for s in spans if not is_db(s)}

    # Statement text only: the run's input went in as parameters, which no span carries.
    assert not any("db.statement.parameters" in s.attributes for s in spans)
    assert MARKER not in repr(spans)
