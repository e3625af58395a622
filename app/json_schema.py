"""JSON Schema validation whose regular expressions cannot hang a process.

jsonschema matches ``pattern``, ``patternProperties`` (and, through them, ``additionalProperties`` and
``unevaluatedProperties``) with Python's ``re``, which backtracks without limit: a schema's author (a
workflow's ``input_schema``, a tool's) could write ``^(a|a)*$`` and make every run request or tool call
spin on the event loop for minutes. jsonschema has no hook for its regex engine, so the ``re`` its keyword
modules hold is replaced, once, by one whose ``search`` uses the ``regex`` module under a timeout; every
other ``re`` function is the real one. One validation shares one time budget across all its matches
(:func:`schema_errors`), and running out of it makes the instance invalid ("took too long to match"):
the input is refused, never waited for. ``tests/test_json_schema.py`` fails if a jsonschema release stops
matching through those module attributes.

Validate only through :func:`schema_errors`: ``iter_errors`` alone raises :class:`PatternRefused`.
"""

from __future__ import annotations

import re
import time
from contextvars import ContextVar
from types import ModuleType
from typing import Any

import jsonschema._keywords
import jsonschema._legacy_keywords
import jsonschema._utils
import regex
from jsonschema import Draft202012Validator, ValidationError

# Time for all the regular-expression matches of one validation (matching time only, not the rest).
VALIDATION_BUDGET_S = 0.25

# Seconds of matching the current validation has left (a one-item list, spent by each match).
_left: ContextVar[list[float]] = ContextVar("schema_match_budget")


class PatternRefused(Exception):
    """A pattern did not finish matching within the validation's budget, or ``regex`` cannot read it."""


def _too_slow(pattern: str) -> PatternRefused:
    return PatternRefused(f"the pattern {pattern!r} took too long to match (over {VALIDATION_BUDGET_S:g}s)")


def _search(pattern: str, text: str, flags: int = 0) -> Any:
    left = _left.get([VALIDATION_BUDGET_S])
    if left[0] <= 0:
        raise _too_slow(pattern)
    started = time.monotonic()
    try:
        return regex.search(pattern, text, flags, timeout=left[0])
    except TimeoutError:
        raise _too_slow(pattern) from None
    except regex.error as exc:
        # The meta-schema checked it with `re`; falling back to `re` would bring the hang back.
        raise PatternRefused(f"the pattern {pattern!r} cannot be used: {exc}") from None
    finally:
        left[0] -= time.monotonic() - started


class _BudgetedRe(ModuleType):
    """``re``, but for ``search``."""

    def __init__(self) -> None:
        super().__init__("re")
        self.__dict__.update({name: getattr(re, name) for name in dir(re) if not name.startswith("__")})
        self.search = _search


BUDGETED_RE = _BudgetedRe()
for _module in (jsonschema._keywords, jsonschema._utils, jsonschema._legacy_keywords):
    _module.re = BUDGETED_RE


def schema_errors(validator: Draft202012Validator, instance: Any) -> list[ValidationError]:
    """Every error of ``instance`` against the validator's schema; its matches share one time budget."""
    token = _left.set([VALIDATION_BUDGET_S])
    try:
        return list(validator.iter_errors(instance))
    except PatternRefused as exc:
        return [ValidationError(str(exc))]
    finally:
        _left.reset(token)
