"""Low-level support for definition validation: JSON pointers, error collection and typed field checks.
:mod:`app.workflows.definition` builds on these; :mod:`app.workflows.decode` turns text into data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

Path = tuple[str | int, ...]
ErrorList = list[dict[str, str]]
# A path as a chain of (parent, key) links: extending it is O(1), and it becomes a Path only when needed
# (an error, a string found), so walks over large documents stay linear.
Link = tuple[Any, str | int] | None


def unlink(link: Link) -> Path:
    """The :data:`Path` a chain of links spells."""
    parts: list[str | int] = []
    while link is not None:
        link, part = link
        parts.append(part)
    return tuple(reversed(parts))


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
