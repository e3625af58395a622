"""The scheduler: definition + step states in, the next moves out.

No database: ``advance()`` feeds it what it loaded and applies the answer through the state machine.
It is async only because expressions that may be costly are evaluated in the sandbox
(:mod:`app.workflows.cel.evaluation`), each step's within its own budget. Rules:
- a step is ready when every step it needs has succeeded or been skipped;
- a step whose need was skipped, or whose ``when`` is false, is skipped;
- a ``map`` step expands into items once ready and keeps at most ``concurrency`` of them active;
- a failed step fails the run; a run whose steps all succeeded or were skipped succeeds.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from app.engine.state_machine import STEP_ACTIVE, STEP_DONE, StepStatus
from app.workflows.cel import evaluation
from app.workflows.cel.evaluation import Budget
from app.workflows.cel.expressions import ExpressionError
from app.workflows.steps import ApprovalStep, Definition, MapStep, ModelStep, StepDef, ToolStep, WaitStep


@dataclass(frozen=True)
class StepView:
    status: str
    output: Any = None
    # For a map step whose items exist: each item's status, by index.
    items: tuple[str, ...] | None = None


@dataclass
class Plan:
    skip: list[str] = field(default_factory=list)
    # (step id, rendered args) of tool steps to start.
    start: list[tuple[str, Any]] = field(default_factory=list)
    wait: list[str] = field(default_factory=list)
    # (step id, item args) of maps to expand: one rendered args value per item.
    expand: list[tuple[str, list[Any]]] = field(default_factory=list)
    # A map step that is pending again (after a retry) whose items already exist.
    reopen: list[str] = field(default_factory=list)
    # (step id, item index) of map items to start.
    start_items: list[tuple[str, int]] = field(default_factory=list)
    complete_maps: list[str] = field(default_factory=list)
    # (step id, error) of steps that fail without running: a bad expression, a failed map item.
    fail: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    # The run's status once the moves above are applied.
    run_status: str = "running"


def context_for(run_input: Any, steps: dict[str, StepView]) -> dict[str, Any]:
    return {
        "input": run_input,
        "steps": {sid: {"output": view.output} for sid, view in steps.items() if view.status == StepStatus.SUCCEEDED},
    }


# Map items are rendered in one go; yield to the event loop between chunks of them.
_YIELD_EVERY = 200


async def plan(
    definition: Definition,
    run_input: Any,
    steps: dict[str, StepView],
    *,
    max_map_items: int = 10_000,
    expression_budget_s: float = 2.0,
) -> Plan:
    """Decide the next moves; ``steps`` holds every step of the definition by id.

    Each step's expressions (``when``, args, map items and item args) share one budget of
    ``expression_budget_s`` seconds of evaluation; a step that overruns it fails (class ``expression``)."""
    result = Plan()
    # Statuses as they will be once this plan is applied, so a skip cascades within one pass.
    status = {sid: view.status for sid, view in steps.items()}
    ctx = context_for(run_input, steps)
    for sid in definition.order:
        step = definition.step(sid)
        view = steps[sid]
        if view.status == StepStatus.PENDING:
            budget = Budget(expression_budget_s)
            await _plan_pending(step, view, status, ctx, result, max_map_items, budget)
        elif view.status == StepStatus.RUNNING and isinstance(step, MapStep) and view.items is not None:
            _plan_map_items(step, view.items, result, status)
    result.run_status = _run_status(status, result)
    return result


async def _plan_pending(
    step: StepDef,
    view: StepView,
    status: dict[str, str],
    ctx: dict[str, Any],
    result: Plan,
    max_map_items: int,
    budget: Budget,
) -> None:
    needs = [status[need] for need in step.needs]
    if any(need == StepStatus.SKIPPED for need in needs):
        result.skip.append(step.id)
        status[step.id] = StepStatus.SKIPPED
        return
    if not all(need == StepStatus.SUCCEEDED for need in needs):
        return
    try:
        if step.when is not None and not await evaluation.condition(step.when, ctx, budget):
            result.skip.append(step.id)
            status[step.id] = StepStatus.SKIPPED
            return
        if isinstance(step, ToolStep | ModelStep):
            result.start.append((step.id, await evaluation.render(step.args, ctx, budget)))
            status[step.id] = StepStatus.QUEUED
        elif isinstance(step, WaitStep | ApprovalStep):
            result.wait.append(step.id)
            status[step.id] = StepStatus.WAITING
        elif view.items is not None:
            result.reopen.append(step.id)
            status[step.id] = StepStatus.RUNNING
            _plan_map_items(step, view.items, result, status)
        else:
            items = await evaluation.render(step.map.items, ctx, budget)
            if not isinstance(items, list):
                raise ExpressionError(str(step.map.items), f"map items must be a list, got {type(items).__name__}")
            if len(items) > max_map_items:
                error = {
                    "class": "map_too_large",
                    "message": f"map has {len(items)} items; the limit is {max_map_items}",
                }
                result.fail.append((step.id, error))
                status[step.id] = StepStatus.FAILED
                return
            args = []
            for index, item in enumerate(items):
                args.append(await evaluation.render(step.map.args, {**ctx, "item": item, "index": index}, budget))
                if index % _YIELD_EVERY == _YIELD_EVERY - 1:
                    await asyncio.sleep(0)
            result.expand.append((step.id, args))
            status[step.id] = StepStatus.RUNNING
            _plan_map_items(step, tuple(StepStatus.PENDING for _ in args), result, status)
    except ExpressionError as exc:
        result.fail.append((step.id, {"class": "expression", "message": str(exc)}))
        status[step.id] = StepStatus.FAILED


def _plan_map_items(step: MapStep, items: tuple[str, ...], result: Plan, status: dict[str, str]) -> None:
    failed = [index for index, item in enumerate(items) if item == StepStatus.FAILED]
    if failed:
        result.fail.append(
            (
                step.id,
                {"class": "map_item_failed", "message": f"map item {failed[0]} failed", "index": failed[0]},
            )
        )
        status[step.id] = StepStatus.FAILED
        return
    if all(item == StepStatus.SUCCEEDED for item in items):
        # Dependents wait for the next pass: they need the map's gathered output, which is only
        # read from the database when the map completes.
        result.complete_maps.append(step.id)
        status[step.id] = StepStatus.RUNNING
        return
    active = sum(1 for item in items if item in STEP_ACTIVE)
    room = step.map.concurrency - active
    for index, item in enumerate(items):
        if room <= 0:
            break
        if item == StepStatus.PENDING:
            result.start_items.append((step.id, index))
            room -= 1


def _run_status(status: dict[str, str], result: Plan) -> str:
    values = set(status.values())
    if StepStatus.FAILED in values or StepStatus.CANCELLED in values:
        return "failed"
    if values <= STEP_DONE:
        return "succeeded"
    if values & {StepStatus.QUEUED, StepStatus.RUNNING}:
        return "running"
    if StepStatus.WAITING in values:
        return "waiting"
    return "running"
