from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.workflows.definition import DefinitionError, load_definition_text, parse_definition, validate_input
from app.workflows.document import pointer
from app.workflows.steps import (
    BUILTIN_TOOLS,
    Definition,
    LlmStep,
    MapSpec,
    MapStep,
    RetryPolicy,
    ToolStep,
    WaitSpec,
    WaitStep,
)


def step(step_id: str, *needs: str, **extra: Any) -> dict[str, Any]:
    """A minimal valid tool step."""
    body: dict[str, Any] = {"id": step_id, "tool": "echo"}
    if needs:
        body["needs"] = list(needs)
    body.update(extra)
    return body


def errors_of(raw: Any, **kwargs: Any) -> list[dict[str, str]]:
    with pytest.raises(DefinitionError) as info:
        parse_definition(raw, **kwargs)
    return info.value.errors


def assert_error(raw: Any, ptr: str, fragment: str, **kwargs: Any) -> None:
    """Exactly one error is reported, at ``ptr``, and its message contains ``fragment``."""
    errors = errors_of(raw, **kwargs)
    assert len(errors) == 1, errors
    assert errors[0]["pointer"] == ptr
    assert fragment in errors[0]["message"], errors[0]["message"]


FAN_OUT_FAN_IN: dict[str, Any] = {
    "input_schema": {
        "type": "object",
        "properties": {"urls": {"type": "array", "items": {"type": "string"}}},
        "required": ["urls"],
    },
    "limits": {"max_steps": 50, "max_tokens": 1000, "max_cost_usd": 2.5, "timeout_s": 600},
    "steps": [
        {"id": "start", "tool": "echo", "args": {"message": "${{ input.urls }}"}, "description": "kick off"},
        {
            "id": "fetch_all",
            "needs": ["start"],
            "map": {
                "items": "${{ steps.start.output }}",
                "tool": "http",
                "args": {"url": "${{ item }}", "label": "#${{ index }}"},
                "concurrency": 5,
            },
            "retry": {"max_attempts": 5, "backoff_base_s": 0.5, "backoff_max_s": 10, "jitter": False},
            "timeout_s": 120,
        },
        {"id": "left", "needs": ["start"], "tool": "sleep", "args": {"seconds": 1}},
        {"id": "approve", "needs": ["start"], "wait": {"signal": "approve:v1", "timeout_s": 3600}},
        {
            "id": "join",
            "needs": ["fetch_all", "left", "approve"],
            "when": "${{ size(steps.fetch_all.output) > 0 }}",
            "tool": "echo",
            "args": {"summary": "fetched ${{ size(steps.fetch_all.output) }} from ${{ steps.start.output }}"},
        },
    ],
}


# --- valid definitions ---------------------------------------------------------------------------------


def test_fan_out_fan_in() -> None:
    definition = parse_definition(FAN_OUT_FAN_IN)
    assert [s.id for s in definition.steps] == ["start", "fetch_all", "left", "approve", "join"]
    assert definition.order == ("start", "fetch_all", "left", "approve", "join")
    assert definition.dependents("start") == ("fetch_all", "left", "approve")
    assert definition.dependents("join") == ()
    assert definition.limits == {"max_steps": 50, "max_tokens": 1000, "max_cost_usd": 2.5, "timeout_s": 600.0}
    assert definition.input_schema == FAN_OUT_FAN_IN["input_schema"]

    start = definition.step("start")
    assert isinstance(start, ToolStep)
    assert (start.kind, start.tool, start.args) == ("tool", "echo", {"message": "${{ input.urls }}"})
    assert (start.needs, start.when, start.timeout_s, start.retry) == ((), None, None, None)

    fetch = definition.step("fetch_all")
    assert isinstance(fetch, MapStep) and fetch.kind == "map"
    assert fetch.map == MapSpec(
        items="${{ steps.start.output }}",
        tool="http",
        args={"url": "${{ item }}", "label": "#${{ index }}"},
        concurrency=5,
    )
    assert fetch.retry == RetryPolicy(max_attempts=5, backoff_base_s=0.5, backoff_max_s=10.0, jitter=False)
    assert fetch.timeout_s == 120.0

    approve = definition.step("approve")
    assert isinstance(approve, WaitStep) and approve.kind == "wait"
    assert approve.wait == WaitSpec(signal="approve:v1", timeout_s=3600.0)

    join = definition.step("join")
    assert join.needs == ("fetch_all", "left", "approve")
    assert join.when == "${{ size(steps.fetch_all.output) > 0 }}"


def test_defaults() -> None:
    definition = parse_definition(
        {
            "steps": [
                step("a", retry={"jitter": False}),
                {"id": "m", "map": {"items": [1, 2], "tool": "echo"}},
            ]
        }
    )
    assert definition.input_schema is None and definition.limits == {}
    assert definition.step("a").retry == RetryPolicy(3, 1.0, 300.0, False)
    map_spec = definition.step("m").map
    assert map_spec is not None and map_spec.concurrency == 10 and map_spec.args == {}
    small = parse_definition(
        {"steps": [{"id": "m", "map": {"items": [], "tool": "echo"}}]}, max_map_concurrency=4
    )
    assert small.step("m").map == MapSpec(items=[], tool="echo", args={}, concurrency=4)


def test_definition_is_independent_of_the_submitted_document() -> None:
    raw = copy.deepcopy(FAN_OUT_FAN_IN)
    definition = parse_definition(raw)
    raw["steps"][0]["args"]["message"] = "changed"
    assert definition.step("start").args == {"message": "${{ input.urls }}"}


def test_order_is_topological_and_stable() -> None:
    definition = parse_definition(
        {"steps": [step("c", "b"), step("x"), step("b", "a"), step("a"), step("y")]}
    )
    assert definition.order == ("x", "a", "b", "c", "y")


def test_transitive_reference_is_allowed() -> None:
    parse_definition(
        {"steps": [step("a"), step("b", "a"), step("c", "b", args={"v": "${{ steps.a.output }}"})]}
    )


def test_step_and_dependents_unknown_id() -> None:
    definition = parse_definition({"steps": [step("a")]})
    with pytest.raises(KeyError):
        definition.step("nope")
    with pytest.raises(KeyError):
        definition.dependents("nope")


def test_builtin_tools() -> None:
    assert BUILTIN_TOOLS == frozenset({"echo", "sleep", "fail", "http"})


# --- structure errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [[], "steps", None, 3])
def test_definition_must_be_object(raw: Any) -> None:
    assert_error(raw, "", "must be an object")


@pytest.mark.parametrize(
    ("raw", "ptr", "fragment"),
    [
        ({}, "", "missing required field 'steps'"),
        ({"steps": {}}, "/steps", "must be a list"),
        ({"steps": []}, "/steps", "at least one step"),
        ({"steps": [step("a")], "name": "x"}, "/name", "unknown field 'name'"),
        ({"steps": [step("a")], "a/b~c": 1}, "/a~1b~0c", "unknown field"),
        ({"steps": ["a"]}, "/steps/0", "a step must be an object"),
        ({"steps": [{"tool": "echo"}]}, "/steps/0", "missing required field 'id'"),
        ({"steps": [{"id": 7, "tool": "echo"}]}, "/steps/0/id", "must be a string"),
        ({"steps": [{"id": "9lives", "tool": "echo"}]}, "/steps/0/id", "invalid step id"),
        ({"steps": [{"id": "a" * 65, "tool": "echo"}]}, "/steps/0/id", "invalid step id"),
        ({"steps": [{"id": "a-b", "tool": "echo"}]}, "/steps/0/id", "invalid step id"),
        ({"steps": [{"id": "a\n", "tool": "echo"}]}, "/steps/0/id", "invalid step id"),
        ({"steps": [step("a", colour="red")]}, "/steps/0/colour", "unknown field 'colour'"),
        ({"steps": [step("a", description=5)]}, "/steps/0/description", "must be a string"),
    ],
)
def test_structure_errors(raw: Any, ptr: str, fragment: str) -> None:
    assert_error(raw, ptr, fragment)


def test_too_many_steps() -> None:
    raw = {"steps": [step(f"s{i}") for i in range(4)]}
    assert_error(raw, "/steps", "too many steps: 4 (at most 3 allowed)", max_steps=3)
    parse_definition(raw, max_steps=4)


# --- kinds ---------------------------------------------------------------------------------------------


def test_llm_and_agent_steps_keep_their_templates_as_args() -> None:
    definition = parse_definition({"steps": [
        {"id": "a", "tool": "echo"},
        {"id": "s", "needs": ["a"], "llm": {"model": "local/gpt-x", "system": "terse",
                                            "prompt": "sum up ${{ steps.a.output }}", "max_tokens": 100}},
        {"id": "g", "needs": ["s"], "agent": {"model": "local/meta/llama-3", "instructions": "help",
                                              "input": {"text": "${{ steps.s.output }}"}, "tools": ["echo"],
                                              "output_schema": {"type": "object"}}},
    ]})
    llm, agent = definition.step("s"), definition.step("g")
    assert isinstance(llm, LlmStep) and llm.args == {"system": "terse", "prompt": "sum up ${{ steps.a.output }}"}
    assert llm.model is not None and (llm.model.provider, llm.model.model, llm.model.output) == (
        "local", "gpt-x", "text")
    assert llm.model.max_tokens == 100 and llm.model.max_turns == 1 and llm.model.tools == ()
    assert agent.model is not None and agent.model.model == "meta/llama-3" and agent.model.output == "json"
    assert agent.model.tools == ("echo",) and agent.model.max_turns == 10 and agent.model.loop_limit == 3
    assert agent.args == {"instructions": "help", "input": {"text": "${{ steps.s.output }}"}}


def test_model_step_errors_point_at_each_field() -> None:
    with pytest.raises(DefinitionError) as info:
        parse_definition({"steps": [
            {"id": "a", "agent": {"model": "local", "input": "${{ steps.b.output }}", "tools": ["echo", "echo"],
                                  "max_turns": 0, "loop_limit": 1, "output": "yaml", "extra": 1}},
            {"id": "b", "llm": {"model": "p/m", "prompt": 3, "output_schema": {"type": "nope"}}},
            {"id": "c", "agent": {"model": "p/m", "input": "x", "tools": [f"t{i}" for i in range(21)]}},
        ]}, known_tools=None)
    errors = {e["pointer"]: e["message"] for e in info.value.errors}
    assert "'<provider>/<model>'" in errors["/steps/0/agent/model"]
    assert "duplicate tool 'echo'" in errors["/steps/0/agent/tools/1"]
    assert "/steps/0/agent/max_turns" in errors and "/steps/0/agent/loop_limit" in errors
    assert errors["/steps/0/agent/output"] == "must be 'text' or 'json'"
    assert "extra" in errors["/steps/0/agent/extra"]
    assert "does not (transitively) need 'b'" in errors["/steps/0/agent/input"]
    assert errors["/steps/1/llm/prompt"] == "must be a string"
    assert "invalid JSON Schema" in errors["/steps/1/llm/output_schema/type"]
    assert "at most 20 tools" in errors["/steps/2/agent/tools"]


def test_model_references_are_checked_against_known_providers() -> None:
    known = {"local": frozenset({"small"})}
    parse_definition({"steps": [{"id": "a", "llm": {"model": "local/small", "prompt": "hi"}}]}, known_models=known)
    assert_error({"steps": [{"id": "a", "llm": {"model": "local/big", "prompt": "hi"}}]}, "/steps/0/llm/model",
                 "provider 'local' has no model 'big'; its models: small", known_models=known)


def test_missing_kind() -> None:
    assert_error({"steps": [{"id": "a"}]}, "/steps/0", "exactly one kind")


def test_a_step_without_a_kind_still_has_its_other_fields_checked() -> None:
    errors = errors_of({"steps": [{"id": 7, "tol": "echo", "timeout_s": 0, "args": {}}, step("b", "a")]})
    assert errors == [
        {"pointer": "/steps/0/tol", "message": "unknown field 'tol'"},
        {"pointer": "/steps/0",
         "message": "a step must have exactly one kind: 'tool', 'wait', 'map', 'approval', 'llm' or 'agent'"},
        {"pointer": "/steps/0/id", "message": "must be a string"},
        {"pointer": "/steps/0/timeout_s", "message": "must be greater than 0"},
        {"pointer": "/steps/0/args", "message": "'args' is only allowed on 'tool' steps (a map step takes map.args)"},
        {"pointer": "/steps/1/needs/0", "message": "unknown step 'a'"},
    ]


def test_step_types_carry_only_their_spec() -> None:
    definition = parse_definition({"steps": [step("a"), {"id": "w", "wait": {"signal": "go"}}]})
    tool, wait = definition.steps
    assert isinstance(tool, ToolStep) and not hasattr(tool, "wait")
    assert isinstance(wait, WaitStep) and not hasattr(wait, "tool") and not hasattr(wait, "args")


def test_two_kinds() -> None:
    raw = {"steps": [{"id": "a", "tool": "echo", "wait": {"signal": "s"}}]}
    assert_error(raw, "/steps/0", "exactly one kind, got 'tool', 'wait'")


def test_unknown_tool_lists_available_tools() -> None:
    assert_error(
        {"steps": [{"id": "a", "tool": "shell"}]}, "/steps/0/tool", "available tools: echo, fail, http, sleep"
    )
    assert_error({"steps": [{"id": "a", "tool": 3}]}, "/steps/0/tool", "must be a string")
    raw = {"steps": [{"id": "m", "map": {"items": [], "tool": "shell"}}]}
    assert_error(raw, "/steps/0/map/tool", "unknown tool 'shell'")


@pytest.mark.parametrize(
    ("body", "ptr", "fragment"),
    [
        ({"args": [1]}, "/steps/0/args", "must be an object"),
        ({"timeout_s": 0}, "/steps/0/timeout_s", "greater than 0"),
        ({"timeout_s": 86401}, "/steps/0/timeout_s", "at most 86400"),
        ({"timeout_s": "5"}, "/steps/0/timeout_s", "must be a number"),
        ({"timeout_s": True}, "/steps/0/timeout_s", "must be a number"),
        ({"timeout_s": float("nan")}, "/steps/0/timeout_s", "must be a number"),
        ({"retry": 3}, "/steps/0/retry", "must be an object"),
        ({"retry": {"max_attempts": 0}}, "/steps/0/retry/max_attempts", "between 1 and 100"),
        ({"retry": {"max_attempts": 101}}, "/steps/0/retry/max_attempts", "between 1 and 100"),
        ({"retry": {"max_attempts": 2.0}}, "/steps/0/retry/max_attempts", "must be an integer"),
        ({"retry": {"backoff_base_s": -1}}, "/steps/0/retry/backoff_base_s", "at least 0"),
        ({"retry": {"backoff_max_s": -1}}, "/steps/0/retry/backoff_max_s", "at least 0"),
        (
            {"retry": {"backoff_base_s": 5, "backoff_max_s": 1}},
            "/steps/0/retry/backoff_max_s",
            "backoff_base_s",
        ),
        ({"retry": {"jitter": "yes"}}, "/steps/0/retry/jitter", "must be a boolean"),
        ({"retry": {"tries": 2}}, "/steps/0/retry/tries", "unknown field"),
        ({"when": 1}, "/steps/0/when", "must be a string"),
    ],
)
def test_tool_step_field_errors(body: dict[str, Any], ptr: str, fragment: str) -> None:
    assert_error({"steps": [step("a", **body)]}, ptr, fragment)


@pytest.mark.parametrize(
    ("wait", "ptr", "fragment"),
    [
        ("s", "/steps/0/wait", "must be an object"),
        ({}, "/steps/0/wait", "missing required field 'signal'"),
        ({"signal": "has space"}, "/steps/0/wait/signal", "must be a string matching"),
        ({"signal": "x" * 129}, "/steps/0/wait/signal", "must be a string matching"),
        ({"signal": 5}, "/steps/0/wait/signal", "must be a string matching"),
        ({"signal": "ok", "timeout_s": 0}, "/steps/0/wait/timeout_s", "greater than 0"),
        ({"signal": "ok", "timeout_s": 1e300}, "/steps/0/wait/timeout_s", "at most 1e+09"),
        ({"signal": "ok", "extra": 1}, "/steps/0/wait/extra", "unknown field"),
    ],
)
def test_wait_errors(wait: Any, ptr: str, fragment: str) -> None:
    assert_error({"steps": [{"id": "a", "wait": wait}]}, ptr, fragment)


def test_args_only_on_tool_steps() -> None:
    raw = {"steps": [{"id": "a", "wait": {"signal": "s"}, "args": {}}]}
    assert_error(raw, "/steps/0/args", "only allowed on 'tool' steps")


@pytest.mark.parametrize(
    ("map_body", "ptr", "fragment"),
    [
        ([], "/steps/0/map", "must be an object"),
        ({"tool": "echo"}, "/steps/0/map", "missing required field 'items'"),
        ({"items": []}, "/steps/0/map", "missing required field 'tool'"),
        ({"items": "input.list", "tool": "echo"}, "/steps/0/map/items", "single ${{ }} expression"),
        (
            {"items": "${{ a }} and ${{ b }}", "tool": "echo"},
            "/steps/0/map/items",
            "single ${{ }} expression",
        ),
        ({"items": 3, "tool": "echo"}, "/steps/0/map/items", "must be a list"),
        ({"items": "${{ input. }}", "tool": "echo"}, "/steps/0/map/items", "syntax error"),
        # Raised out of the parser (a 500) before the structure was checked with Pydantic.
        ({"items": "${{ input.list", "tool": "echo"}, "/steps/0/map/items", "unterminated"),
        ({"items": [1, 2, 3], "tool": "echo"}, "/steps/0/map/items", "too many items: 3 (at most 2 allowed)"),
        ({"items": [], "tool": "echo", "concurrency": 0}, "/steps/0/map/concurrency", "between 1 and 8"),
        ({"items": [], "tool": "echo", "concurrency": 9}, "/steps/0/map/concurrency", "between 1 and 8"),
        ({"items": [], "tool": "echo", "args": 1}, "/steps/0/map/args", "must be an object"),
        ({"items": [], "tool": "echo", "args": {"v": "${{ item. }}"}}, "/steps/0/map/args/v", "syntax error"),
        ({"items": [], "tool": "echo", "parallel": 2}, "/steps/0/map/parallel", "unknown field"),
    ],
)
def test_map_errors(map_body: Any, ptr: str, fragment: str) -> None:
    raw = {"steps": [{"id": "m", "map": map_body}]}
    assert_error(raw, ptr, fragment, max_map_items=2, max_map_concurrency=8)


# --- expressions ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "ptr"),
    [
        ({"when": "${{ input.x == }}"}, "/steps/1/when"),
        ({"when": "input.x =="}, "/steps/1/when"),
        ({"args": {"url": "https://x/${{ input. }}"}}, "/steps/1/args/url"),
        ({"args": {"list": [1, 2, "${{ (1 }}"]}}, "/steps/1/args/list/2"),
        ({"args": {"a/b": {"c~d": "${{ ! }}"}}}, "/steps/1/args/a~1b/c~0d"),
    ],
)
def test_bad_cel_syntax(body: dict[str, Any], ptr: str) -> None:
    assert_error({"steps": [step("a"), step("b", **body)]}, ptr, "syntax error")


def test_unterminated_template_in_args() -> None:
    assert_error({"steps": [step("a", args={"x": "${{ input.x"})]}, "/steps/0/args/x", "unterminated")


def test_when_must_be_a_single_expression() -> None:
    raw = {"steps": [step("a", when="${{ input.a }} && ${{ input.b }}")]}
    assert_error(raw, "/steps/0/when", "single ${{ }} expression")


def test_reference_to_unknown_step() -> None:
    raw = {"steps": [step("a", args={"v": "${{ steps.ghost.output }}"})]}
    assert_error(raw, "/steps/0/args/v", "step 'a' uses steps.ghost but there is no step 'ghost'")


def test_reference_without_needs() -> None:
    raw = {"steps": [step("a"), step("b", args={"v": "x ${{ steps.a.output }}"})]}
    assert_error(raw, "/steps/1/args/v", "step 'b' uses steps.a.output but does not (transitively) need 'a'")


def test_reference_to_a_dependent_or_sibling_is_rejected() -> None:
    raw = {
        "steps": [
            step("a", when="steps.b.output == 1"),
            step("b", "a"),
            step("c", "a", args={"v": "${{ steps['b'].output }}"}),
        ]
    }
    errors = errors_of(raw)
    assert [e["pointer"] for e in errors] == ["/steps/0/when", "/steps/2/args/v"]
    assert all("does not (transitively) need 'b'" in e["message"] for e in errors)


def test_reference_to_self_is_rejected() -> None:
    raw = {"steps": [step("a", args={"v": "${{ steps.a.output }}"})]}
    assert_error(raw, "/steps/0/args/v", "does not (transitively) need 'a'")


def test_references_in_map_items_and_args() -> None:
    raw = {
        "steps": [
            step("a"),
            {
                "id": "m",
                "map": {"items": "${{ steps.a.output }}", "tool": "echo", "args": {"v": "${{ steps.a }}"}},
            },
        ]
    }
    errors = errors_of(raw)
    assert [e["pointer"] for e in errors] == ["/steps/1/map/items", "/steps/1/map/args/v"]


def test_item_and_index_are_not_checked_outside_map() -> None:
    parse_definition({"steps": [step("a", args={"v": "${{ item }}", "i": "${{ index }}"})]})


# --- needs and the graph -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("needs", "ptr", "fragment"),
    [
        ("a", "/steps/1/needs", "must be a list"),
        (["a", "a"], "/steps/1/needs/1", "duplicate need 'a'"),
        (["b"], "/steps/1/needs/0", "cannot need itself"),
        (["a", 3], "/steps/1/needs/1", "must be a string"),
        (["a", "nope"], "/steps/1/needs/1", "unknown step 'nope'"),
    ],
)
def test_needs_errors(needs: Any, ptr: str, fragment: str) -> None:
    assert_error({"steps": [step("a"), {"id": "b", "tool": "echo", "needs": needs}]}, ptr, fragment)


def test_duplicate_ids_point_at_the_second() -> None:
    raw = {"steps": [step("a"), step("b"), step("a")]}
    assert_error(raw, "/steps/2/id", "duplicate step id 'a' (also used at /steps/0)")


def test_two_step_cycle() -> None:
    assert_error({"steps": [step("a", "b"), step("b", "a")]}, "/steps/0/needs", "cycle: a -> b -> a")


def test_longer_cycle_reports_its_members_only() -> None:
    raw = {"steps": [step("root"), step("x", "root", "z"), step("y", "x"), step("z", "y"), step("tail", "z")]}
    assert_error(raw, "/steps/1/needs", "cycle: x -> z -> y -> x")


def test_each_independent_cycle_is_reported() -> None:
    raw = {"steps": [step("a", "b"), step("b", "a"), step("c", "d"), step("d", "c")]}
    errors = errors_of(raw)
    assert errors == [
        {"pointer": "/steps/0/needs", "message": "cycle: a -> b -> a"},
        {"pointer": "/steps/2/needs", "message": "cycle: c -> d -> c"},
    ]


# --- collecting everything -----------------------------------------------------------------------------


def test_all_errors_are_collected() -> None:
    raw = {
        "steps": [
            {"id": "a", "tool": "nope"},
            {"id": "a", "tool": "echo", "needs": ["zz"], "when": "1 +"},
            {"id": "c", "llm": {}},
        ],
        "limits": {"max_tokens": 0},
    }
    pointers = {e["pointer"] for e in errors_of(raw)}
    assert pointers == {
        "/limits/max_tokens",
        "/steps/0/tool",
        "/steps/1/when",
        "/steps/1/id",
        "/steps/1/needs/0",
        "/steps/2/llm",
    }


def test_definition_error_message_summarises() -> None:
    with pytest.raises(DefinitionError) as info:
        parse_definition({"steps": [], "x": 1})
    assert str(info.value) == "invalid definition at '/x': unknown field 'x' (and 1 more)"


# --- limits and input_schema ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limits", "ptr", "fragment"),
    [
        ([], "/limits", "must be an object"),
        ({"max_steps": 0}, "/limits/max_steps", "between 1 and 1000000"),
        ({"max_steps": 1_000_001}, "/limits/max_steps", "between 1 and 1000000"),
        ({"max_tokens": 10**12 + 1}, "/limits/max_tokens", "between 1 and"),
        ({"max_cost_usd": 1e300}, "/limits/max_cost_usd", "at most 1e+09"),
        # A deadline past what a timestamp holds broke every query computing it, the reconciler's too.
        ({"timeout_s": 1e300}, "/limits/timeout_s", "at most 1e+09"),
        ({"max_steps": 1.5}, "/limits/max_steps", "must be an integer"),
        ({"max_tokens": True}, "/limits/max_tokens", "must be an integer"),
        ({"max_cost_usd": 0}, "/limits/max_cost_usd", "greater than 0"),
        ({"timeout_s": -1}, "/limits/timeout_s", "greater than 0"),
        ({"max_runs": 1}, "/limits/max_runs", "unknown field"),
    ],
)
def test_limit_errors(limits: Any, ptr: str, fragment: str) -> None:
    assert_error({"steps": [step("a")], "limits": limits}, ptr, fragment)


@pytest.mark.parametrize(
    ("schema", "ptr"),
    [
        ([], "/input_schema"),
        ({"type": "objekt"}, "/input_schema/type"),
        ({"properties": {"a/b": {"minimum": "1"}}}, "/input_schema/properties/a~1b/minimum"),
        ({"required": "name"}, "/input_schema/required"),
    ],
)
def test_invalid_input_schema(schema: Any, ptr: str) -> None:
    errors = errors_of({"steps": [step("a")], "input_schema": schema})
    assert [e["pointer"] for e in errors] == [ptr]


def test_validate_input() -> None:
    definition = parse_definition(
        {
            "steps": [step("a")],
            "input_schema": {
                "type": "object",
                "properties": {
                    "customer": {
                        "type": "object",
                        "properties": {"id": {"type": "integer"}, "a/b": {"type": "string"}},
                        "required": ["id"],
                    }
                },
                "required": ["customer"],
            },
        }
    )
    assert validate_input(definition, {"customer": {"id": 5}}) == []
    errors = validate_input(definition, {"customer": {"id": "x", "a/b": 1}})
    assert [e["pointer"] for e in errors] == ["/customer/a~1b", "/customer/id"]
    assert "'x' is not of type 'integer'" in errors[1]["message"]
    missing = validate_input(definition, {"customer": {}})
    assert missing == [{"pointer": "/customer", "message": "'id' is a required property"}]
    assert validate_input(definition, []) == [{"pointer": "", "message": "[] is not of type 'object'"}]


def test_validate_input_without_schema() -> None:
    assert validate_input(parse_definition({"steps": [step("a")]}), {"anything": 1}) == []


def test_validate_input_unresolvable_ref() -> None:
    definition = parse_definition({"steps": [step("a")], "input_schema": {"$ref": "#/$defs/missing"}})
    errors = validate_input(definition, {})
    assert len(errors) == 1 and errors[0]["pointer"] == "" and "unresolvable" in errors[0]["message"]


# --- text ----------------------------------------------------------------------------------------------

YAML_TEXT = """
input_schema:
  type: object
steps:
  - id: fetch
    tool: http
    args:
      url: "https://example.test/${{ input.id }}"
      when: 2024-01-02   # a date stays a string
  - id: report
    needs: [fetch]
    when: ${{ steps.fetch.output.status == 200 }}
    tool: echo
    args:
      body: ${{ steps.fetch.output }}
"""


@pytest.mark.parametrize(
    "content_type", ["application/yaml", "text/yaml; charset=utf-8", "application/x-yaml", None]
)
def test_yaml_definition(content_type: str | None) -> None:
    raw = load_definition_text(YAML_TEXT, content_type)
    definition = parse_definition(raw)
    assert definition.order == ("fetch", "report")
    assert definition.step("fetch").args == {
        "url": "https://example.test/${{ input.id }}",
        "when": "2024-01-02",
    }
    assert definition.step("report").when == "${{ steps.fetch.output.status == 200 }}"


@pytest.mark.parametrize("content_type", ["application/json", "application/vnd.steward+json", None])
def test_json_definition(content_type: str | None) -> None:
    text = '{"steps": [{"id": "a", "tool": "echo", "args": {"x": 1.5}}]}'
    assert load_definition_text(text, content_type) == {
        "steps": [{"id": "a", "tool": "echo", "args": {"x": 1.5}}]
    }


@pytest.mark.parametrize(
    ("text", "content_type", "fragment"),
    [
        ('{"steps": [}', "application/json", "invalid JSON"),
        ('{"steps": [}', None, "invalid JSON"),
        ('{"x": NaN}', "application/json", "NaN is not a valid JSON number"),
        ("steps: [a, b", "application/yaml", "invalid YAML"),
        ("steps:\n  - id: a\n   tool: x\n", None, "invalid YAML"),
        ("a: 1\n---\nb: 2\n", "text/yaml", "invalid YAML"),
        ("[" * 100_000, "application/json", "invalid JSON"),
    ],
)
def test_unparsable_text(text: str, content_type: str | None, fragment: str) -> None:
    with pytest.raises(DefinitionError) as info:
        load_definition_text(text, content_type)
    [error] = info.value.errors
    assert error["pointer"] == "" and fragment in error["message"]


@pytest.mark.parametrize(
    ("text", "ptr", "fragment"),
    [
        ("steps:\n  - {id: a, tool: echo, args: {1: x}}\n", "/steps/0/args/1", "keys must be strings"),
        ("x: .nan\n", "/x", "finite"),
        ("x: !!binary aGk=\n", "/x", "not a JSON value (bytes)"),
        ("x: !!set {a}\n", "/x", "not a JSON value (set)"),
    ],
)
def test_yaml_outside_json(text: str, ptr: str, fragment: str) -> None:
    with pytest.raises(DefinitionError) as info:
        load_definition_text(text, "application/yaml")
    [error] = info.value.errors
    assert error["pointer"] == ptr and fragment in error["message"]


def test_yaml_alias_bomb_is_capped() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
    with pytest.raises(DefinitionError, match="document too large"):
        load_definition_text("\n".join(lines), "application/yaml")


# --- pointers ------------------------------------------------------------------------------------------


def test_pointer_escaping() -> None:
    assert pointer(()) == ""
    assert pointer(("steps", 3, "needs", 0)) == "/steps/3/needs/0"
    assert pointer(("a/b", "m~n", "~/")) == "/a~1b/m~0n/~0~1"


# --- property: random DAGs -----------------------------------------------------------------------------


@st.composite
def dags(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Steps whose needs only point at earlier-generated steps (so acyclic), listed in a random order."""
    count = draw(st.integers(min_value=1, max_value=12))
    ids = [f"s{i}" for i in range(count)]
    steps = [
        step(ids[i], *draw(st.lists(st.sampled_from(ids[:i]), unique=True)) if i else ())
        for i in range(count)
    ]
    return draw(st.permutations(steps))


@settings(max_examples=150, deadline=None)
@given(dags())
def test_random_dags_parse_in_dependency_order(steps: list[dict[str, Any]]) -> None:
    definition = parse_definition({"steps": steps})
    position = {step_id: i for i, step_id in enumerate(definition.order)}
    assert sorted(definition.order) == sorted(s["id"] for s in steps)
    for s in steps:
        for need in s.get("needs", []):
            assert position[need] < position[s["id"]]
            assert s["id"] in definition.dependents(need)


@settings(max_examples=150, deadline=None)
@given(dags(), st.data())
def test_back_edge_makes_a_cycle(steps: list[dict[str, Any]], data: st.DataObject) -> None:
    edges = [(s["id"], need) for s in steps for need in s.get("needs", [])]
    if not edges:
        steps = [*steps, step("extra", steps[0]["id"])]
        edges = [("extra", steps[0]["id"])]
    dependent, need = data.draw(st.sampled_from(edges))
    needed = next(s for s in steps if s["id"] == need)
    needed["needs"] = [*needed.get("needs", []), dependent]
    errors = errors_of({"steps": steps})
    assert any(e["message"].startswith("cycle: ") for e in errors)
    cycle_errors = [e for e in errors if e["message"].startswith("cycle: ")]
    assert all(e["pointer"].endswith("/needs") for e in cycle_errors)
    assert {need, dependent} <= set(cycle_errors[0]["message"].removeprefix("cycle: ").split(" -> "))


def test_already_ordered_definition_keeps_its_order() -> None:
    definition = parse_definition({"steps": [step("a"), step("b", "a"), step("c"), step("d", "b", "c")]})
    assert definition.order == ("a", "b", "c", "d")
    assert isinstance(definition, Definition)
