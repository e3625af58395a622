"""Logs: one JSON object a line with what each record is about, text on request, and never a secret."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider

from app.config import Settings
from app.logs import Formatter, JsonFormatter, bind, bound
from tests.fakes.tool_server import ToolServer
from tests.support.processes import api_and_worker
from tests.support.runs import create_workflow, name, start_run, wait_run
from tests.support.tenants import MakeTenant
from tests.support.tools import http_tool, register

SECRET = "tok-5e1f0a2b9c8d7e6f"
CARD = "4000056655665556"


def record(message: str, *args: Any, exc_info: Any = None, **extra: Any) -> logging.LogRecord:
    made = logging.getLogger("steward.test").makeRecord(
        "steward.test", logging.WARNING, __file__, 1, message, args, exc_info, extra=extra)
    return made


def test_a_json_record_is_one_line_with_its_context_and_nothing_from_extra() -> None:
    try:
        raise ValueError("broken\nacross lines")
    except ValueError:
        failure = sys.exc_info()
    with bound(tenant="t-1", run="r-1", step="fetch", attempt=2, item=None):
        line = JsonFormatter().format(record("step %s failed", "fetch", exc_info=failure, card=CARD))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["time"].endswith("Z") and entry["level"] == "WARNING" and entry["logger"] == "steward.test"
    assert entry["message"] == "step fetch failed"
    assert (entry["tenant"], entry["run"], entry["step"], entry["attempt"]) == ("t-1", "r-1", "fetch", 2)
    assert "item" not in entry  # None values are left out
    assert entry["exception"].startswith("Traceback") and "ValueError: broken\nacross lines" in entry["exception"]
    assert CARD not in line  # what code passes in `extra` is not logged
    # Outside the block, the context is gone.
    assert "run" not in json.loads(JsonFormatter().format(record("later")))


async def test_bind_holds_for_the_task_and_the_tasks_it_starts_only() -> None:
    async def child() -> dict[str, Any]:
        return dict(json.loads(JsonFormatter().format(record("child"))))

    async def request() -> dict[str, Any]:
        bind(tenant="t-2", principal="key:k")
        return await asyncio.create_task(child())

    assert (await asyncio.create_task(request()))["tenant"] == "t-2"
    assert "tenant" not in json.loads(JsonFormatter().format(record("after")))


def test_a_record_inside_a_span_carries_its_trace_and_span_ids() -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        entry = json.loads(JsonFormatter().format(record("inside")))
    context = span.get_span_context()
    assert (entry["trace_id"], entry["span_id"]) == (format(context.trace_id, "032x"), format(context.span_id, "016x"))
    assert "trace_id" not in json.loads(JsonFormatter().format(record("outside")))


def test_the_text_form_is_one_line_a_record_for_a_terminal() -> None:
    line = Formatter().format(record("PostgreSQL unreachable"))
    assert line.endswith("Z WARNING steward.test: PostgreSQL unreachable")


@pytest.mark.xdist_group("processes")
async def test_no_line_of_a_run_that_used_a_secret_holds_it(
    settings: Settings, make_tenant: MakeTenant, tool_server: ToolServer, tmp_path: Path
) -> None:
    tenant = await make_tenant()
    card_schema = {"type": "object", "properties": {"card": {"type": "string", "writeOnly": True}}}
    debug = {"STEWARD_LOG_LEVEL": "DEBUG", "STEWARD_LOG_FORMAT": ""}  # empty: the default form
    async with (api_and_worker(settings, tmp_path, **debug) as url,
                httpx.AsyncClient(base_url=url, timeout=30) as client):
        put = await client.put("/api/v1/secrets/crm_key", json={"value": SECRET}, headers=tenant.headers)
        assert put.status_code in (200, 201, 204), put.text
        auth = {"Authorization": "Bearer ${{ secrets.crm_key }}"}
        await register(client, tenant.headers, name="charge", input_schema=card_schema,
                       executor=http_tool(tool_server.url + "/echo", headers=auth))
        await register(client, tenant.headers, name="leaky", executor=http_tool(tool_server.url + "/echo-400",
                                                                                 headers=auth))
        workflow = name()
        await create_workflow(client, tenant.headers, workflow, [
            {"id": "charge", "tool": "charge", "args": {"card": "${{ input.card }}"}},
            {"id": "leak", "tool": "leaky", "needs": ["charge"], "args": {"card": "${{ input.card }}"}},
        ])
        run = await start_run(client, tenant.headers, workflow, {"card": CARD})
        done = await wait_run(client, tenant.headers, run["id"], timeout=60)
        assert done["status"] == "failed", done  # the leaky tool answered 400, echoing the secret
    assert any(SECRET in str(call.headers) for call in tool_server.calls_to("/echo"))  # it was really sent

    lines = [line for log in ("api.log", "worker.log") for line in (tmp_path / log).read_text().splitlines()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in entries)
    leaked = [line for line in lines if SECRET in line or CARD in line]
    assert leaked == []
    # The worker's lines about the run's steps say which tenant, run, step and attempt they are about.
    about_run = [e for e in entries if e.get("run") == run["id"]]
    assert {e["step"] for e in about_run} == {"charge", "leak"}, entries[-20:]
    assert all(e["tenant"] == str(tenant.tenant_id) and e["attempt"] >= 1 for e in about_run)
    assert any(e["step"] == "leak" and "http_400" in e["message"] for e in about_run)
    # The API's lines of a tenant's requests name the tenant.
    assert any(e.get("tenant") == str(tenant.tenant_id) and e["logger"].startswith("uvicorn") for e in entries)
