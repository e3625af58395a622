from __future__ import annotations

from typing import Any

import pytest

from app.workflows.cel.expressions import (
    ExpressionError,
    compile_expression,
    condition_source,
    evaluate_condition,
    extract_expressions,
    is_template,
    referenced_steps,
    render,
    whole_expression,
)

CONTEXT: dict[str, Any] = {
    "input": {"name": "Ada", "count": 3, "ratio": 0.5, "tags": ["x", "y"], "flag": True, "none": None},
    "steps": {"fetch": {"output": {"status": 200, "body": {"items": [1, 2, 3]}}}},
}


# --- compile -------------------------------------------------------------------------------------------


def test_compile_is_cached_and_reusable() -> None:
    first = compile_expression("input.count + 1")
    assert compile_expression("input.count + 1") is first
    assert first.evaluate({"input": {"count": 1}}) == 2
    assert first.evaluate({"input": {"count": 41}}) == 42


def test_compile_syntax_error() -> None:
    with pytest.raises(ExpressionError) as info:
        compile_expression("input.count +")
    assert info.value.expression == "input.count +"
    assert "syntax error at 1:14" in str(info.value)
    assert "input.count +" in str(info.value)


@pytest.mark.parametrize("text", ["", "   ", "a.b.", "'unterminated", "input.?x"])
def test_compile_rejects_malformed(text: str) -> None:
    with pytest.raises(ExpressionError):
        compile_expression(text)


# --- templates -----------------------------------------------------------------------------------------


def test_is_template() -> None:
    assert is_template("${{ input.x }}")
    assert is_template("a ${{ x }} b")
    assert not is_template("plain $ {{ text }}")


def test_extract_expressions_trims_and_keeps_order() -> None:
    assert extract_expressions("a ${{  input.x }} b ${{steps.s.output}}") == ["input.x", "steps.s.output"]
    assert extract_expressions("no expressions") == []


def test_extract_expressions_handles_braces_and_strings() -> None:
    # A naive search for "}}" would stop inside the map literal or the string.
    assert extract_expressions("${{ {'a': {'b': 1}} }}") == ["{'a': {'b': 1}}"]
    assert extract_expressions("${{ '}}' + \"}}\" }} tail") == ["'}}' + \"}}\""]


def test_unterminated_template() -> None:
    with pytest.raises(ExpressionError, match="unterminated"):
        extract_expressions("hello ${{ input.name")


def test_whole_expression_and_condition_source() -> None:
    assert whole_expression("  ${{ input.x }}\n") == "input.x"
    assert whole_expression("x ${{ input.x }}") is None
    assert whole_expression("${{ a }}${{ b }}") is None
    assert whole_expression("plain") is None
    assert condition_source("${{ input.flag }}") == "input.flag"
    assert condition_source("  input.flag ") == "input.flag"
    with pytest.raises(ExpressionError, match="single"):
        condition_source("${{ a }} && ${{ b }}")


# --- render --------------------------------------------------------------------------------------------


def test_render_whole_values_keep_their_type() -> None:
    assert render("${{ input.tags }}", CONTEXT) == ["x", "y"]
    assert render(" ${{ input.count }} ", CONTEXT) == 3
    assert render("${{ input.ratio }}", CONTEXT) == 0.5
    assert render("${{ input.flag }}", CONTEXT) is True
    assert render("${{ input.none }}", CONTEXT) is None
    assert render("${{ steps.fetch.output.body }}", CONTEXT) == {"items": [1, 2, 3]}


def test_render_interpolates_mixed_strings() -> None:
    template = (
        "hi ${{ input.name }}: ${{ input.count }} ${{ input.tags }} ${{ input.flag }} ${{ input.none }}"
    )
    assert render(template, CONTEXT) == 'hi Ada: 3 ["x","y"] true null'
    assert render("${{ {'k': [1, 'two']} }}!", CONTEXT) == '{"k":[1,"two"]}!'


def test_render_walks_nested_structures() -> None:
    value = {
        "url": "https://x.test/${{ input.name }}",
        "body": {"n": "${{ input.count * 2 }}", "list": [1, "${{ steps.fetch.output.status }}", None]},
        "untouched": [True, 1.5, "plain"],
        "${{ input.name }}": "keys are not rendered",
    }
    assert render(value, CONTEXT) == {
        "url": "https://x.test/Ada",
        "body": {"n": 6, "list": [1, 200, None]},
        "untouched": [True, 1.5, "plain"],
        "${{ input.name }}": "keys are not rendered",
    }


def test_render_passes_other_values_through() -> None:
    assert render(5, CONTEXT) == 5
    assert render(None, CONTEXT) is None
    assert render("no template", CONTEXT) == "no template"


def test_render_map_item_and_index() -> None:
    args = {"value": "${{ item.v }}", "label": "#${{ index }}"}
    assert render(args, {**CONTEXT, "item": {"v": "a"}, "index": 0}) == {"value": "a", "label": "#0"}


@pytest.mark.parametrize(
    ("template", "expression", "reason"),
    [
        ("${{ input.missing }}", "input.missing", "no such key: 'missing'"),
        ("x ${{ steps.nope.output }}", "steps.nope.output", "no such key: 'nope'"),
        ("${{ input['missing'] }}", "input['missing']", "no such key: 'missing'"),
        ("${{ input.tags[5] }}", "input.tags[5]", "index out of bounds"),
        ("${{ item }}", "item", "Undefined variable"),
        ("${{ input.count + 'x' }}", "input.count + 'x'", "No such overload"),
        ("${{ 1 / 0 }}", "1 / 0", "division by zero"),
        ("${{ 1.0 / 0.0 }}", "1.0 / 0.0", "not a finite number"),
    ],
)
def test_render_errors_name_the_expression(template: str, expression: str, reason: str) -> None:
    with pytest.raises(ExpressionError) as info:
        render({"a": [template]}, CONTEXT)
    assert info.value.expression == expression
    assert reason in str(info.value)
    assert expression in str(info.value)


def test_results_are_plain_json_types() -> None:
    assert render("${{ {1: 'a', 'b': [true]} }}", CONTEXT) == {"1": "a", "b": [True]}
    assert render("${{ b'ab' }}", CONTEXT) == "YWI="  # bytes come back base64-encoded
    assert render("${{ duration('90s') }}", CONTEXT) == "90s"
    assert render("${{ timestamp('2024-01-02T03:04:05Z') }}", CONTEXT) == "2024-01-02T03:04:05Z"
    assert render("${{ 1u }}", CONTEXT) == 1


# --- conditions ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("${{ input.count > 2 }}", True),
        ("input.count > 5", False),
        ("  ${{ steps.fetch.output.status == 200 && input.flag }}  ", True),
        ("'y' in input.tags", True),
        ("has(input.missing)", False),
    ],
)
def test_evaluate_condition(text: str, expected: bool) -> None:
    assert evaluate_condition(text, CONTEXT) is expected


def test_condition_must_be_bool() -> None:
    with pytest.raises(ExpressionError, match="condition must evaluate to a bool, got int"):
        evaluate_condition("${{ input.count }}", CONTEXT)
    with pytest.raises(ExpressionError, match="got null"):
        evaluate_condition("input.none", CONTEXT)


def test_condition_missing_key() -> None:
    with pytest.raises(ExpressionError, match="no such key: 'missing'"):
        evaluate_condition("input.missing == 1", CONTEXT)


# --- referenced_steps ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("steps.fetch.output", {"fetch"}),
        ("steps.a.output.x + steps.b.output.y", {"a", "b"}),
        ("steps['a'].output + steps[\"b\"].output", {"a", "b"}),
        ("steps . spaced . output", {"spaced"}),
        ("has(steps.maybe)", {"maybe"}),
        ("steps['\\x61'].output", {"a"}),  # escapes decoded as CEL would
        ("input.steps.x", set()),  # a field of something else
        ("mysteps.x + steps_b.y", set()),
        ("'steps.a' + \"steps.b\" + '''steps.c''' + r'steps.d\\' + steps.e", {"e"}),
        ("steps.exists(k, k == 'a')", set()),  # a method on the map, not a step
        ("size(steps) > 0", set()),
        ("steps.a // steps.commented\n.output", {"a"}),
        ("steps[input.key]", set()),  # dynamic: cannot be known statically
    ],
)
def test_referenced_steps(expression: str, expected: set[str]) -> None:
    assert referenced_steps(expression) == expected


# --- guards and context narrowing ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("1" + " + 1" * 1000, "too long"),
        ("a" + ".b" * 300, "too complex"),
        ("[" * 17 + "]" * 17, "nested too deeply"),
    ],
)
def test_compile_rejects_expressions_that_would_overflow_the_native_stack(text: str, reason: str) -> None:
    # cel's Rust parser segfaults on deep input instead of raising; these must never reach it.
    with pytest.raises(ExpressionError, match=reason):
        compile_expression(text)
    compile_expression("[" * 16 + "]" * 16)


def test_deeply_nested_data_is_refused() -> None:
    deep: Any = 1
    for _ in range(101):
        deep = [deep]
    with pytest.raises(ExpressionError, match="nested too deeply"):
        render("${{ input }}", {"input": deep})
    assert render("${{ input[0] }}", {"input": deep[0]}) == deep[0][0]


def test_only_named_steps_are_handed_to_cel() -> None:
    context = {"steps": {"a": {"output": 1}, "b": {"output": 2}}}
    compiled = compile_expression("steps.a.output + steps['b'].output")
    assert compiled.variables == frozenset({"steps"}) and compiled.step_ids == frozenset({"a", "b"})
    assert compiled.evaluate(context) == 3
    assert compile_expression("size(steps)").step_ids is None
    assert render("${{ size(steps) }}", context) == 2
    assert evaluate_condition("has(steps.zz)", context) is False
    with pytest.raises(ExpressionError, match="no such key: 'zz'"):
        render("${{ steps.zz.output }}", context)
