"""Low-level support for definition validation: JSON pointers, paths and error collection.
:mod:`app.workflows.definition` builds on these; :mod:`app.workflows.decode` turns text into data.
"""

from __future__ import annotations

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
    """Accumulates validation errors."""

    errors: ErrorList = field(default_factory=list)

    def error(self, path: Path, message: str) -> None:
        """Record ``message`` for the value at ``path``."""
        self.errors.append({"pointer": pointer(path), "message": message})
