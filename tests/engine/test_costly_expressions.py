"""Costly CEL: every shape is refused when posted or fails its step (class ``expression``), and meanwhile
/healthz answers and other runs progress.

The API (in-process) and the worker (in-process, ``worker`` below) share this test's event loop, so an
evaluation that held the loop would show as a slow /healthz. The latency bounds are safety nets against
blocking for seconds (what the unguarded expressions did), far above the few milliseconds measured.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import pytest_asyncio

from app.config import Settings
from app.workflows.cel import evaluation
from tests.support.runs import create_workflow, name, start_run, step, wait_run
from tests.support.tenants import TenantKey
from tests.support.workers import FAST
from workers.main import run_worker

TEN = "[0,1,2,3,4,5,6,7,8,9]"
THIRTY = "[" + ",".join(map(str, range(30))) + "]"


def nested(depth: int, over: str = TEN) -> str:
    body = "true"
    for i in range(depth):
        body = f"{over}.all(x{i}, {body})"
    return body


# Refused when posted: nesting too deep, or too many iterations over literals.
STATIC = {
    "issue-8-deep": nested(8),
    "data-4-deep": "input.xs.all(a, input.xs.all(b, input.xs.all(c, input.xs.all(d, a + b + c + d >= 0))))",
    "literal-27000": nested(3, THIRTY),
}
# Accepted when posted (the data is not known then), over budget when evaluated on 400 values: 64M steps.
CUBE = "{0}.all(a, {0}.all(b, {0}.all(c, a + b + c >= 0)))"
SEARCH = "{0}.filter(a, {0}.exists(b, {0}.exists(c, a + b + c < 0)))"
XS = list(range(400))


@pytest_asyncio.fixture(loop_scope="session")
async def worker(settings: Settings) -> AsyncIterator[Settings]:
    """An in-process worker whose steps get 3 s of expression evaluation (the API keeps its default)."""
    fast = settings.model_copy(update={**FAST, "expression_timeout_s": 3.0})
    task = asyncio.create_task(run_worker(fast, concurrency=10))
    await asyncio.sleep(0.05)
    yield fast
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


class Healthz:
    """Asks /healthz every 20 ms until stopped, keeping each answer's latency."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.latencies: list[float] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Healthz:
        self._task = asyncio.create_task(self._probe())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    async def _probe(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            r = await self.client.get("/healthz")
            self.latencies.append(time.perf_counter() - started)
            assert r.status_code == 200
            await asyncio.sleep(0.02)

    def check(self) -> None:
        assert len(self.latencies) > 20, self.latencies
        ordered = sorted(self.latencies)
        # "Answers under 100 ms": the typical answer. The slowest only has to be far from a freeze: a full
        # garbage collection of this test process alone can pause it for a few hundred milliseconds.
        assert statistics.median(ordered) < 0.1, ordered
        assert ordered[int(len(ordered) * 0.95)] < 0.25 and ordered[-1] < 1.0, ordered


# --- refused when posted -------------------------------------------------------------------------------


def sites(expr: str) -> list[tuple[dict[str, Any], str]]:
    """A definition per place an expression can go, and the pointer of that place."""
    return [
        ({"id": "a", "when": f"${{{{ {expr} }}}}", "tool": "echo"}, "/steps/0/when"),
        ({"id": "a", "tool": "echo", "args": {"v": f"${{{{ {expr} }}}}"}}, "/steps/0/args/v"),
        ({"id": "a", "map": {"items": f"${{{{ {expr} }}}}", "tool": "echo"}}, "/steps/0/map/items"),
        ({"id": "a", "map": {"items": [1], "tool": "echo", "args": {"v": f"n=${{{{ {expr} }}}}"}}},
         "/steps/0/map/args/v"),
        ({"id": "a", "llm": {"model": "p/m", "prompt": f"${{{{ {expr} }}}}"}}, "/steps/0/llm/prompt"),
    ]


@pytest.mark.parametrize("shape", list(STATIC))
async def test_costly_shapes_are_refused_in_definitions(
    client: httpx.AsyncClient, tenant: TenantKey, shape: str
) -> None:
    for definition, pointer in sites(STATIC[shape]):
        r = await client.post("/api/v1/workflows", json={"name": name(), "definition": {"steps": [definition]}},
                              headers=tenant.headers)
        assert r.status_code == 422, r.text
        assert r.headers["content-type"] == "application/problem+json"
        errors = [e for e in r.json()["errors"] if e["pointer"] == "/definition" + pointer]
        assert errors and "too costly" in errors[0]["message"], r.json()["errors"]


@pytest.mark.parametrize("shape", list(STATIC))
async def test_costly_shapes_are_refused_in_tools(client: httpx.AsyncClient, tenant: TenantKey, shape: str) -> None:
    expr = STATIC[shape].replace("input.", "args.")
    http = {"kind": "http", "url": "https://example.com/x"}
    cases = [
        ({"autonomy": {"mode": "conditional", "condition": expr}}, "/body/autonomy"),
        ({"response": f"${{{{ {expr.replace('args.', 'body.')} }}}}"}, "/body/response"),
        ({"executor": {**http, "url": f"https://example.com/${{{{ {expr} }}}}"}}, "/body/executor/http/url"),
        ({"executor": {**http, "headers": {"X-A": f"${{{{ {expr} }}}}"}}}, "/body/executor/http/headers"),
        ({"executor": {**http, "body": {"v": f"${{{{ {expr} }}}}"}}}, "/body/executor/http"),
    ]
    for change, pointer in cases:
        body = {"name": "costly", "description": "d", "input_schema": {"type": "object"}, "effect": "read",
                "executor": http, **change}
        r = await client.post("/api/v1/tools", json=body, headers=tenant.headers)
        assert r.status_code == 422, r.text
        errors = r.json()["errors"]
        assert any(e["pointer"].startswith(pointer) and "too costly" in e["message"] for e in errors), errors


# --- failing their step at evaluation ------------------------------------------------------------------


async def register_tool(client: httpx.AsyncClient, tenant: TenantKey, **spec: Any) -> str:
    tool = f"t_{name()}"
    body = {"name": tool, "description": "d", "input_schema": {"type": "object"}, "effect": "read", **spec}
    r = await client.post("/api/v1/tools", json=body, headers=tenant.headers)
    assert r.status_code == 201, r.text
    return tool


async def costly_workflows(client: httpx.AsyncClient, tenant: TenantKey) -> dict[str, tuple[str, str]]:
    """Workflow name and the step that must fail, per place a costly expression is evaluated."""
    cube, search = CUBE.format("input.xs"), SEARCH.format("input.xs")
    gated = await register_tool(client, tenant, executor={"kind": "builtin", "name": "echo"},
                                autonomy={"mode": "conditional", "condition": CUBE.format("args.xs")})
    templated = await register_tool(client, tenant, executor={
        "kind": "http", "url": f"https://example.com/${{{{ size({SEARCH.format('args.xs')}) }}}}"})
    first = {"id": "first", "tool": "echo", "args": {"xs": "${{ input.xs }}"}}
    shapes = {
        "when (API)": [{"id": "s", "when": f"${{{{ {cube} }}}}", "tool": "echo"}],
        "args (API)": [{"id": "s", "tool": "echo", "args": {"v": f"${{{{ {cube} }}}}"}}],
        "map items (API)": [{"id": "s", "map": {"items": f"${{{{ {search} }}}}", "tool": "echo"}}],
        "map item args (API)": [{"id": "s", "map": {
            "items": "${{ input.xs }}", "tool": "echo",
            "args": {"v": "${{ input.xs.exists(b, input.xs.exists(c, item + b + c < 0)) }}"}}}],
        "args (worker)": [first, {"id": "s", "needs": ["first"], "tool": "echo",
                                  "args": {"v": f"${{{{ {CUBE.format('steps.first.output.xs')} }}}}"}}],
        "autonomy condition (worker)": [{"id": "s", "tool": gated, "args": {"xs": "${{ input.xs }}"}}],
        "http url template (worker)": [{"id": "s", "tool": templated, "args": {"xs": "${{ input.xs }}"}}],
    }
    made = {}
    for label, steps in shapes.items():
        workflow = name()
        await create_workflow(client, tenant.headers, workflow, steps, limits={"max_steps": 1000})
        made[label] = (workflow, "s")
    return made


async def test_costly_evaluations_fail_their_step_while_the_api_answers(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings
) -> None:
    workflows = await costly_workflows(client, tenant)
    async with Healthz(client) as healthz:
        runs = {
            label: await start_run(client, tenant.headers, workflow, {"xs": XS})
            for label, (workflow, _) in workflows.items()
        }
        done = {label: await wait_run(client, tenant.headers, run["id"], timeout=60) for label, run in runs.items()}
    for label, run in done.items():
        failed = step(run, workflows[label][1])
        assert run["status"] == "failed" and failed["status"] == "failed", (label, run)
        assert failed["error"]["class"] == "expression", (label, failed["error"])
        assert "budget" in failed["error"]["message"], (label, failed["error"])
    healthz.check()


async def test_other_runs_progress_while_a_costly_expression_is_evaluated(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings
) -> None:
    costly, cheap = name(), name()
    await create_workflow(client, tenant.headers, costly, [
        {"id": "first", "tool": "echo", "args": {"xs": "${{ input.xs }}"}},
        {"id": "s", "needs": ["first"], "tool": "echo",
         "args": {"v": f"${{{{ {CUBE.format('steps.first.output.xs')} }}}}"}},
    ])
    await create_workflow(client, tenant.headers, cheap, [
        {"id": f"e{i}", "needs": [f"e{i - 1}"] if i else [], "tool": "echo", "args": {"n": f"${{{{ input.n + {i} }}}}"}}
        for i in range(5)
    ])
    async with Healthz(client) as healthz:
        slow = await start_run(client, tenant.headers, costly, {"xs": XS})
        # The worker evaluates s's args in the sandbox (this process's: the worker runs in it) for 3 s.
        await until(lambda: evaluation.sandbox().busy > 0)
        quick = await wait_run(client, tenant.headers, (await start_run(client, tenant.headers, cheap, {"n": 1}))["id"])
        still_busy = evaluation.sandbox().busy > 0
        during = (await client.get(f"/api/v1/runs/{slow['id']}", headers=tenant.headers)).json()
        ended = await wait_run(client, tenant.headers, slow["id"], timeout=60)
    assert quick["status"] == "succeeded" and step(quick, "e4")["output"] == {"n": 5}
    assert still_busy and during["status"] != "failed", "the cheap run should finish while s is being evaluated"
    assert step(ended, "s")["error"]["class"] == "expression"
    healthz.check()


async def until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_a_costly_expression_that_fits_its_budget_succeeds(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings
) -> None:
    workflow = name()
    await create_workflow(client, tenant.headers, workflow, [
        {"id": "s", "tool": "echo", "args": {"v": f"${{{{ {CUBE.format('input.xs')} }}}}"}},
    ])
    run = await wait_run(client, tenant.headers, (await start_run(client, tenant.headers, workflow,
                                                                   {"xs": list(range(20))}))["id"])
    assert run["status"] == "succeeded" and step(run, "s")["output"] == {"v": True}
