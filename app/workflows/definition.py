"""Workflow definitions: parse and validate a submitted document into a frozen :class:`Definition`.

Two passes over the document, each collecting every problem it finds rather than stopping at the
first: its structure (:mod:`app.workflows.structure`, Pydantic models) and what structure cannot say,
its CEL, the tool and model names it uses and its step graph (:mod:`app.workflows.checks`). Each problem
is ``{"pointer": <JSON pointer into the submitted definition>, "message": ...}``, so a client can show
all of them next to the offending fields. The types built live in :mod:`app.workflows.steps`.
"""

from __future__ import annotations

from typing import Any

from pydantic import JsonValue
from referencing.exceptions import Unresolvable

from app.json_schema import schema_errors
from app.workflows import checks
from app.workflows.decode import load_document
from app.workflows.document import DefinitionError, ErrorList, pointer
from app.workflows.steps import (
    BUILTIN_TOOLS,
    DEFAULT_MAP_CONCURRENCY,
    AgentStep,
    ApprovalSpec,
    ApprovalStep,
    Definition,
    LlmStep,
    MapSpec,
    MapStep,
    Permissions,
    StepDef,
    ToolStep,
    WaitSpec,
    WaitStep,
)
from app.workflows.structure import (
    AgentStepDoc,
    ApprovalStepDoc,
    Bounds,
    DefinitionDoc,
    LlmStepDoc,
    MapStepDoc,
    StepDocBase,
    ToolStepDoc,
    WaitStepDoc,
)
from app.workflows.structure import parse as parse_structure

__all__ = ["DefinitionError", "load_definition_text", "parse_definition", "validate_input"]


def parse_definition(
    raw: Any,
    *,
    max_steps: int = 200,
    max_map_items: int = 10000,
    max_map_concurrency: int = 100,
    known_tools: frozenset[str] | None = BUILTIN_TOOLS,
    known_models: dict[str, frozenset[str]] | None = None,
    stored: bool = False,
) -> Definition:
    """Validate ``raw`` (a decoded JSON/YAML document) and build a :class:`Definition`.

    ``known_tools``: the tools steps may name (the builtins and the tenant's registered tools); None
    accepts any well-formed name. ``known_models``: the tenant's providers and their models; None
    accepts any well-formed model reference. ``stored``: a definition loaded back from the database,
    whose expressions are not held again to the cost limits. Raises :class:`DefinitionError` listing
    every problem found. Every walk here is linear in the size of ``raw``.
    """
    bounds = Bounds(
        max_steps=max_steps, max_map_items=max_map_items, max_map_concurrency=max_map_concurrency
    )
    doc, errors = parse_structure(raw, bounds)
    checker = checks.Checker(known_tools=known_tools, known_models=known_models, check_cost=not stored)
    checks.check(checker, raw)
    errors += checker.errors
    if errors:
        raise DefinitionError(errors)
    assert doc is not None
    return _build(doc, bounds)


# --- building ------------------------------------------------------------------------------------------


def parse_stored(raw: Any) -> Definition:
    """A stored version's definition: it passed validation under the limits of its day, which are not
    applied again (a lowered limit must not break versions made before it)."""
    return parse_definition(
        raw, max_steps=1_000_000, max_map_items=10**9, max_map_concurrency=10**6, known_tools=None, stored=True
    )


def _build(doc: DefinitionDoc, bounds: Bounds) -> Definition:
    """The frozen definition a valid document describes, defaults filled in."""
    limits = {} if doc.limits is None else doc.limits.model_dump(exclude_none=True)
    permissions = Permissions()
    if doc.permissions is not None:
        tools = doc.permissions.tools
        permissions = Permissions(read_only=doc.permissions.read_only,
                                  tools=None if tools is None else frozenset(tools))
    return Definition(steps=tuple(_step(step, bounds) for step in doc.steps), input_schema=doc.input_schema,
                      limits=limits, permissions=permissions, shadow=doc.shadow)


def _step(doc: StepDocBase, bounds: Bounds) -> StepDef:
    common = doc.common()
    match doc:
        case ToolStepDoc():
            return ToolStep(**common, tool=doc.tool, args=doc.args)
        case WaitStepDoc(wait=wait):
            return WaitStep(**common, wait=WaitSpec(signal=wait.signal, timeout_s=wait.timeout_s))
        case MapStepDoc(map=spec):
            concurrency = min(DEFAULT_MAP_CONCURRENCY, bounds.max_map_concurrency) if spec.concurrency is None \
                else spec.concurrency
            return MapStep(**common, map=MapSpec(items=spec.items, tool=spec.tool, args=spec.args,
                                                 concurrency=concurrency))
        case ApprovalStepDoc(approval=spec):
            return ApprovalStep(**common, approval=ApprovalSpec(reason=spec.reason, timeout_s=spec.timeout_s,
                                                                on_expiry=spec.on_expiry))
        case LlmStepDoc(llm=spec):
            args: dict[str, JsonValue] = {"prompt": spec.prompt} if spec.system is None else {
                "system": spec.system, "prompt": spec.prompt}
            return LlmStep(**common, model=spec.spec(), args=args)
        case AgentStepDoc(agent=spec):
            args = {"input": spec.input} if spec.instructions is None else {
                "instructions": spec.instructions, "input": spec.input}
            model = spec.spec(tools=tuple(spec.tools), max_turns=spec.max_turns, loop_limit=spec.loop_limit,
                              max_result_bytes=spec.max_result_bytes)
            return AgentStep(**common, model=model, args=args)
    raise AssertionError(f"a step of kind {type(doc).__name__} is never valid")


def load_definition_text(text: str, content_type: str | None) -> Any:
    """Decode JSON or YAML definition text (chosen by ``content_type``, else sniffed) into plain data.

    Raises :class:`DefinitionError` (pointer "") for text that does not parse, and for YAML that does not
    map onto JSON (non-string keys, binary, sets, NaN) with a pointer to the offending value.
    """
    return load_document(text, content_type)


def validate_input(definition: Definition, value: Any) -> ErrorList:
    """Check a run input against the definition's input_schema (JSON Schema 2020-12).

    Returns ``[]`` when valid or when there is no schema, else errors with pointers into the input.
    """
    validator = definition.input_validator
    if validator is None:
        return []
    try:
        errors = [
            {"pointer": pointer(tuple(error.absolute_path)), "message": error.message}
            for error in schema_errors(validator, value)
        ]
    except Unresolvable as exc:
        # A $ref the schema check cannot see is broken (only reached when validating): the schema's fault.
        return [{"pointer": "", "message": f"input_schema cannot be applied: unresolvable $ref ({exc})"}]
    return sorted(errors, key=lambda e: (e["pointer"], e["message"]))
