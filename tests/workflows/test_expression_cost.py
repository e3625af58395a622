"""The static cost of CEL expressions, and the sandbox that evaluates the costly ones."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from app.tools.spec import STORED, ToolSpec
from app.workflows.cel import evaluation
from app.workflows.cel.cost import INLINE_MAX_VALUES, MAX_COMPREHENSION_NESTING, MAX_LITERAL_ITERATIONS, Loop
from app.workflows.cel.evaluation import MAX_CONTEXT_VALUES, Budget
from app.workflows.cel.expressions import ExpressionError, ExpressionLimit, check_expression, compile_expression
from app.workflows.cel.sandbox import Sandbox
from app.workflows.definition import DefinitionError, parse_definition

TEN = "[0,1,2,3,4,5,6,7,8,9]"
DEEP = f"{TEN}.all(a, {TEN}.all(b, {TEN}.all(c, {TEN}.all(d, {TEN}.all(e, true)))))"


def loops(source: str) -> tuple[Loop, ...]:
    return compile_expression(source).cost.loops


# --- static analysis -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("input.x + 1", ()),
        ("[1, 2, 3].map(x, x * 2)", (Loop(3, 0, False),)),
        ("{'a': 1, 'b': [1, 2]}.all(k, k != '')", (Loop(2, 0, False),)),
        ("input.xs.filter(x, x > 1)", (Loop(1, 1, False),)),
        ("steps['a'].output.rows.exists(r, r.ok)", (Loop(1, 1, False),)),
        ("input.a.map(x, input.b.map(y, x + y))", (Loop(1, 1, False), Loop(1, 2, False))),
        ("input.a.exists(x, [1, 2].exists(y, y == x))", (Loop(1, 1, False), Loop(2, 1, False))),
        # Chained, not nested: the second ranges over the first's result (size unknown: opaque).
        ("input.a.map(x, x).all(y, y > 0)", (Loop(1, 1, False), Loop(1, 1, True))),
        ("(input.a + input.b).all(x, x > 0)", (Loop(1, 1, True),)),
        ("[[1, 2], [3]][0].all(x, x > 0)", (Loop(1, 1, True),)),
        # Names and strings that look like macros are not loops.
        ("input.map + size('x.all(y, true)')", ()),
    ],
)
def test_loops_are_read_from_the_tokens(source: str, expected: tuple[Loop, ...]) -> None:
    assert loops(source) == expected


def test_limits_refuse_deep_nesting_and_large_literal_products() -> None:
    assert compile_expression(DEEP).cost.nesting == 5
    with pytest.raises(ExpressionError, match=f"nested 5 deep; at most {MAX_COMPREHENSION_NESTING}"):
        check_expression(DEEP)
    thirty = "[" + ",".join(map(str, range(30))) + "]"
    product = f"{thirty}.all(a, {thirty}.all(b, {thirty}.all(c, true)))"
    with pytest.raises(ExpressionError, match=f"iterate 27930 times; at most {MAX_LITERAL_ITERATIONS}"):
        check_expression(product)
    assert check_expression("input.a.all(x, input.b.all(y, input.c.all(z, x + y + z > 0)))")
    # Compiling alone (what stored definitions do) still accepts them.
    assert compile_expression(DEEP).source == DEEP


def test_inline_only_when_cheap_for_the_data() -> None:
    hot = compile_expression("input.x").cost
    assert hot.inline_ok(values=50, chars=500)
    assert not hot.inline_ok(values=INLINE_MAX_VALUES + 1, chars=0)
    cube = compile_expression("input.a.all(x, input.a.all(y, input.a.all(z, true)))").cost
    assert cube.inline_ok(values=2, chars=0) and not cube.inline_ok(values=100, chars=0)
    assert not compile_expression("(input.a + input.a).all(x, true)").cost.inline_ok(values=2, chars=0)


def test_stored_definitions_and_tools_keep_loading() -> None:
    definition = {"steps": [{"id": "a", "tool": "echo", "when": f"${{{{ {DEEP} }}}}"}]}
    with pytest.raises(DefinitionError, match="too costly"):
        parse_definition(definition)
    assert parse_definition(definition, stored=True).step("a").when
    spec: dict[str, Any] = {"name": "t", "description": "d", "input_schema": {"type": "object"},
                            "effect": "read", "executor": {"kind": "builtin", "name": "echo"},
                            "autonomy": {"mode": "conditional", "condition": DEEP}}
    with pytest.raises(ValueError, match="too costly"):
        ToolSpec.model_validate(spec)
    assert ToolSpec.model_validate(spec, context=STORED).autonomy.condition == DEEP


def test_comprehension_variables_are_not_context_names() -> None:
    compiled = compile_expression("args.xs.all(a, args.ys.exists(b, a == b))")
    assert compiled.bound == {"a", "b"} and compiled.variables - compiled.bound == {"args"}


# --- evaluation ----------------------------------------------------------------------------------------


async def test_cheap_expressions_render_inline_and_costly_ones_in_the_sandbox() -> None:
    context = {"input": {"x": 2, "xs": list(range(300))}}
    budget = Budget(10)
    busy_before = evaluation.sandbox().busy
    assert await evaluation.render({"v": "${{ input.x + 1 }}", "s": "x=${{ input.x }}"}, context, budget) == {
        "v": 3, "s": "x=2"}
    assert evaluation.sandbox().busy == busy_before
    # 300 x 300: over what is evaluated inline, well within the budget in the sandbox.
    assert await evaluation.condition("input.xs.all(a, input.xs.all(b, a + b >= 0))", context, budget)
    assert 0 < budget.spent < budget.seconds


async def test_evaluation_errors_keep_their_message_through_the_sandbox() -> None:
    context = {"input": {"xs": list(range(300))}}
    with pytest.raises(ExpressionError) as info:
        await evaluation.condition("input.xs.all(a, input.xs.all(b, a + b >= 0)) && input.nope", context, Budget(10))
    assert not isinstance(info.value, ExpressionLimit) and "no such key: 'nope'" in info.value.reason


async def test_an_overrun_is_killed_the_loop_keeps_running_and_the_next_evaluation_works() -> None:
    context = {"input": {"xs": list(range(400))}}
    costly = "input.xs.all(a, input.xs.all(b, input.xs.all(c, a + b + c >= 0)))"
    gaps: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        while not done.is_set():
            started = time.perf_counter()
            await asyncio.sleep(0.005)
            gaps.append(time.perf_counter() - started)

    ticker = asyncio.create_task(tick())
    budget = Budget(0.5)
    with pytest.raises(ExpressionLimit, match="budget"):
        await asyncio.wait_for(evaluation.condition(costly, context, budget), 30)
    done.set()
    await ticker
    assert len(gaps) > 10 and max(gaps) < 0.5, gaps  # ~64M iterations would have held it ~25 s
    assert await evaluation.condition("input.xs.all(a, input.xs.all(b, a + b >= 0))", context, Budget(10))
    with pytest.raises(ExpressionLimit, match="budget"):  # nothing left of a spent budget
        await evaluation.render("${{ input.xs.all(a, input.xs.all(b, a >= b)) }}", context, budget)


async def test_running_out_of_memory_fails_the_evaluation_not_the_process() -> None:
    sandbox = Sandbox(processes=1, memory_mb=256)
    context = {"input": {"xs": list(range(400)), "s": "x" * 1_000_000}}
    try:
        with pytest.raises(ExpressionLimit, match="out of memory"):
            await sandbox.evaluate({"op": "render", "value": "${{ input.xs.map(a, input.s + input.s) }}",
                                    "context": context}, 30, "test")
        result, _ = await sandbox.evaluate({"op": "condition", "text": "size(input.s) > 0", "context": context},
                                           30, "test")
        assert result is True
    finally:
        sandbox.close()


async def test_too_much_data_is_refused() -> None:
    context = {"input": {"xs": list(range(MAX_CONTEXT_VALUES + 1))}}
    with pytest.raises(ExpressionLimit, match="reads too much data"):
        await evaluation.condition("size(input.xs) > 0", context, Budget(10))
