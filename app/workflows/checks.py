"""What a definition's structure cannot say: its CEL, the names it uses, and its step graph.

These read the submitted document itself, leniently, so they report even when its structure is broken
(reported by :mod:`app.workflows.structure`), and skip any value of the wrong type: a step that has
errors of its own still counts as a step that others may need. Every walk is linear in the document.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from app.workflows import dag
from app.workflows.cel.expressions import (
    ExpressionError,
    check_expression,
    compile_expression,
    condition_source,
    extract_expressions,
    is_template,
    referenced_steps,
    whole_expression,
)
from app.workflows.document import Collector, Path, pointer, unlink
from app.workflows.steps import MODEL_TEMPLATES, STEP_KINDS
from app.workflows.structure import MAX_AGENT_TOOLS, MAX_PERMITTED_TOOLS, MODEL_REF

# Nesting deeper than this in args is almost certainly a mistake, and rendering recurses over it.
MAX_NESTING = 64
# Each expression costs up to ~0.3 ms to check (tokenize, compile, cost); no sensible workflow nears this.
MAX_EXPRESSIONS = 1000
_MODEL_REF = re.compile(MODEL_REF)
_TOOL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


@dataclass
class Checker(Collector):
    # Tool names a step may use; None: any well-formed name (a stored definition, checked when it was made).
    known_tools: frozenset[str] | None = None
    # Provider name -> its model names; None: any well-formed "<provider>/<model>".
    known_models: dict[str, frozenset[str]] | None = None
    # False for a stored definition: it passed the checks of its day, and must keep loading.
    check_cost: bool = True
    expressions: int = 0


@dataclass
class _Draft:
    """What the graph checks need from a step, kept even when the step itself is broken."""

    index: int
    id: str | None = None
    needs: list[tuple[int, str]] = field(default_factory=list)  # (position in the needs list, step id)
    refs: list[tuple[Path, str]] = field(default_factory=list)  # (path of a string, step id it uses)


def check(cx: Checker, raw: Any) -> None:
    """Report every bad expression, unknown tool or model, and graph problem in document ``raw``."""
    if not isinstance(raw, dict):
        return
    permissions = raw.get("permissions")
    tools = permissions.get("tools") if isinstance(permissions, dict) else None
    if isinstance(tools, list) and len(tools) <= MAX_PERMITTED_TOOLS:
        for i, name in enumerate(tools):
            _tool_name(cx, ("permissions", "tools", i), name)
    steps = raw.get("steps")
    if isinstance(steps, list):
        _check_graph(cx, [_check_step(cx, index, step) for index, step in enumerate(steps)])


def _check_step(cx: Checker, index: int, raw: Any) -> _Draft:
    draft = _Draft(index=index)
    if not isinstance(raw, dict):
        return draft
    path: Path = ("steps", index)
    # Kept even when malformed so that other steps' needs on it do not also report "unknown step".
    draft.id = raw["id"] if isinstance(raw.get("id"), str) else None
    draft.needs = _needs(cx, path, raw.get("needs"), draft.id)
    if isinstance(when := raw.get("when"), str):
        try:
            _check_expression(cx, (*path, "when"), condition_source(when), draft.refs)
        except ExpressionError as exc:
            cx.error((*path, "when"), str(exc))
    kinds = [kind for kind in STEP_KINDS if kind in raw]
    if len(kinds) != 1:
        return draft
    kind = kinds[0]
    spec = raw[kind]
    if kind == "tool":
        _tool_name(cx, (*path, "tool"), spec)
        if isinstance(args := raw.get("args"), dict):
            _check_templates(cx, (*path, "args"), args, draft.refs)
    elif kind == "map" and isinstance(spec, dict):
        _check_map(cx, (*path, "map"), spec, draft.refs)
    elif kind in MODEL_TEMPLATES and isinstance(spec, dict):
        _check_model_step(cx, (*path, kind), spec, kind, draft.refs)
    return draft


def _needs(cx: Checker, path: Path, raw: Any, step_id: str | None) -> list[tuple[int, str]]:
    needs: list[tuple[int, str]] = []
    seen: set[str] = set()
    for pos, need in enumerate(raw if isinstance(raw, list) else ()):
        if not isinstance(need, str):
            continue
        if need == step_id:
            cx.error((*path, "needs", pos), f"step '{need}' cannot need itself")
        elif need in seen:
            cx.error((*path, "needs", pos), f"duplicate need '{need}'")
        else:
            seen.add(need)
            needs.append((pos, need))
    return needs


def _check_map(cx: Checker, path: Path, spec: dict[str, Any], refs: list[tuple[Path, str]]) -> None:
    items = spec.get("items")
    if isinstance(items, list):
        _check_templates(cx, (*path, "items"), items, refs)
    elif isinstance(items, str):
        try:
            source = whole_expression(items)
        except ExpressionError:
            source = None  # reported with the structure
        if source is not None:
            _check_expression(cx, (*path, "items"), source, refs)
    if "tool" in spec:
        _tool_name(cx, (*path, "tool"), spec["tool"])
    if isinstance(args := spec.get("args"), dict):
        _check_templates(cx, (*path, "args"), args, refs)


def _check_model_step(cx: Checker, path: Path, spec: dict[str, Any], kind: str, refs: list[tuple[Path, str]]) -> None:
    _model_ref(cx, (*path, "model"), spec.get("model"))
    for key in MODEL_TEMPLATES[kind]:
        if key in spec and (key == "input" or isinstance(spec[key], str)):
            _check_templates(cx, (*path, key), spec[key], refs)
    tools = spec.get("tools")
    if kind != "agent" or not isinstance(tools, list) or len(tools) > MAX_AGENT_TOOLS:
        return
    names: set[str] = set()
    for i, name in enumerate(tools):
        if isinstance(name, str) and name in names:
            cx.error((*path, "tools", i), f"duplicate tool {name!r}")
        elif _tool_name(cx, (*path, "tools", i), name):
            names.add(name)


# --- names ---------------------------------------------------------------------------------------------


def _tool_name(cx: Checker, path: Path, name: Any) -> bool:
    """Whether ``name`` is a tool steps may use; a name that is not a string is the structure's to report."""
    if not isinstance(name, str):
        return False
    if cx.known_tools is None:
        if not _TOOL_NAME.fullmatch(name):
            cx.error(path, f"invalid tool name {name!r}")
            return False
        return True
    if name not in cx.known_tools:
        cx.error(path, f"unknown tool {name!r}; available tools: {', '.join(sorted(cx.known_tools))}")
        return False
    return True


def _model_ref(cx: Checker, path: Path, ref: Any) -> None:
    match = _MODEL_REF.fullmatch(ref) if isinstance(ref, str) else None
    if match is None or cx.known_models is None:
        return  # a malformed reference is the structure's to report
    provider, model = match.groups()
    if provider not in cx.known_models:
        known = ", ".join(sorted(cx.known_models)) or "none"
        cx.error(path, f"unknown provider {provider!r}; providers: {known}")
    elif model not in cx.known_models[provider]:
        known = ", ".join(sorted(cx.known_models[provider])) or "none"
        cx.error(path, f"provider {provider!r} has no model {model!r}; its models: {known}")


# --- expressions ---------------------------------------------------------------------------------------


def _check_templates(cx: Checker, path: Path, value: Any, refs: list[tuple[Path, str]]) -> None:
    """Report bad CEL in every string under ``value`` and record the steps each one references."""
    for string_path, text in _template_strings(cx, path, value):
        try:
            sources = extract_expressions(text)
        except ExpressionError as exc:
            cx.error(string_path, str(exc))
            continue
        for source in sources:
            _check_expression(cx, string_path, source, refs)


def _template_strings(cx: Checker, path: Path, value: Any) -> Iterator[tuple[Path, str]]:
    # Iterative, with a depth cap: submitted documents can nest deeper than Python's recursion limit.
    # Paths as document.Link chains, made into tuples only for the strings found: O(1) per value.
    todo: list[tuple[Any, Any, int]] = [(value, None, 0)]
    while todo:
        node, link, depth = todo.pop()
        if isinstance(node, str) and is_template(node):
            yield (*path, *unlink(link)), node
        elif isinstance(node, dict | list) and depth >= MAX_NESTING:
            cx.error((*path, *unlink(link)), f"nested too deeply (at most {MAX_NESTING} levels)")
        elif isinstance(node, dict):
            todo.extend((item, (link, key), depth + 1) for key, item in reversed(node.items()))
        elif isinstance(node, list):
            todo.extend((node[i], (link, i), depth + 1) for i in range(len(node) - 1, -1, -1))


def _check_expression(cx: Checker, path: Path, source: str, refs: list[tuple[Path, str]]) -> None:
    cx.expressions += 1
    if cx.expressions > MAX_EXPRESSIONS:
        if cx.expressions == MAX_EXPRESSIONS + 1:
            cx.error(path, f"too many expressions (at most {MAX_EXPRESSIONS} in a definition)")
        return
    try:
        check_expression(source) if cx.check_cost else compile_expression(source)
    except ExpressionError as exc:
        cx.error(path, str(exc))
        return
    refs.extend((path, step) for step in sorted(referenced_steps(source)))


# --- the step graph ------------------------------------------------------------------------------------


def _check_graph(cx: Checker, drafts: list[_Draft]) -> None:
    positions = _step_positions(cx, drafts)
    needs: list[list[int]] = [[] for _ in drafts]
    for draft in drafts:
        for pos, need in draft.needs:
            if need in positions:
                needs[draft.index].append(positions[need])
            else:
                cx.error(("steps", draft.index, "needs", pos), f"unknown step '{need}'")
    for component in dag.cyclic_components(needs):
        cycle = dag.find_cycle(needs, component)
        names = " -> ".join(drafts[i].id or "?" for i in cycle)
        cx.error(("steps", cycle[0], "needs"), f"cycle: {names}")
    masks = dag.ancestor_masks(needs)
    for draft in drafts:
        if draft.refs:
            # A cyclic graph (already reported) has no masks; search from each referencing step instead.
            upstream = masks[draft.index] if masks is not None else _mask(dag.ancestors(needs, draft.index))
            _check_references(cx, draft, positions, upstream)


def _mask(nodes: set[int]) -> int:
    return sum(1 << node for node in nodes)


def _step_positions(cx: Checker, drafts: list[_Draft]) -> dict[str, int]:
    positions: dict[str, int] = {}
    for draft in drafts:
        if draft.id is None:
            continue
        if draft.id in positions:
            first = pointer(("steps", positions[draft.id]))
            cx.error(("steps", draft.index, "id"), f"duplicate step id '{draft.id}' (also used at {first})")
        else:
            positions[draft.id] = draft.index
    return positions


def _check_references(cx: Checker, draft: _Draft, positions: dict[str, int], upstream: int) -> None:
    """Every ``steps.X`` a step uses must name a step it (transitively) needs; ``upstream`` is a bitset."""
    name = draft.id or "?"
    for path, step in draft.refs:
        if step not in positions:
            cx.error(path, f"step '{name}' uses steps.{step} but there is no step '{step}'")
        elif not upstream >> positions[step] & 1:
            cx.error(
                path, f"step '{name}' uses steps.{step}.output but does not (transitively) need '{step}'"
            )
