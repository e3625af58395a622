"""A static bound on what a CEL expression can cost, read from its tokens (the ``cel`` package has no AST).

Without comprehension macros a CEL expression does work linear in its size and in the data it reads
(there are no loops, no user functions, and this package's standard library has no string or list
functions that multiply sizes: no ``repeat``, ``join`` or ``range``). The macros ``all``, ``exists``,
``exists_one``, ``map`` and ``filter`` are the loops; nested, they multiply. Each one ranges over its
receiver: a list or map literal has a known size, anything else is data.

:class:`Cost` records, per macro, the literal sizes and the number of data ranges on its nesting path,
so that the number of iterations is a polynomial in the size ``V`` of the data handed to CEL. When
posted, an expression may nest macros at most :data:`MAX_COMPREHENSION_NESTING` deep and iterate at
most :data:`MAX_LITERAL_ITERATIONS` times over literals; at evaluation :meth:`Cost.inline_ok` decides
whether it is cheap enough to evaluate in-process or goes to the killable sandbox.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

MACROS = frozenset({"all", "exists", "exists_one", "map", "filter"})
MAX_COMPREHENSION_NESTING = 3
MAX_LITERAL_ITERATIONS = 10_000
# In-process evaluation must stay in the sub-millisecond to few-millisecond range: see inline_ok.
INLINE_MAX_VALUES = 500
INLINE_MAX_WORK = 250_000

_OPEN = {"(": ")", "[": "]", "{": "}"}
# A `[` or `{` after one of these starts a literal; after anything else (a name, `)`, `]`) it indexes.
_VALUE_END = frozenset({"ident", "number", "string"})


class Token(Protocol):
    @property
    def kind(self) -> str: ...

    @property
    def text(self) -> str: ...


@dataclass(frozen=True)
class Loop:
    """One comprehension: ``literal`` is the product of the literal ranges on its nesting path (its own
    included), ``data`` the number of data ranges on it; ``opaque`` when a range is neither a literal
    nor a plain path into the data (a call result, a concatenation...), whose size is not bounded by V."""

    literal: int
    data: int
    opaque: bool


@dataclass(frozen=True)
class Cost:
    tokens: int
    nesting: int
    loops: tuple[Loop, ...]

    @property
    def literal_iterations(self) -> int:
        """Iterations when every data range has one element."""
        return sum(loop.literal for loop in self.loops)

    def iterations(self, values: int) -> int:
        """An upper bound on the iterations when the data holds ``values`` values."""
        return sum(loop.literal * max(values, 1) ** loop.data for loop in self.loops)

    def problem(self) -> str | None:
        """Why the expression may not be stored, or None."""
        if self.nesting > MAX_COMPREHENSION_NESTING:
            return (
                f"comprehensions (all, exists, exists_one, map, filter) are nested {self.nesting} deep; "
                f"at most {MAX_COMPREHENSION_NESTING} are allowed"
            )
        if self.literal_iterations > MAX_LITERAL_ITERATIONS:
            return (
                f"comprehensions over list literals iterate {self.literal_iterations} times; "
                f"at most {MAX_LITERAL_ITERATIONS} are allowed"
            )
        return None

    def inline_ok(self, values: int, chars: int) -> bool:
        """Cheap enough to evaluate in-process on data of ``values`` values and ``chars`` characters.

        Work is bounded by iterations x tokens (each iteration evaluates the body once) x the data an
        operation may touch; ``tokens`` squared covers a chain of ``+`` concatenations re-copying its
        growing result. Measured on the worst shapes this admits: a few milliseconds.
        """
        if values > INLINE_MAX_VALUES or any(loop.opaque for loop in self.loops):
            return False
        work = (1 + self.iterations(values)) * self.tokens * self.tokens * (1 + values + chars)
        return work <= INLINE_MAX_WORK


def analyse(tokens: Sequence[Token]) -> Cost:
    """The :class:`Cost` of a tokenized expression (brackets are assumed balanced: it compiled)."""
    match = _matching(tokens)
    macros: list[tuple[int, int, int | None]] = []  # (position, end of its arguments, literal size)
    for i in range(2, len(tokens) - 1):
        token = tokens[i]
        if (token.kind == "ident" and token.text in MACROS and tokens[i - 1].text == "."
                and tokens[i + 1].text == "(" and i + 1 in match):
            macros.append((i, match[i + 1], _range_size(tokens, i - 2, match)))
    loops = []
    nesting = 0
    for pos, _, size in macros:
        path = [other for other in macros if other[0] < pos < other[1]] + [(pos, 0, size)]
        nesting = max(nesting, len(path))
        literal, data, opaque = 1, 0, False
        for _, _, other_size in path:
            if other_size is None:
                data += 1
            elif other_size < 0:
                data, opaque = data + 1, True
            else:
                literal *= max(other_size, 1)
        loops.append(Loop(literal, data, opaque))
    return Cost(tokens=len(tokens), nesting=nesting, loops=tuple(loops))


def _matching(tokens: Sequence[Token]) -> dict[int, int]:
    """Open bracket position -> its closing position, and the reverse."""
    match: dict[int, int] = {}
    stack: list[int] = []
    for i, token in enumerate(tokens):
        if token.kind != "punct":
            continue
        if token.text in _OPEN:
            stack.append(i)
        elif token.text in (")", "]", "}") and stack:
            start = stack.pop()
            match[start], match[i] = i, start
    return match


def _range_size(tokens: Sequence[Token], end: int, match: dict[int, int]) -> int | None:
    """Size of the receiver ending at ``end``: its element count when a literal, None when a plain path
    into the data (``input.items``, ``steps.a.output``, ``x``), -1 when anything else."""
    last = tokens[end]
    if last.kind == "ident":
        return None if _plain_path(tokens, end, match) else -1
    if last.text in ("]", "}") and end in match:
        start = match[end]
        before = tokens[start - 1] if start > 0 else None
        if before is None or (before.kind not in _VALUE_END and before.text not in (")", "]", "}")):
            return _elements(tokens, start, end, match)
        return None if _plain_path(tokens, end, match) else -1
    return -1


def _plain_path(tokens: Sequence[Token], end: int, match: dict[int, int]) -> bool:
    """Whether the receiver ending at ``end`` is ``name(.name | [index])*``: a value taken from the data."""
    i = end
    while i >= 0:
        token = tokens[i]
        if token.kind == "ident":
            if i == 0 or tokens[i - 1].text != ".":
                return i == 0 or tokens[i - 1].kind == "punct" and tokens[i - 1].text not in (")", "]", "}")
            i -= 2
        elif token.text == "]" and i in match:
            i = match[i] - 1
        else:
            return False
    return False


def _elements(tokens: Sequence[Token], start: int, end: int, match: dict[int, int]) -> int:
    count, empty, i = 0, True, start + 1
    while i < end:
        token = tokens[i]
        if token.text == ",":
            count += 0 if empty else 1
            empty = True
        else:
            empty = False
            if token.text in _OPEN and i in match:
                i = match[i]
        i += 1
    return count + (0 if empty else 1)
