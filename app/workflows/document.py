"""Low-level support for definition validation: JSON pointers, error collection, typed field checks and
decoding JSON/YAML text into plain JSON data. :mod:`app.workflows.definition` builds on these.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[str | int, ...]
ErrorList = list[dict[str, str]]

# YAML aliases can make a small document expand into a huge one; cap the expanded size.
MAX_DOCUMENT_NODES = 500_000


class DefinitionError(Exception):
    """The definition is invalid; ``errors`` lists every problem as ``{"pointer", "message"}``."""

    def __init__(self, errors: ErrorList) -> None:
        first = errors[0] if errors else {"pointer": "", "message": "invalid definition"}
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(f"invalid definition at '{first['pointer']}': {first['message']}{more}")
        self.errors = errors


def pointer(path: Path) -> str:
    """RFC 6901 JSON pointer for ``path`` (``~`` and ``/`` in keys escaped as ``~0`` and ``~1``)."""
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in path)


@dataclass
class Collector:
    """Accumulates validation errors; the check helpers report a problem and return None for it."""

    errors: ErrorList = field(default_factory=list)

    def error(self, path: Path, message: str) -> None:
        """Record ``message`` for the value at ``path``."""
        self.errors.append({"pointer": pointer(path), "message": message})

    def object(self, path: Path, raw: Any, message: str = "must be an object") -> dict[str, Any] | None:
        """``raw`` if it is a dict, else report ``message``."""
        if isinstance(raw, dict):
            return raw
        self.error(path, message)
        return None

    def reject_unknown(self, path: Path, obj: dict[str, Any], allowed: frozenset[str]) -> None:
        """Report every key of ``obj`` outside ``allowed``."""
        for key in obj:
            if key not in allowed:
                self.error((*path, str(key)), f"unknown field {key!r}")

    def integer(
        self, path: Path, obj: dict[str, Any], *, minimum: int, maximum: int | None = None
    ) -> int | None:
        """``obj[path[-1]]`` as an int within bounds; None when absent or invalid (invalid is reported)."""
        if path[-1] not in obj:
            return None
        value = obj[path[-1]]
        # bool is an int subclass, and `true` is never a sensible count.
        if not isinstance(value, int) or isinstance(value, bool):
            self.error(path, "must be an integer")
            return None
        if value < minimum or (maximum is not None and value > maximum):
            self.error(
                path,
                f"must be at least {minimum}"
                if maximum is None
                else f"must be between {minimum} and {maximum}",
            )
            return None
        return value

    def number(
        self,
        path: Path,
        obj: dict[str, Any],
        *,
        gt: float | None = None,
        ge: float | None = None,
        le: float | None = None,
    ) -> float | None:
        """``obj[path[-1]]`` as a finite float within bounds; None when absent or invalid."""
        if path[-1] not in obj:
            return None
        value = obj[path[-1]]
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            self.error(path, "must be a number")
            return None
        problems = [
            f"greater than {gt:g}" if gt is not None and not value > gt else "",
            f"at least {ge:g}" if ge is not None and not value >= ge else "",
            f"at most {le:g}" if le is not None and not value <= le else "",
        ]
        problem = " and ".join(p for p in problems if p)
        if problem:
            self.error(path, f"must be {problem}")
            return None
        return float(value)


# --- text decoding -------------------------------------------------------------------------------------

# SafeLoader minus the timestamp resolver, so `2024-01-01` stays the string JSON would have made it.
# Built with type() because PyYAML ships no type stubs here and mypy refuses to subclass Any.
_YamlLoader: Any = type(
    "_YamlLoader",
    (yaml.SafeLoader,),
    {
        "yaml_implicit_resolvers": {
            first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:timestamp"]
            for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
        }
    },
)


def load_document(text: str, content_type: str | None) -> Any:
    """Decode JSON or YAML text (chosen by ``content_type``, else sniffed); see load_definition_text."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media.endswith(("/json", "+json")):
        return load_json(text)
    if media.endswith(("/yaml", "/x-yaml", "+yaml")):
        return load_yaml(text)
    try:
        return load_json(text)
    except DefinitionError as json_error:
        try:
            return load_yaml(text)
        except DefinitionError as yaml_error:
            # Report in the language the author evidently meant to write.
            raise (json_error if text.lstrip().startswith(("{", "[")) else yaml_error) from None


def load_json(text: str) -> Any:
    """Strict JSON: NaN/Infinity are rejected since they cannot be stored or re-serialised as JSON."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        message = f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
    except ValueError as exc:
        message = f"invalid JSON: {exc}"
    except RecursionError:
        message = "invalid JSON: nested too deeply"
    raise DefinitionError([{"pointer": "", "message": message}])


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


def load_yaml(text: str) -> Any:
    """YAML restricted to what JSON can express (string keys, no binary/sets/NaN)."""
    try:
        data = yaml.load(text, Loader=_YamlLoader)  # a SafeLoader: never builds arbitrary objects
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise DefinitionError([{"pointer": "", "message": f"invalid YAML: {exc.problem}{where}"}]) from exc
    except (yaml.YAMLError, RecursionError) as exc:
        raise DefinitionError([{"pointer": "", "message": f"invalid YAML: {exc}"}]) from exc
    errors = _json_incompatibilities(data)
    if errors:
        raise DefinitionError(errors)
    return data


def _json_incompatibilities(data: Any) -> ErrorList:
    # Iterative: recursive aliases (`&a [*a]`) and deep nesting must not hit the recursion limit.
    errors: ErrorList = []
    todo: list[tuple[Path, Any]] = [((), data)]
    visited = 0
    while todo:
        path, node = todo.pop()
        visited += 1
        if visited > MAX_DOCUMENT_NODES:
            return [{"pointer": "", "message": f"document too large (over {MAX_DOCUMENT_NODES} values)"}]
        if isinstance(node, dict):
            for key, value in node.items():
                if not isinstance(key, str):
                    errors.append({"pointer": pointer((*path, str(key))), "message": "keys must be strings"})
                todo.append(((*path, str(key)), value))
        elif isinstance(node, list):
            todo.extend(((*path, i), value) for i, value in enumerate(node))
        elif isinstance(node, float) and not math.isfinite(node):
            errors.append({"pointer": pointer(path), "message": "must be a finite number"})
        elif not (node is None or isinstance(node, str | int | float | bool)):
            errors.append({"pointer": pointer(path), "message": f"not a JSON value ({type(node).__name__})"})
    return sorted(errors, key=lambda e: e["pointer"])
