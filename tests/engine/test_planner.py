"""The planner needs no database: these tests run without one (and without an event loop of their own)."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from app.engine.planner import Plan, StepView
from app.engine.planner import plan as plan_async
from app.workflows.definition import parse_definition
from app.workflows.steps import Definition


def plan(*args: Any, **kwargs: Any) -> Plan:
    return asyncio.run(plan_async(*args, **kwargs))


def definition(*steps: dict[str, Any]) -> Definition:
    return parse_definition({"steps": list(steps)})


def views(defn: Definition, **statuses: Any) -> dict[str, StepView]:
    out: dict[str, StepView] = {}
    for s in defn.steps:
        v = statuses.get(s.id, "pending")
        out[s.id] = v if isinstance(v, StepView) else StepView(v)
    return out


def test_roots_start_first_with_rendered_args() -> None:
    d = definition(
        {"id": "a", "tool": "echo", "args": {"x": "${{ input.x + 1 }}"}},
        {"id": "b", "needs": ["a"], "tool": "echo"},
    )
    p = plan(d, {"x": 1}, views(d))
    assert p.start == [("a", {"x": 2})]
    assert p.run_status == "running"


def test_dependent_sees_output_of_need() -> None:
    d = definition(
        {"id": "a", "tool": "echo"},
        {"id": "b", "needs": ["a"], "tool": "echo", "args": {"v": "${{ steps.a.output.k }}"}},
    )
    p = plan(d, {}, views(d, a=StepView("succeeded", {"k": "hi"})))
    assert p.start == [("b", {"v": "hi"})]


def test_fan_in_waits_for_every_need() -> None:
    d = definition(
        {"id": "a", "tool": "echo"},
        {"id": "b", "tool": "echo"},
        {"id": "c", "needs": ["a", "b"], "tool": "echo"},
    )
    assert plan(d, {}, views(d, a="succeeded", b="running")).start == []
    assert plan(d, {}, views(d, a="succeeded", b="succeeded")).start == [("c", {})]


def test_false_when_skips_and_skip_cascades_but_other_branch_runs() -> None:
    d = definition(
        {"id": "a", "tool": "echo"},
        {"id": "b", "needs": ["a"], "when": "${{ input.go }}", "tool": "echo"},
        {"id": "c", "needs": ["b"], "tool": "echo"},
        {"id": "d", "needs": ["a"], "tool": "echo"},
    )
    p = plan(d, {"go": False}, views(d, a="succeeded"))
    assert p.skip == ["b", "c"]
    assert p.start == [("d", {})]


def test_all_done_or_skipped_succeeds_the_run() -> None:
    d = definition({"id": "a", "tool": "echo"}, {"id": "b", "when": "false", "tool": "echo"})
    assert plan(d, {}, views(d, a="succeeded")).run_status == "succeeded"


def test_failed_step_fails_the_run() -> None:
    d = definition({"id": "a", "tool": "echo"}, {"id": "b", "needs": ["a"], "tool": "echo"})
    p = plan(d, {}, views(d, a="failed"))
    assert p.run_status == "failed" and p.start == []


def test_bad_expression_at_runtime_fails_the_step() -> None:
    d = definition({"id": "a", "tool": "echo", "args": {"v": "${{ input.missing.deeper }}"}})
    p = plan(d, {}, views(d))
    assert [sid for sid, _ in p.fail] == ["a"]
    assert p.fail[0][1]["class"] == "expression"
    assert p.run_status == "failed"


def test_wait_step_waits_and_run_is_waiting() -> None:
    d = definition({"id": "w", "wait": {"signal": "go"}})
    p = plan(d, {}, views(d))
    assert p.wait == ["w"]
    assert p.run_status == "waiting"


def test_map_expands_and_respects_concurrency() -> None:
    d = definition(
        {
            "id": "m",
            "map": {
                "items": "${{ input.xs }}",
                "tool": "echo",
                "args": {"v": "${{ item }}", "i": "${{ index }}"},
                "concurrency": 3,
            },
        }
    )
    p = plan(d, {"xs": ["a", "b", "c", "d", "e"]}, views(d))
    assert p.expand == [("m", [{"v": x, "i": i} for i, x in enumerate("abcde")])]
    assert p.start_items == [("m", 0), ("m", 1), ("m", 2)]


def test_running_map_refills_free_slots_in_order() -> None:
    d = definition({"id": "m", "map": {"items": [1, 2, 3, 4, 5], "tool": "echo", "concurrency": 2}})
    items = ("succeeded", "running", "pending", "pending", "pending")
    p = plan(d, {}, views(d, m=StepView("running", items=items)))
    assert p.start_items == [("m", 2)]


def test_map_completes_then_dependents_start_on_the_next_pass() -> None:
    d = definition(
        {"id": "m", "map": {"items": [1, 2], "tool": "echo"}},
        {"id": "z", "needs": ["m"], "tool": "echo", "args": {"n": "${{ size(steps.m.output) }}"}},
    )
    p = plan(d, {}, views(d, m=StepView("running", items=("succeeded", "succeeded"))))
    assert p.complete_maps == ["m"] and p.start == []
    p2 = plan(d, {}, views(d, m=StepView("succeeded", output=[1, 2])))
    assert p2.start == [("z", {"n": 2})]


def test_failed_item_fails_the_map() -> None:
    d = definition({"id": "m", "map": {"items": [1, 2], "tool": "echo"}})
    p = plan(d, {}, views(d, m=StepView("running", items=("failed", "running"))))
    assert p.fail[0][0] == "m" and p.fail[0][1]["index"] == 0


def test_map_items_that_are_not_a_list_fail_the_step() -> None:
    d = definition({"id": "m", "map": {"items": "${{ input.xs }}", "tool": "echo"}})
    p = plan(d, {"xs": 5}, views(d))
    assert p.fail and "list" in p.fail[0][1]["message"]


def test_retried_map_is_reopened_without_expanding_again() -> None:
    d = definition({"id": "m", "map": {"items": [1, 2], "tool": "echo"}})
    p = plan(d, {}, views(d, m=StepView("pending", items=("succeeded", "pending"))))
    assert p.reopen == ["m"] and p.expand == [] and p.start_items == [("m", 1)]


# --- properties over random DAGs -------------------------------------------------------------


@st.composite
def dags(draw: st.DrawFn) -> list[dict[str, Any]]:
    n = draw(st.integers(min_value=1, max_value=12))
    steps = []
    for i in range(n):
        needs = (
            draw(st.lists(st.integers(min_value=0, max_value=i - 1), unique=True, max_size=3)) if i else []
        )
        steps.append({"id": f"s{i}", "needs": [f"s{j}" for j in needs], "tool": "echo"})
    return steps


@settings(max_examples=150, deadline=None)
@given(dags(), st.data())
def test_only_steps_whose_needs_all_succeeded_start(steps: list[dict[str, Any]], data: st.DataObject) -> None:
    d = parse_definition({"steps": steps})
    statuses = {
        s["id"]: data.draw(st.sampled_from(["pending", "queued", "running", "succeeded"])) for s in steps
    }
    p = plan(d, {}, {sid: StepView(status) for sid, status in statuses.items()})
    started = {sid for sid, _ in p.start}
    for step in d.steps:
        ready = statuses[step.id] == "pending" and all(statuses[n] == "succeeded" for n in step.needs)
        assert (step.id in started) == ready


@settings(max_examples=100, deadline=None)
@given(dags())
def test_executing_plans_to_the_end_runs_every_step_once_in_dependency_order(
    steps: list[dict[str, Any]],
) -> None:
    d = parse_definition({"steps": steps})
    state = {s.id: StepView("pending") for s in d.steps}
    order: list[str] = []
    for _ in range(len(steps) + 1):
        p = plan(d, {}, state)
        if p.run_status == "succeeded":
            break
        assert p.start, "a run that is not finished must have something to start"
        for sid, _ in p.start:
            assert all(n in order for n in d.step(sid).needs)
            order.append(sid)
            state[sid] = StepView("succeeded", output={})
    assert sorted(order) == sorted(s.id for s in d.steps)
    assert len(order) == len(set(order))
