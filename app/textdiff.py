"""Line diffs of two texts, as rows a page can show with their +/- marks and line numbers.

Used for what people compare on screen: a workflow's definition between two versions (as YAML), an
approver's edited arguments against the proposed ones (as indented JSON). Pure: no I/O, no markup.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from typing import Any

# Around each change, this many unchanged lines are kept; the rest fold into a hunk header.
CONTEXT_LINES = 3
# Texts longer than this (in lines) are not compared line by line: difflib is quadratic at worst.
MAX_LINES = 5000


@dataclass(frozen=True)
class DiffLine:
    mark: str  # "+" added, "-" removed, " " unchanged, "@" a hunk header (text says which lines follow)
    old: int | None  # its line number in the old text (None for an added line or a header)
    new: int | None  # its line number in the new text
    text: str

    @property
    def change(self) -> str:
        """The mark in words, for screen readers and people who do not read colour."""
        return {"+": "added", "-": "removed", "@": "lines"}.get(self.mark, "unchanged")


def line_diff(old: str, new: str, *, context: int = CONTEXT_LINES) -> list[DiffLine]:
    """The changed lines of ``new`` against ``old`` with ``context`` lines around each change; [] when equal."""
    a, b = old.splitlines()[:MAX_LINES], new.splitlines()[:MAX_LINES]
    rows: list[DiffLine] = []
    for group in difflib.SequenceMatcher(None, a, b, autojunk=False).get_grouped_opcodes(context):
        first, last = group[0], group[-1]
        rows.append(DiffLine("@", None, None, f"lines {first[1] + 1}-{last[2]} → {first[3] + 1}-{last[4]}"))
        for tag, i1, i2, j1, j2 in group:
            if tag == "equal":
                rows += [DiffLine(" ", i + 1, j1 + (i - i1) + 1, a[i]) for i in range(i1, i2)]
                continue
            if tag in ("replace", "delete"):
                rows += [DiffLine("-", i + 1, None, a[i]) for i in range(i1, i2)]
            if tag in ("replace", "insert"):
                rows += [DiffLine("+", None, j + 1, b[j]) for j in range(j1, j2)]
    return rows


def diffable_json(value: Any) -> str:
    """``value`` as indented JSON with sorted keys: equal values, equal text, so a diff shows real changes."""
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)
