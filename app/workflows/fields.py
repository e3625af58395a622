"""Typed field checks for the definition document's Pydantic models, with the messages clients see.

Each check is a Pydantic validator raising :func:`problem`; :func:`merged` lets a model or field report
errors found on its raw input together with those of its own fields, so one pass reports them all.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from typing import Any, TypeGuard, TypeVar

from jsonschema import Draft202012Validator
from pydantic import (
    BeforeValidator,
    JsonValue,
    PlainValidator,
    ValidationError,
    ValidationInfo,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from app.json_schema import schema_errors
from app.workflows.document import ErrorList, Path, pointer

# The error type of every problem raised here; the message is the client's, ready to show.
PROBLEM = "definition"
# Checking a JSON Schema against the 2020-12 meta-schema costs ~0.1 ms per value: cap what a schema holds.
MAX_SCHEMA_VALUES = 2000
_META_SCHEMA = Draft202012Validator(
    Draft202012Validator.META_SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER
)
T = TypeVar("T")


def problem(message: str) -> PydanticCustomError:
    # Passed as context, not as the template: messages quote `${{ }}`, which a template would expand.
    return PydanticCustomError(PROBLEM, "{message}", {"message": message})


def problems_at(title: str, found: list[tuple[Path, str]], data: Any) -> ValidationError:
    """One error per ``(path, message)``, each at its path below the value being validated."""
    return ValidationError.from_exception_data(
        title, [InitErrorDetails(type=problem(message), loc=path, input=data) for path, message in found]
    )


def merged(title: str, found: list[tuple[Path, str]], data: Any, validate: Callable[[Any], T]) -> T:
    """``validate(data)``, raising its errors and ``found`` together when there are any."""
    if not found:
        return validate(data)
    errors = [InitErrorDetails(type=problem(message), loc=path, input=data) for path, message in found]
    try:
        validate(data)
    except ValidationError as exc:
        # Relayed with their type (the mapping to pointers reads it) and message.
        errors += [
            InitErrorDetails(type=PydanticCustomError(e["type"], "{message}", {"message": e["msg"]}),
                             loc=e["loc"], input=e["input"])
            for e in exc.errors(include_url=False)
        ]
    raise ValidationError.from_exception_data(title, errors)


def string(message: str = "must be a string") -> PlainValidator:
    def check(value: object) -> str:
        if not isinstance(value, str):
            raise problem(message)
        return value

    return PlainValidator(check)


def matching(pattern: str, message: str) -> PlainValidator:
    compiled = re.compile(pattern)

    def check(value: object) -> str:
        if not isinstance(value, str) or not compiled.fullmatch(value):
            raise problem(message)
        return value

    return PlainValidator(check)


def one_of(choices: tuple[str, ...], message: str, *, nullable: bool = False) -> PlainValidator:
    def check(value: object) -> str | None:
        if value is None and nullable:
            return None
        if value not in choices:
            raise problem(message)
        return str(value)

    return PlainValidator(check)


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise problem("must be a boolean")
    return value


BOOLEAN = PlainValidator(_boolean)


def integer(minimum: int, maximum: int | Callable[[ValidationInfo], int]) -> PlainValidator:
    """An int in ``[minimum, maximum]``; ``maximum`` may come from the validation context."""

    def check(value: object, info: ValidationInfo) -> int:
        # bool is an int subclass, and `true` is never a sensible count.
        if not isinstance(value, int) or isinstance(value, bool):
            raise problem("must be an integer")
        top = maximum(info) if callable(maximum) else maximum
        if not minimum <= value <= top:
            raise problem(f"must be between {minimum} and {top}")
        return value

    return PlainValidator(check)


def number(
    *, gt: float | None = None, ge: float | None = None, le: float | None = None, lt: float | None = None
) -> PlainValidator:
    """A finite number within the bounds, as a float."""

    def check(value: object) -> float:
        if not is_number(value):
            raise problem("must be a number")
        found = [
            f"greater than {gt:g}" if gt is not None and not value > gt else "",
            f"at least {ge:g}" if ge is not None and not value >= ge else "",
            f"at most {le:g}" if le is not None and not value <= le else "",
            f"less than {lt:g}" if lt is not None and not value < lt else "",
        ]
        if any(found):
            raise problem("must be " + " and ".join(p for p in found if p))
        return float(value)

    return PlainValidator(check)


def is_number(value: object) -> TypeGuard[int | float]:
    """A JSON number that is finite (and not a bool, which Python counts as an int)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def is_object(message: str = "must be an object") -> BeforeValidator:
    """Refuses anything but an object (null included) before the model validates it."""

    def check(value: object) -> object:
        if not isinstance(value, dict):
            raise problem(message)
        return value

    return BeforeValidator(check)


def is_list(
    message: str, *, at_most: int | None = None, too_many: Callable[[int], str] | None = None
) -> BeforeValidator:
    """Refuses anything but a list (of at most ``at_most`` items) before its items are validated."""

    def check(value: object) -> object:
        if not isinstance(value, list):
            raise problem(message)
        if at_most is not None and len(value) > at_most:
            raise problem(message if too_many is None else too_many(len(value)))
        return value

    return BeforeValidator(check)


def _json_object(value: object) -> dict[str, JsonValue]:
    if not isinstance(value, dict):
        raise problem("must be an object")
    # A private copy, so the caller mutating its document cannot change a frozen definition.
    return copy.deepcopy(value)


JSON_OBJECT = PlainValidator(_json_object)
JSON_VALUE = PlainValidator(copy.deepcopy)


def _json_schema(value: object) -> dict[str, JsonValue]:
    """A JSON Schema (2020-12), with every problem reported at its place in the schema."""
    if not isinstance(value, dict):
        raise problem("must be an object (a JSON Schema)")
    if _more_values_than(value, MAX_SCHEMA_VALUES):
        raise problem(f"schema too large (over {MAX_SCHEMA_VALUES} values)")
    # What Draft202012Validator.check_schema does, but keeping every error instead of raising the first.
    errors = sorted(schema_errors(_META_SCHEMA, value), key=lambda e: pointer(tuple(e.absolute_path)))
    if errors:
        found = [(tuple(e.absolute_path), f"invalid JSON Schema: {e.message}") for e in errors]
        raise problems_at("JsonSchema", found, value)
    return copy.deepcopy(value)


JSON_SCHEMA = PlainValidator(_json_schema)


def _more_values_than(value: Any, limit: int) -> bool:
    """Whether ``value`` holds more than ``limit`` values, walking at most ``limit`` of them."""
    todo, count = [value], 1
    while todo:
        node = todo.pop()
        if isinstance(node, dict | list):
            count += len(node)
            if count > limit:
                return True
            todo.extend(node.values() if isinstance(node, dict) else node)
    return False


def pointer_errors(exc: ValidationError, locate: Callable[[Path], Path]) -> ErrorList:
    """Pydantic's errors as ``{"pointer", "message"}``, unknown fields first within each object;
    ``locate`` maps the location Pydantic gives an error to its path in the document."""
    found: list[tuple[Path, str, bool]] = []  # (path, message, is an unknown field)
    for error in exc.errors(include_url=False):
        loc = locate(error["loc"])
        if error["type"] == "extra_forbidden":
            found.append((loc, f"unknown field {loc[-1]!r}", True))
        elif error["type"] == "missing":
            found.append((loc[:-1], f"missing required field {loc[-1]!r}", False))
        else:
            found.append((loc, error["msg"], False))
    # Unknown fields first within each object, as a reader meets them: ahead of the first error under
    # their object. Pydantic lists them after the object's other errors.
    first: dict[Path, int] = {}
    for i, (path, _, _) in enumerate(found):
        for end in range(len(path) + 1):
            first.setdefault(path[:end], i)
    order = sorted(range(len(found)), key=lambda i: (first[found[i][0][:-1]], 0, i) if found[i][2] else (i, 1, i))
    return [{"pointer": pointer(found[i][0]), "message": found[i][1]} for i in order]

