"""Evaluating expressions from async code: cheap ones in-process, anything that may be costly in the sandbox.

Every evaluation site (a step's ``when`` and args, map items, model prompts, a tool's autonomy condition,
HTTP templates and response selectors) goes through :func:`render` or :func:`condition` here with the
:class:`Budget` of the step it serves. An expression is evaluated inline when its static
:class:`~app.workflows.cel.cost.Cost` and the size of the data it reads make it cheap (the hot path:
``${{ input.x }}`` costs a few microseconds); otherwise in :mod:`app.workflows.cel.sandbox`, where it may use
what is left of the budget and is killed when it overruns. Either way the event loop is never held for
more than a few milliseconds, and an overrun fails the step with error class ``expression``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from app.workflows.cel import expressions
from app.workflows.cel.cost import INLINE_MAX_VALUES
from app.workflows.cel.expressions import (
    MAX_VALUE_DEPTH,
    CompiledExpr,
    ExpressionLimit,
    compile_expression,
    condition_source,
    extract_expressions,
    is_template,
    scope,
)
from app.workflows.cel.sandbox import Sandbox

__all__ = ["Budget", "MAX_CONTEXT_CHARS", "MAX_CONTEXT_VALUES", "condition", "configure", "render"]

# The most data one evaluation may read. Converting it for CEL costs ~3 us a value, in the sandbox.
MAX_CONTEXT_VALUES = 200_000
MAX_CONTEXT_CHARS = 16 * 1024 * 1024
INLINE_MAX_CHARS = 256 * 1024


@dataclass
class Budget:
    """The evaluation time one step's expressions may use together, in seconds (sandbox time included)."""

    seconds: float
    spent: float = 0.0

    def remaining(self) -> float:
        return self.seconds - self.spent

    def charge(self, seconds: float, source: str) -> None:
        self.spent += seconds
        if self.spent > self.seconds:
            raise ExpressionLimit(source, f"exceeded its evaluation budget of {self.seconds:g}s")


_sandbox: Sandbox | None = None


def configure(processes: int, memory_mb: int) -> Sandbox:
    """Set up this process's sandbox (replacing an idle one); called at start-up with the settings."""
    global _sandbox
    if _sandbox is not None:
        if (_sandbox.processes, _sandbox.memory_mb) == (processes, memory_mb):
            return _sandbox
        _sandbox.close()
    _sandbox = Sandbox(processes, memory_mb)
    return _sandbox


def sandbox() -> Sandbox:
    if _sandbox is None:
        from app.config import get_settings  # settings are read only when a process has not configured it

        settings = get_settings()
        return configure(settings.expression_processes, settings.expression_memory_mb)
    return _sandbox


async def render(value: Any, context: Mapping[str, Any], budget: Budget) -> Any:
    """:func:`app.workflows.cel.expressions.render` within ``budget``; raises ExpressionError / ExpressionLimit."""
    compiled = [compile_expression(source) for source in _sources(value)]
    if not compiled:
        return expressions.render(value, context)
    scoped = _scoped(context, compiled)
    # Names the expressions in limit errors: their sources, never the data (a header may hold a secret).
    label = compiled[0].source if len(compiled) == 1 else "; ".join(c.source for c in compiled)[:300]
    if _inline(compiled, scoped):
        started = time.perf_counter()
        result = expressions.render(value, scoped, checked=True)
        budget.charge(time.perf_counter() - started, label)
        return result
    return await _remote({"op": "render", "value": value, "context": scoped, "source": label}, budget, label)


async def condition(text: str, context: Mapping[str, Any], budget: Budget) -> bool:
    """:func:`app.workflows.cel.expressions.evaluate_condition` within ``budget``."""
    compiled = compile_expression(condition_source(text))
    scoped = _scoped(context, [compiled])
    if _inline([compiled], scoped):
        started = time.perf_counter()
        result = expressions.evaluate_condition(text, scoped, checked=True)
        budget.charge(time.perf_counter() - started, compiled.source)
        return result
    request = {"op": "condition", "text": text, "context": scoped, "source": compiled.source}
    return bool(await _remote(request, budget, compiled.source))


async def _remote(request: dict[str, Any], budget: Budget, source: str) -> Any:
    left = budget.remaining()
    if left <= 0:
        raise ExpressionLimit(source, f"exceeded its evaluation budget of {budget.seconds:g}s")

    def check() -> None:  # run in the sandbox's thread: walking a large context must not hold the loop
        values, chars, deep = _measure(request["context"].values(), MAX_CONTEXT_VALUES, MAX_CONTEXT_CHARS)
        if values > MAX_CONTEXT_VALUES or chars > MAX_CONTEXT_CHARS:
            raise ExpressionLimit(
                source,
                f"reads too much data (over {MAX_CONTEXT_VALUES} values or {MAX_CONTEXT_CHARS // 1048576} MiB)",
            )
        if deep:
            raise ExpressionLimit(source, f"data is nested too deeply (over {MAX_VALUE_DEPTH} levels)")

    try:
        result, elapsed = await sandbox().evaluate(request, left, source, check)
    except ExpressionLimit:
        budget.spent = max(budget.spent, budget.seconds)  # a step that overran gets nothing more
        raise
    budget.charge(elapsed, source)
    return result


def _sources(value: Any) -> Iterator[str]:
    """The CEL text of every ``${{ }}`` under ``value`` (templates were validated when stored)."""
    todo = [value]
    while todo:
        node = todo.pop()
        if isinstance(node, str):
            if is_template(node):
                yield from extract_expressions(node)
        elif isinstance(node, dict):
            todo.extend(node.values())
        elif isinstance(node, list | tuple):
            todo.extend(node)


def _scoped(context: Mapping[str, Any], compiled: list[CompiledExpr]) -> dict[str, Any]:
    variables = frozenset().union(*(c.variables for c in compiled))
    step_ids: frozenset[str] | None = frozenset()
    for c in compiled:
        step_ids = None if step_ids is None or c.step_ids is None else step_ids | c.step_ids
    return scope(context, variables, step_ids)


def _inline(compiled: list[CompiledExpr], scoped: dict[str, Any]) -> bool:
    values, chars, deep = _measure(scoped.values(), INLINE_MAX_VALUES, INLINE_MAX_CHARS)
    if deep or values > INLINE_MAX_VALUES or chars > INLINE_MAX_CHARS:
        return False
    return all(c.cost.inline_ok(values, chars) for c in compiled)


def _measure(roots: Any, max_values: int, max_chars: int) -> tuple[int, int, bool]:
    """(values, characters in strings and keys, nested past MAX_VALUE_DEPTH), stopping past a maximum.

    Level by level, so no per-value bookkeeping: this runs for every evaluation on the hot path."""
    level = list(roots)
    values, chars, depth = len(level), 0, 1
    while level:
        deeper: list[Any] = []
        for node in level:
            if isinstance(node, str):
                chars += len(node)
            elif isinstance(node, dict):
                values += len(node)
                if values > max_values:
                    return values, chars, False
                chars += sum(len(key) for key in node if isinstance(key, str))
                deeper.extend(node.values())
            elif isinstance(node, list | tuple):
                values += len(node)
                if values > max_values:
                    return values, chars, False
                deeper.extend(node)
        if chars > max_chars:
            break
        depth += 1
        if deeper and depth > MAX_VALUE_DEPTH + 1:
            return values, chars, True
        level = deeper
    return values, chars, False
