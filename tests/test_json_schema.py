"""JSON Schema patterns that backtrack forever are stopped: the input is refused, the process goes on."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema._keywords
import jsonschema._legacy_keywords
import jsonschema._utils
import pytest
import regex
from jsonschema import Draft202012Validator, ValidationError, validators

from app import json_schema
from app.json_schema import BUDGETED_RE, VALIDATION_BUDGET_S, schema_errors
from tests.support.runs import create_workflow, name
from tests.support.tenants import TenantKey

# Backtracks exponentially in Python's `re`: about 2^40 steps before it gives up on the "!".
EVIL = "^(a|a)*$"
VICTIM = "a" * 40 + "!"
# A hang guard only: an unbounded match would take hours, a bounded one a fraction of a second.
HANG_S = 10 * VALIDATION_BUDGET_S + 5


def errors(schema: dict[str, Any], instance: Any) -> list[str]:
    started = time.monotonic()
    found = [e.message for e in schema_errors(Draft202012Validator(schema), instance)]
    assert time.monotonic() - started < HANG_S
    return found


def test_jsonschema_matches_through_the_budgeted_module() -> None:
    # If a jsonschema release stops looking `re` up on these modules, the budget silently stops
    # applying: this is the test that notices.
    for module in (jsonschema._keywords, jsonschema._utils, jsonschema._legacy_keywords):
        assert module.re is BUDGETED_RE  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("schema", "instance"),
    [
        ({"type": "string", "pattern": EVIL}, VICTIM),
        ({"type": "object", "patternProperties": {EVIL: {}}}, {VICTIM: 1}),
        ({"type": "object", "patternProperties": {EVIL: {}}, "additionalProperties": False}, {VICTIM: 1}),
        ({"type": "object", "patternProperties": {EVIL: {}}, "unevaluatedProperties": False}, {VICTIM: 1}),
        ({"type": "array", "items": {"pattern": EVIL}}, [VICTIM] * 50),
    ],
    ids=["pattern", "patternProperties", "additionalProperties", "unevaluatedProperties", "many-strings"],
)
def test_a_catastrophic_pattern_is_refused_within_the_budget(schema: dict[str, Any], instance: Any) -> None:
    found = errors(schema, instance)
    assert any("took too long to match" in message for message in found), found


def test_ordinary_patterns_match_as_before() -> None:
    schema = {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-\\d+$"}},
        "patternProperties": {"^x-": {"type": "integer"}},
        "additionalProperties": False,
    }
    assert errors(schema, {"code": "ABC-12", "x-n": 1}) == []
    found = errors(schema, {"code": "abc", "x-n": "1", "other": 1})
    assert len(found) == 3
    assert any("does not match" in m for m in found)
    assert any("is not of type 'integer'" in m for m in found)
    assert any("'other' does not match any of the regexes" in m for m in found)


class Clock:
    """A monotonic clock that moves only when told: the budget's arithmetic, free of the machine's speed."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class Matches:
    """``regex`` as the budget sees it, on a :class:`Clock`: each search takes ``per_match`` seconds on
    the clock, and the timeout it was given is recorded (the real search runs without one: the patterns
    here are trivial, and a real timeout would put the machine's speed back into the test)."""

    def __init__(self, clock: Clock, per_match: float) -> None:
        self.clock, self.per_match = clock, per_match
        self.timeouts: list[float] = []
        self.error = regex.error

    def search(self, pattern: str, text: str, flags: int = 0, *, timeout: float) -> Any:
        self.timeouts.append(timeout)
        self.clock.now += self.per_match
        return regex.search(pattern, text, flags)


def budgeted(monkeypatch: pytest.MonkeyPatch, *, per_match: float, between: float) -> tuple[Matches, Any]:
    """The budget on a fake clock, and a validator of arrays of ``^[a-z]+$`` strings whose ``tick``
    keyword, checked before each item's pattern, spends ``between`` seconds outside the matches."""
    clock = Clock()
    matches = Matches(clock, per_match)
    monkeypatch.setattr(json_schema, "time", clock)
    monkeypatch.setattr(json_schema, "regex", matches)

    def tick(validator: Any, value: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
        clock.now += between
        yield from ()

    validator_class = validators.extend(Draft202012Validator, {"tick": tick})
    return matches, validator_class({"type": "array", "items": {"tick": True, "pattern": "^[a-z]+$"}})


def test_time_between_matches_does_not_count(monkeypatch: pytest.MonkeyPatch) -> None:
    # A thousand budgets pass between the matches and none inside them: every match gets the whole budget.
    matches, validator = budgeted(monkeypatch, per_match=0.0, between=1000 * VALIDATION_BUDGET_S)
    assert schema_errors(validator, ["abc"] * 50) == []
    assert matches.timeouts == [VALIDATION_BUDGET_S] * 50


def test_time_inside_matches_counts_across_one_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each match takes half the budget: the second gets what the first left, the third finds it spent.
    half = VALIDATION_BUDGET_S / 2
    matches, validator = budgeted(monkeypatch, per_match=half, between=0.0)
    found = [e.message for e in schema_errors(validator, ["abc", "def", "ghi"])]
    assert len(found) == 1 and "took too long to match" in found[0], found
    assert matches.timeouts == [VALIDATION_BUDGET_S, half]
    # A new validation starts with the whole budget again.
    matches.timeouts.clear()
    assert schema_errors(validator, ["abc", "def"]) == []
    assert matches.timeouts == [VALIDATION_BUDGET_S, half]


async def test_a_run_input_against_a_catastrophic_pattern_is_refused(
    client: httpx.AsyncClient, tenant: TenantKey
) -> None:
    workflow = name()
    await create_workflow(
        client, tenant.headers, workflow, [{"id": "a", "tool": "echo"}],
        input_schema={"type": "object", "properties": {"s": {"type": "string", "pattern": EVIL}}},
    )
    started = time.monotonic()
    r = await client.post("/api/v1/runs", json={"workflow": workflow, "input": {"s": VICTIM}},
                          headers=tenant.headers)
    assert time.monotonic() - started < HANG_S
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert any("took too long to match" in e["message"] for e in r.json()["errors"]), r.json()
    ok = await client.post("/api/v1/runs", json={"workflow": workflow, "input": {"s": "aaa"}}, headers=tenant.headers)
    assert ok.status_code == 201, ok.text


def test_a_pattern_that_cannot_be_read_makes_the_value_invalid_not_the_process_fail() -> None:
    # A tool's schema is checked against the meta-schema without the `regex` format: "(" gets stored.
    found = errors({"type": "string", "pattern": "("}, "anything")
    assert len(found) == 1 and "cannot be used" in found[0], found
