#!/usr/bin/env python3
"""Agent benchmark: agent runs against a scripted model server, and the guardrail overhead per tool call.

The scenario: ``--runs`` runs (default 100) of a workflow with one ``agent`` step, ``--concurrency`` (8)
in flight. The scripted model makes ``--calls`` (5) tool calls per conversation, one a turn, each to the
registered http tool ``lookup`` (POST to the tool server's ``/echo``) with an argument of its own, then
answers. So each run is ``--calls`` + 1 model turns and ``--calls`` guarded tool calls.

Reported, per tool call (p50 and p99):

* the raw call: the same ``POST /echo`` made directly with httpx from this process, sequentially, before
  the runs (``--raw-calls``, 500);
* the tool's execution inside the worker (``tool_called`` event, ``data.ms``);
* the guardrail overhead (``tool_called`` event, ``data.overhead_ms``): what the guarded path adds to the
  execution: tool lookup, secrets, argument validation, permissions, circuit breaker, budget
  reservation and settlement;
* the agent loop's time per tool call with the model excluded: the time between two consecutive
  ``model_called`` events minus the later one's model latency (the tool call, its checkpoint
  transaction, the next turn's budget reservation and checkpoint);
* the model call latency seen by the worker (``model_called`` event, ``data.ms``).

Every run is checked: it succeeded, answered what the script says, made exactly ``--calls`` tool calls
(events, and requests recorded by the tool server) and ``--calls`` + 1 model calls (events, and requests
recorded by the model server, turns 0..calls). Any mismatch fails the benchmark (exit status 1).

The product is started the way ``bench/engine.py`` starts it (a fresh database ``steward_bench_*``,
migrations, a tenant with an admin key, ``steward api`` and ``steward worker`` child processes, Redis
database ``--redis`` flushed first), with ``STEWARD_HTTP_ALLOW_PRIVATE_NETWORKS=true`` (the model and
tool servers listen on loopback, in this process) and a throw-away ``STEWARD_SECRET_KEYS`` shared by
both processes. Everything is removed at the end, also on Ctrl-C or error.

Run it with the project's virtualenv: ``.venv/bin/python bench/agent.py [--runs 100] [--concurrency 8]
[--calls 5] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import secrets
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from app.vault.crypto import new_key
from bench.engine import (
    Api,
    BenchError,
    CpuMeter,
    Product,
    ScenarioResult,
    Target,
    XidProbe,
    _sigterm,
    _with_timeout,
    command_line,
    fmt,
    machine_info,
    ms_between,
    percentile,
    print_header,
    run_scenario,
    ts,
    watched,
)
from tests.fakes.model_server import ModelServer, Turn
from tests.fakes.tool_server import ToolServer

WORKFLOW = "bench-agent"
PROVIDER = "local"
MODEL = "bench-agent"
TOOL = "lookup"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379/13"
PRICE = {"input_per_mtok": "2.00", "output_per_mtok": "8.00"}
LOOKUP_SCHEMA = {
    "type": "object",
    "required": ["q"],
    "properties": {"q": {"type": "string"}},
    "additionalProperties": False,
}
TASK_PREFIX = "bench task "
ANSWER_CAP_TOKENS = 256
DEFAULT_RUN_LIMIT_STEPS = 25  # app/budgets/service.py DEFAULT_LIMITS
MAX_AGENT_TURNS = 100  # app/workflows/structure.py

# The aim the numbers are read against (docs/benchmarks.md).
AIM_OVERHEAD_P50_MS = 5.0


# --- the scripted model ------------------------------------------------------------------------------


def task_tag(body: dict[str, Any]) -> str:
    """The run's tag, from the conversation's user message (the run input's ``task``)."""
    for message in body.get("messages") or []:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if message.get("role") == "user" and isinstance(content, str) and content.startswith(TASK_PREFIX):
            return content[len(TASK_PREFIX) :]
    return "?"


def lookup_arg(tag: str, n: int) -> str:
    return f"{tag} #{n}"


def answer_text(calls: int) -> str:
    return f"looked up {calls} things"


def counting_script(calls: int) -> Callable[[dict[str, Any]], Turn]:
    """``calls`` turns that each call ``lookup`` with an argument of their own, then a final answer.
    The turn is the number of assistant messages in the request, so any number of runs share it."""

    def turn(body: dict[str, Any]) -> Turn:
        n = sum(1 for m in body["messages"] if m.get("role") == "assistant")
        if n < calls:
            return Turn.tool_calls([(TOOL, {"q": lookup_arg(task_tag(body), n)})])
        return Turn.final(answer_text(n))

    return turn


# --- setup -------------------------------------------------------------------------------------------


def agent_definition(calls: int) -> dict[str, Any]:
    definition: dict[str, Any] = {
        "steps": [
            {
                "id": "agent",
                "agent": {
                    "model": f"{PROVIDER}/{MODEL}",
                    "instructions": "You look things up, one call at a time, then say what you found.",
                    "input": "${{ input.task }}",
                    "tools": [TOOL],
                    "max_turns": calls + 1,
                    "max_tokens": ANSWER_CAP_TOKENS,
                },
            }
        ]
    }
    if calls + 1 > DEFAULT_RUN_LIMIT_STEPS:
        # Over the tenant's default run limits (25 tool calls, 100,000 tokens): raise them for this workflow.
        definition["limits"] = {"max_steps": calls + 5, "max_tokens": 50_000_000}
    return definition


async def setup(api: Api, model_server: ModelServer, tool_server: ToolServer, calls: int) -> int:
    """Provider, tool and workflow through the API; the workflow's version."""
    http = api.http
    resp = await http.put(
        f"/api/v1/providers/{PROVIDER}", json={"base_url": model_server.url, "models": {MODEL: PRICE}}
    )
    api._check(resp, f"PUT /api/v1/providers/{PROVIDER}")
    resp = await http.post(
        "/api/v1/tools",
        json={
            "name": TOOL,
            "description": "Look something up.",
            "effect": "read",
            "input_schema": LOOKUP_SCHEMA,
            "executor": {"kind": "http", "method": "POST", "url": tool_server.url + "/echo"},
        },
    )
    api._check(resp, "POST /api/v1/tools")
    resp = await http.post(
        "/api/v1/workflows",
        json={"name": WORKFLOW, "description": "bench/agent.py", "definition": agent_definition(calls)},
    )
    return int(api._check(resp, f"POST /api/v1/workflows ({WORKFLOW})")["version"])


# --- the raw baseline --------------------------------------------------------------------------------


async def raw_baseline(tool_url: str, n: int, warmup: int = 20) -> list[float]:
    """``n`` sequential ``POST /echo`` calls straight from here with httpx, milliseconds each."""
    out: list[float] = []
    async with httpx.AsyncClient(timeout=30.0) as client:
        for i in range(warmup + n):
            started = time.perf_counter()
            resp = await client.post(
                tool_url + "/echo", json={"q": f"raw #{i}"}, headers={"Idempotency-Key": f"raw-{i}"}
            )
            resp.json()
            elapsed = (time.perf_counter() - started) * 1000.0
            if resp.status_code != 200:
                raise BenchError(f"raw POST /echo: HTTP {resp.status_code}: {resp.text[:200]}")
            if i >= warmup:
                out.append(elapsed)
    return out


# --- events and verification -------------------------------------------------------------------------


async def run_events(api: Api, run_id: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor: Any = None
    while True:
        params: dict[str, Any] = {"limit": 500}
        if cursor is not None:
            params["cursor"] = cursor
        resp = await api.http.get(f"/api/v1/runs/{run_id}/events", params=params)
        page = api._check(resp, f"GET /api/v1/runs/{run_id}/events")
        items.extend(page["items"])
        cursor = page.get("next_cursor")
        if not cursor or not page["items"]:
            return items


@dataclass
class AgentRun:
    id: str
    tag: str
    tool_ms: list[float] = field(default_factory=list)
    overhead_ms: list[float] = field(default_factory=list)
    model_ms: list[float] = field(default_factory=list)
    agent_ms: list[float] = field(default_factory=list)  # per tool call, model latency excluded
    problems: list[str] = field(default_factory=list)


def analyse(run_id: str, tag: str, doc: dict[str, Any], events: list[dict[str, Any]], calls: int) -> AgentRun:
    run = AgentRun(run_id, tag)
    if doc.get("status") != "succeeded":
        run.problems.append(f"status {doc.get('status')}: {json.dumps(doc.get('error'), default=str)[:300]}")
    steps = {s["id"]: s for s in doc.get("steps", [])}
    output = steps.get("agent", {}).get("output")
    if output != answer_text(calls):
        run.problems.append(f"agent output {output!r}, expected {answer_text(calls)!r}")
    models = [e for e in events if e["type"] == "model_called"]
    tools = [e for e in events if e["type"] == "tool_called"]
    odd = sorted({e["type"] for e in events} & {"guardrail_rejected", "tool_call_failed", "model_call_failed",
                                                 "budget_exhausted", "step_retrying", "agent_stopped"})
    if odd:
        run.problems.append(f"unexpected events: {', '.join(odd)}")
    if len(tools) != calls:
        run.problems.append(f"{len(tools)} tool_called events, expected {calls}")
    if len(models) != calls + 1:
        run.problems.append(f"{len(models)} model_called events, expected {calls + 1}")
    args = [e["data"].get("args", {}).get("q") for e in tools]
    if args != [lookup_arg(tag, n) for n in range(len(tools))]:
        run.problems.append(f"tool call arguments {args}")
    for e in tools:
        data = e["data"]
        if not data.get("ok"):
            run.problems.append(f"tool call failed: {data.get('error')}: {data.get('message')}")
        if data.get("overhead_ms") is None:
            run.problems.append("a tool_called event without overhead_ms")
            continue
        run.tool_ms.append(float(data["ms"]))
        run.overhead_ms.append(float(data["overhead_ms"]))
    run.model_ms = [float(e["data"]["ms"]) for e in models]
    for prev, nxt in zip(models, models[1:], strict=False):
        gap = ms_between(ts(prev["created_at"]), ts(nxt["created_at"]))
        if gap is not None:
            run.agent_ms.append(gap - float(nxt["data"]["ms"]))
    return run


def check_servers(runs: list[AgentRun], model_server: ModelServer, tool_server: ToolServer, calls: int) -> None:
    """What the model and tool servers received, per run: turns 0..calls, and ``calls`` distinct tool calls."""
    turns: dict[str, list[tuple[int | None, int]]] = {}
    for req in model_server.calls(MODEL):
        body = req.body if isinstance(req.body, dict) else {}
        turns.setdefault(task_tag(body), []).append((req.turn, req.status))
    echoes: dict[str, list[tuple[str, str | None]]] = {}
    for call in tool_server.calls_to("/echo"):
        q = call.body.get("q") if isinstance(call.body, dict) else None
        if isinstance(q, str) and " #" in q:
            echoes.setdefault(q.rsplit(" #", 1)[0], []).append((q, call.idempotency_key))
    for run in runs:
        seen = turns.get(run.tag, [])
        if sorted((t if t is not None else -1, s) for t, s in seen) != [(n, 200) for n in range(calls + 1)]:
            run.problems.append(f"model server saw (turn, status) {sorted(seen, key=str)}; expected turns 0..{calls}")
        calls_seen = echoes.get(run.tag, [])
        qs = sorted(q for q, _ in calls_seen)
        keys = {k for _, k in calls_seen}
        if qs != sorted(lookup_arg(run.tag, n) for n in range(calls)) or len(keys) != calls or None in keys:
            run.problems.append(f"tool server saw {len(calls_seen)} calls ({qs}) with {len(keys)} idempotency keys; "
                                f"expected {calls} distinct")


# --- the benchmark -----------------------------------------------------------------------------------


def stats(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
    }


async def bench(
    args: argparse.Namespace, target: Target, product: Product, model_server: ModelServer, tool_server: ToolServer
) -> tuple[dict[str, Any], int]:
    api = Api(target, run_timeout_s=args.run_timeout, poll_wait_s=args.poll_wait)
    probe: XidProbe | None = None
    tags: dict[str, str] = {}  # run id -> tag
    docs: dict[str, dict[str, Any]] = {}
    counter = 0
    prefix = secrets.token_hex(3)

    def make_input() -> dict[str, Any]:
        nonlocal counter
        counter += 1
        return {"task": f"{TASK_PREFIX}{prefix}-{counter}"}

    def keep(doc: dict[str, Any]) -> list[float]:
        run_id = str(doc["id"])
        tags[run_id] = str(doc["input"]["task"])[len(TASK_PREFIX) :]
        docs[run_id] = doc
        return []

    try:
        await _with_timeout(api.ready(), 15, "the API does not answer GET /readyz")
        if target.database_url:
            probe = await XidProbe.connect(target.database_url)
        machine = await machine_info(probe, args, product)
        machine["model_server"] = "tests/fakes/model_server.py ModelServer, in the bench process"
        machine["tool_server"] = "tests/fakes/tool_server.py ToolServer, in the bench process"
        cpu = CpuMeter({**product.pids(), "bench": os.getpid()}, probe)
        print_header(machine, args)

        version = await setup(api, model_server, tool_server, args.calls)

        print(f"raw baseline: {args.raw_calls} sequential POST /echo ...", file=sys.stderr, flush=True)
        raw = await raw_baseline(tool_server.url, args.raw_calls)

        warm_ids: list[str] = []
        for _ in range(args.warmup):
            warm, doc = await api.run(WORKFLOW, version, make_input())
            if warm.status != "succeeded":
                raise BenchError(
                    f"warm-up run did not succeed: {warm.status}: {json.dumps(warm.error, default=str)[:800]}"
                )
            keep(doc)
            warm_ids.append(str(warm.id))
            print(f"warm-up run: {warm.latency_ms:.0f} ms", file=sys.stderr, flush=True)

        result = ScenarioResult("agent", f"agent {args.calls} calls c={args.concurrency}", args.runs,
                                args.concurrency)
        print(f"running {result.name}: {args.runs} runs, {args.concurrency} in flight ...", file=sys.stderr,
              flush=True)
        result.load_before = os.getloadavg()[0]
        budget = args.run_timeout * math.ceil(args.runs / args.concurrency) + 60
        try:
            await _with_timeout(
                run_scenario(api, result, WORKFLOW, version, make_input, keep, probe, args.max_failures, cpu),
                budget,
                f"the runs did not finish within {budget:g} s",
            )
        except BenchError as exc:
            result.aborted = str(exc)
        result.load_after = os.getloadavg()[0]
        print(f"  {len(result.ok_runs)}/{len(result.runs)} ok in {result.wall_s:.2f} s", file=sys.stderr, flush=True)
        for failed in result.failed[:3]:
            print(f"  run {failed.id}: {failed.status}: {json.dumps(failed.error, default=str)[:600]}",
                  file=sys.stderr, flush=True)

        # Events are read after the measured window, so reading them does not load the product meanwhile.
        sem = asyncio.Semaphore(8)

        async def one(run_id: str | None) -> AgentRun:
            assert run_id is not None
            async with sem:
                events = await run_events(api, run_id)
            return analyse(run_id, tags[run_id], docs[run_id], events, args.calls)

        analysed = await asyncio.gather(*(one(r.id) for r in result.ok_runs))
        warm_checked = await asyncio.gather(*(one(i) for i in warm_ids))
        check_servers([*analysed, *warm_checked], model_server, tool_server, args.calls)
    finally:
        if probe is not None:
            await probe.close()
        await api.aclose()

    problems = [f"run {r.id}: {p}" for r in [*warm_checked, *analysed] for p in r.problems]
    summary = summarise(args, result, analysed, raw)
    report = {
        "machine": machine,
        "command": command_line(),
        "date": time.strftime("%Y-%m-%d"),
        "settings": vars(args),
        "summary": summary,
        "problems": problems,
        "runs": [
            {**{k: v for k, v in vars(a).items() if k != "problems"},
             "latency_ms": r.latency_ms, "server_ms": r.server_ms}
            for a, r in zip(analysed, result.ok_runs, strict=True)
        ],
        "failed_runs": [vars(r) for r in result.failed],
        "raw_ms": raw,
    }
    bad = bool(problems or result.failed or result.aborted or len(result.runs) < result.runs_planned)
    return report, (1 if bad else 0)


def summarise(
    args: argparse.Namespace, result: ScenarioResult, runs: list[AgentRun], raw: list[float]
) -> dict[str, Any]:
    s = result.summary()
    tool_calls = sum(len(r.tool_ms) for r in runs)
    model_calls = sum(len(r.model_ms) for r in runs)
    guarded = [t + o for r in runs for t, o in zip(r.tool_ms, r.overhead_ms, strict=True)]
    per_call_run = [x.server_ms / args.calls for x in result.ok_runs if x.server_ms is not None]
    overhead = stats([o for r in runs for o in r.overhead_ms])
    return {
        "runs": len(result.runs),
        "runs_ok": len(result.ok_runs),
        "concurrency": result.concurrency,
        "calls_per_run": args.calls,
        "tool_calls": tool_calls,
        "model_calls": model_calls,
        "wall_s": result.wall_s,
        "runs_per_s": s["runs_per_s"],
        "tool_calls_per_s": tool_calls / result.wall_s if result.wall_s else None,
        "raw_ms": stats(raw),
        "tool_ms": stats([t for r in runs for t in r.tool_ms]),
        "overhead_ms": overhead,
        "guarded_call_ms": stats(guarded),
        "agent_per_call_ms": stats([a for r in runs for a in r.agent_ms]),
        "run_per_call_ms": stats(per_call_run),
        "model_ms": stats([m for r in runs for m in r.model_ms]),
        "run_server_ms": {"p50": s["run_server_p50_ms"], "p99": s["run_server_p99_ms"]},
        "latency_ms": {"p50": s["latency_p50_ms"], "p99": s["latency_p99_ms"]},
        "write_tx": s["write_tx"],
        "write_tx_per_run": s["write_tx"] / len(result.runs) if s["write_tx"] is not None and result.runs else None,
        "write_tx_per_tool_call": s["write_tx"] / tool_calls if s["write_tx"] is not None and tool_calls else None,
        "other_db_writes": s["other_db_writes"],
        "cpu_s": s["cpu_s"],
        "cpu_ms_per_tool_call": {k: v * 1000.0 / tool_calls for k, v in (s["cpu_s"] or {}).items()}
        if tool_calls
        else None,
        "load_before": s["load_before"],
        "load_after": s["load_after"],
        "aborted": s["aborted"],
        "aim_overhead_p50_ms": AIM_OVERHEAD_P50_MS,
        "aim_met": overhead["p50"] is not None and overhead["p50"] < AIM_OVERHEAD_P50_MS,
    }


# --- output ------------------------------------------------------------------------------------------


def print_report(report: dict[str, Any], nproc: int) -> None:
    s = report["summary"]
    runs = f"{s['runs_ok']}/{s['runs']}" + (" (aborted)" if s["aborted"] else "")
    print("| runs | concurrency | tool calls | wall s | runs/s | tool calls/s | run (server) p50 ms | "
          "run (server) p99 ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {runs} | {s['concurrency']} | {s['tool_calls']} ({s['calls_per_run']}/run) | {fmt(s['wall_s'], 2)} | "
          f"{fmt(s['runs_per_s'], 1)} | {fmt(s['tool_calls_per_s'], 0)} | {fmt(s['run_server_ms']['p50'], 1)} | "
          f"{fmt(s['run_server_ms']['p99'], 1)} |")
    print()
    rows = [
        ("raw HTTP call: httpx POST /echo from the bench, sequential, before the runs", s["raw_ms"]),
        ("tool execution in the worker (`tool_called.ms`)", s["tool_ms"]),
        ("**guardrail overhead** (`tool_called.overhead_ms`)", s["overhead_ms"]),
        ("guarded call: execution + overhead", s["guarded_call_ms"]),
        ("agent loop per tool call, model excluded (model_called gap - model ms)", s["agent_per_call_ms"]),
        ("run (server) / tool calls", s["run_per_call_ms"]),
        ("model call (`model_called.ms`), per turn", s["model_ms"]),
    ]
    print("| per tool call | n | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|")
    for what, st in rows:
        print(f"| {what} | {st['n']} | {fmt(st['p50'], 2)} | {fmt(st['p99'], 2)} |")
    print()
    p50 = s["overhead_ms"]["p50"]
    met = "n/a" if p50 is None else ("yes" if s["aim_met"] else "no")
    print("| aim | measured | target | met |")
    print("|---|---:|---:|:---:|")
    print(f"| guardrail overhead p50 per tool call | {fmt(p50, 2)} ms | < {AIM_OVERHEAD_P50_MS:g} ms | {met} |")
    print()
    mark = "*" if s["other_db_writes"] else ""
    print(f"Write transactions: {fmt(s['write_tx_per_run'], 1)}{mark} per run, {fmt(s['write_tx_per_tool_call'], 2)}"
          f"{mark} per tool call (model turns included)"
          + (" (* other databases were written meanwhile: an upper bound)" if mark else ""))
    print(f"1-minute load average before -> after ({nproc} CPUs): {fmt(s['load_before'], 2)} -> "
          f"{fmt(s['load_after'], 2)}")
    per_call = s.get("cpu_ms_per_tool_call")
    if per_call:
        busy = (s["cpu_s"] or {}).get("machine")
        util = f"; machine {100 * busy / (nproc * s['wall_s']):.0f}% busy" if busy and s["wall_s"] else ""
        parts = ", ".join(f"{k} {v:.2f}" for k, v in per_call.items())
        print(f"CPU ms per tool call (model turns included; bench = client + model + tool servers): {parts}{util}")
    print()
    print("guardrail overhead: tool lookup, secrets, validation, permissions, breaker, budget reservation and "
          "settlement (app/tools/calls.py); agent loop per tool call: the time between consecutive model_called "
          "events minus the later model call's latency (the guarded call, its checkpoint transaction, the next "
          "turn's budget reservation and checkpoint).")
    if report["problems"]:
        print(f"\nFAILED: {len(report['problems'])} problem(s):")
        for p in report["problems"][:20]:
            print(f"  {p}")


# --- entry point -------------------------------------------------------------------------------------


async def with_watchdog(
    args: argparse.Namespace, target: Target, product: Product, model_server: ModelServer, tool_server: ToolServer
) -> tuple[dict[str, Any], int]:
    """Run the benchmark; fail fast if one of the product's processes dies."""
    return await watched(bench(args, target, product, model_server, tool_server), product)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=100, help="measured runs (default 100)")
    p.add_argument("--concurrency", type=int, default=8, help="runs in flight (default 8)")
    p.add_argument("--calls", type=int, default=5, help=f"tool calls per run, 1-{MAX_AGENT_TURNS - 1} (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up runs, not counted (default 2)")
    p.add_argument("--raw-calls", type=int, default=500, help="direct httpx calls for the baseline (default 500)")
    p.add_argument("--json", metavar="PATH", help="write the raw numbers here")
    p.add_argument(
        "--pg", default=DEFAULT_PG, help=f"admin URL to create the bench database on (default {DEFAULT_PG})"
    )
    p.add_argument(
        "--redis",
        default=DEFAULT_REDIS,
        help=f"Redis database for the product, flushed first (default {DEFAULT_REDIS})",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the api and worker processes (repeatable)",
    )
    p.add_argument("--run-timeout", type=float, default=60.0, help="seconds a run may take (default 60)")
    p.add_argument("--poll-wait", type=float, default=30.0, help="?wait= of each long poll (default 30)")
    p.add_argument("--max-failures", type=int, default=5, help="stop after this many failed runs")
    p.add_argument("--startup-timeout", type=float, default=90.0, help="seconds for the product to come up")
    args = p.parse_args(argv)
    for name in ("runs", "concurrency", "calls", "raw_calls", "max_failures"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must not be negative")
    if args.calls > MAX_AGENT_TURNS - 1:
        p.error(f"--calls: an agent step has at most {MAX_AGENT_TURNS} turns, so at most {MAX_AGENT_TURNS - 1} calls")
    for item in args.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", item, flags=re.S):
            p.error(f"--env {item!r}: expected KEY=VALUE")
    args.url = None  # bench.engine's helpers read it: this script always starts its own product
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    # The children's environment: loopback model and tool servers, and one secret key for both processes
    # (kept out of args.env, which is printed).
    child_args = argparse.Namespace(**vars(args))
    child_args.env = [
        "STEWARD_HTTP_ALLOW_PRIVATE_NETWORKS=true",
        f"STEWARD_SECRET_KEYS={new_key()}",
        *args.env,
    ]
    product = Product(child_args)
    code = 0
    try:
        # The product stops before the model and tool servers, so nothing in flight sees them vanish.
        with ModelServer() as model_server, ToolServer() as tool_server:
            model_server.script(MODEL, counting_script(args.calls))
            try:
                target = product.start()
                report, code = asyncio.run(with_watchdog(args, target, product, model_server, tool_server))
                print_report(report, int(report["machine"]["nproc"] or 1))
                if args.json:
                    Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
                    print(f"\nraw numbers written to {args.json}", file=sys.stderr)
                if code:
                    product.print_tails()
            except BenchError as exc:
                print(f"\nbench/agent.py: {exc}", file=sys.stderr)
                product.print_tails()
                code = 2
            except Exception:
                traceback.print_exc()
                product.print_tails()
                code = 2
            finally:
                try:
                    product.stop()
                except KeyboardInterrupt:
                    print(
                        f"interrupted again during clean-up; database {product.dbname} may be left behind",
                        file=sys.stderr,
                    )
    except KeyboardInterrupt:
        print("\ninterrupted; cleaned up", file=sys.stderr)
        code = 130
    return code


if __name__ == "__main__":
    sys.exit(main())
