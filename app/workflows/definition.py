"""Workflow definitions: parse and validate a submitted definition into frozen, typed objects.

Validation collects every problem it can find rather than stopping at the first, and reports each as
``{"pointer": <JSON pointer into the submitted definition>, "message": ...}`` so a client can show all of
them next to the offending fields. The format is described in docs and in :func:`parse_definition`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from jsonschema import Draft202012Validator
from referencing.exceptions import Unresolvable

from app.json_schema import schema_errors
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
from app.workflows.decode import load_document
from app.workflows.document import Collector, DefinitionError, Path, pointer, unlink

__all__ = [
    "BUILTIN_TOOLS",
    "Definition",
    "DefinitionError",
    "ApprovalSpec",
    "MapSpec",
    "ModelStep",
    "Permissions",
    "RetryPolicy",
    "StepDef",
    "WaitSpec",
    "load_definition_text",
    "parse_definition",
    "validate_input",
]

StepKind = Literal["tool", "wait", "map", "approval", "llm", "agent"]

BUILTIN_TOOLS: frozenset[str] = frozenset({"echo", "sleep", "fail", "http"})
STEP_KINDS: tuple[StepKind, ...] = ("tool", "wait", "map", "approval", "llm", "agent")
# Kinds whose step runs on a worker with rendered args (the others wait or expand).
RUNNABLE_KINDS = frozenset({"tool", "llm", "agent"})
MAX_STEP_TIMEOUT_S = 86_400
# Upper bounds of run limits, wherever they are set (definition, run request, tenant defaults). A deadline
# (start + timeout_s) must stay a time Python and PostgreSQL can hold: one past them breaks every query
# that computes it, the reconciler's included.
MAX_LIMITS: dict[str, int] = {"max_steps": 1_000_000, "max_tokens": 10**12, "max_cost_usd": 10**9, "timeout_s": 10**9}
MAX_WAIT_TIMEOUT_S = 10**9
# Past about twenty tools, models pick the wrong one noticeably more often.
MAX_AGENT_TOOLS = 20
MAX_AGENT_TURNS = 100
DEFAULT_AGENT_TURNS = 10
DEFAULT_LOOP_LIMIT = 3
DEFAULT_RESULT_BYTES = 4000
DEFAULT_MAP_CONCURRENCY = 10
# Nesting deeper than this in args is almost certainly a mistake, and rendering recurses over it.
MAX_NESTING = 64
# Each expression costs up to ~0.3 ms to check (tokenize, compile, cost); no sensible workflow nears this.
MAX_EXPRESSIONS = 1000
# Checking a JSON Schema against the 2020-12 meta-schema costs ~0.1 ms per value: cap what a schema holds.
MAX_SCHEMA_VALUES = 2000

_TOP_FIELDS = frozenset({"input_schema", "limits", "steps", "permissions", "shadow"})
_STEP_FIELDS = frozenset({"id", "needs", "when", "timeout_s", "retry", "description", "args", *STEP_KINDS})
_RETRY_FIELDS = frozenset({"max_attempts", "backoff_base_s", "backoff_max_s", "jitter"})
_WAIT_FIELDS = frozenset({"signal", "timeout_s"})
_APPROVAL_FIELDS = frozenset({"reason", "timeout_s", "on_expiry"})
_PERMISSION_FIELDS = frozenset({"read_only", "tools"})
_MAP_FIELDS = frozenset({"items", "tool", "args", "concurrency"})
_LLM_FIELDS = frozenset({"model", "system", "prompt", "output", "output_schema", "max_tokens"})
_AGENT_FIELDS = frozenset({"model", "instructions", "input", "tools", "max_turns", "loop_limit", "max_result_bytes",
                           "output", "output_schema", "max_tokens"})
# The templated fields of each model step kind, rendered into the step's input when it starts.
_MODEL_TEMPLATES = {"llm": ("system", "prompt"), "agent": ("instructions", "input")}
_MODEL_REF = re.compile(r"([A-Za-z][A-Za-z0-9_-]{0,63})/([A-Za-z0-9._:@/-]{1,128})")
_LIMIT_FIELDS = frozenset({"max_steps", "max_tokens", "max_cost_usd", "timeout_s"})
_STEP_ID = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_SIGNAL = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_TOOL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    backoff_base_s: float
    backoff_max_s: float
    jitter: bool


# Mirrors the engine defaults in app.config.Settings; a step's partial `retry` is filled from these.
DEFAULT_RETRY = RetryPolicy(max_attempts=3, backoff_base_s=1.0, backoff_max_s=300.0, jitter=True)


@dataclass(frozen=True)
class WaitSpec:
    signal: str
    timeout_s: float | None


@dataclass(frozen=True)
class ApprovalSpec:
    reason: str
    timeout_s: float | None
    on_expiry: str | None  # "reject" | "flag"; None: the tenant's setting


@dataclass(frozen=True)
class Permissions:
    """What the workflow's tool calls may do: ``read_only`` refuses write tools; ``tools`` is an allowlist."""

    read_only: bool = False
    tools: frozenset[str] | None = None


@dataclass(frozen=True)
class MapSpec:
    items: Any  # a literal list, or a "${{ expr }}" string evaluated at run time
    tool: str
    args: dict[str, Any]
    concurrency: int


@dataclass(frozen=True)
class ModelStep:
    """An ``llm`` step (one call, ``tools`` empty, one turn) or an ``agent`` step (a tool-calling loop)."""

    provider: str
    model: str
    output: str  # "text" | "json"
    output_schema: dict[str, Any] | None = None
    max_tokens: int | None = None  # cap on each answer's tokens; None: the worker's default
    tools: tuple[str, ...] = ()
    max_turns: int = 1
    loop_limit: int = DEFAULT_LOOP_LIMIT
    max_result_bytes: int = DEFAULT_RESULT_BYTES

    @cached_property
    def output_validator(self) -> Draft202012Validator | None:
        return None if self.output_schema is None else Draft202012Validator(self.output_schema)


@dataclass(frozen=True)
class StepDef:
    """One step. ``tool``/``args`` are set for kind "tool" only; a map step carries its own in ``map``."""

    id: str
    kind: StepKind
    needs: tuple[str, ...]
    when: str | None
    tool: str | None
    args: dict[str, Any]
    timeout_s: float | None
    retry: RetryPolicy | None
    wait: WaitSpec | None
    map: MapSpec | None
    approval: ApprovalSpec | None = None
    model: ModelStep | None = None


@dataclass(frozen=True)
class Definition:
    """A validated workflow: steps in their listed order, the run input's schema and the run's limits."""

    steps: tuple[StepDef, ...]
    input_schema: dict[str, Any] | None
    limits: dict[str, Any]
    permissions: Permissions = field(default_factory=Permissions)
    shadow: bool = False

    def step(self, step_id: str) -> StepDef:
        """The step with this id; ``KeyError`` if there is none."""
        return self._by_id[step_id]

    @cached_property
    def order(self) -> tuple[str, ...]:
        """Step ids in a topological order; ties keep the listed order."""
        positions = {step.id: i for i, step in enumerate(self.steps)}
        needs = [[positions[need] for need in step.needs] for step in self.steps]
        return tuple(self.steps[i].id for i in dag.topological_order(needs))

    def dependents(self, step_id: str) -> tuple[str, ...]:
        """Ids of the steps that directly need ``step_id``, in listed order; ``KeyError`` if unknown."""
        return self._dependents[step_id]

    @cached_property
    def _by_id(self) -> dict[str, StepDef]:
        return {step.id: step for step in self.steps}

    @cached_property
    def _dependents(self) -> dict[str, tuple[str, ...]]:
        found: dict[str, list[str]] = {step.id: [] for step in self.steps}
        for step in self.steps:
            for need in step.needs:
                found[need].append(step.id)
        return {step_id: tuple(ids) for step_id, ids in found.items()}

    @cached_property
    def _input_validator(self) -> Draft202012Validator | None:
        # No format checker: in 2020-12 "format" is an annotation unless a vocabulary asks for assertion,
        # and which formats could be checked would otherwise depend on optional packages being installed.
        return None if self.input_schema is None else Draft202012Validator(self.input_schema)


# --- parsing -------------------------------------------------------------------------------------------


@dataclass
class _Ctx(Collector):
    max_map_items: int = 10000
    max_map_concurrency: int = 100
    # Tool names a step may use; None: any well-formed name (a stored definition, checked when it was made).
    known_tools: frozenset[str] | None = BUILTIN_TOOLS
    # Provider name -> its model names; None: any well-formed "<provider>/<model>".
    known_models: dict[str, frozenset[str]] | None = None
    # False for a stored definition: it passed the checks of its day, and must keep loading.
    check_cost: bool = True
    expressions: int = 0


@dataclass
class _Draft:
    """What graph validation needs from a step, kept even when the step itself is broken."""

    index: int
    id: str | None = None
    needs: list[tuple[int, str]] = field(default_factory=list)  # (position in the needs list, step id)
    refs: list[tuple[Path, str]] = field(default_factory=list)  # (path of a string, step id it uses)
    step: StepDef | None = None  # None when the step has errors of its own


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
    cx = _Ctx(max_map_items=max_map_items, max_map_concurrency=max_map_concurrency, known_tools=known_tools,
              known_models=known_models, check_cost=not stored)
    top = cx.object((), raw, "the definition must be an object")
    if top is None:
        raise DefinitionError(cx.errors)
    cx.reject_unknown((), top, _TOP_FIELDS)
    input_schema = _parse_input_schema(cx, top["input_schema"]) if "input_schema" in top else None
    limits = _parse_limits(cx, top["limits"]) if "limits" in top else {}
    permissions = _parse_permissions(cx, top["permissions"]) if "permissions" in top else Permissions()
    shadow = top.get("shadow", False)
    if not isinstance(shadow, bool):
        cx.error(("shadow",), "must be a boolean")
        shadow = False
    drafts = _parse_steps(cx, top, max_steps)
    _check_graph(cx, drafts)
    if cx.errors:
        raise DefinitionError(cx.errors)
    steps = tuple(draft.step for draft in drafts if draft.step is not None)
    return Definition(
        steps=steps, input_schema=input_schema, limits=limits, permissions=permissions, shadow=shadow
    )


def _parse_steps(cx: _Ctx, top: dict[str, Any], max_steps: int) -> list[_Draft]:
    if "steps" not in top:
        cx.error((), "missing required field 'steps'")
        return []
    raw_steps = top["steps"]
    if not isinstance(raw_steps, list):
        cx.error(("steps",), "must be a list of steps")
        return []
    if not raw_steps:
        cx.error(("steps",), "must contain at least one step")
    if len(raw_steps) > max_steps:
        cx.error(("steps",), f"too many steps: {len(raw_steps)} (at most {max_steps} allowed)")
    return [_parse_step(cx, raw, index) for index, raw in enumerate(raw_steps)]


def _parse_step(cx: _Ctx, raw: Any, index: int) -> _Draft:
    path: Path = ("steps", index)
    draft = _Draft(index=index)
    obj = cx.object(path, raw, "a step must be an object")
    if obj is None:
        return draft
    errors_before = len(cx.errors)
    cx.reject_unknown(path, obj, _STEP_FIELDS)
    draft.id = _parse_id(cx, path, obj)
    draft.needs = _parse_needs(cx, path, obj, draft.id)
    when = _parse_when(cx, path, obj, draft.refs)
    timeout_s = cx.number((*path, "timeout_s"), obj, gt=0, le=MAX_STEP_TIMEOUT_S)
    retry = _parse_retry(cx, (*path, "retry"), obj["retry"]) if "retry" in obj else None
    if "description" in obj and not isinstance(obj["description"], str):
        cx.error((*path, "description"), "must be a string")
    kind = _step_kind(cx, path, obj)
    tool, args, wait, map_spec = _parse_kind(cx, path, obj, kind, draft.refs)
    approval = _parse_approval(cx, (*path, "approval"), obj["approval"]) if kind == "approval" else None
    model = None
    if kind in ("llm", "agent"):
        model, args = _parse_model_step(cx, (*path, kind), obj[kind], kind, draft.refs)
    if len(cx.errors) == errors_before and kind is not None and draft.id is not None:
        needs = tuple(need for _, need in draft.needs)
        draft.step = StepDef(draft.id, kind, needs, when, tool, args, timeout_s, retry, wait, map_spec, approval,
                             model)
    return draft


def _parse_id(cx: _Ctx, path: Path, obj: dict[str, Any]) -> str | None:
    if "id" not in obj:
        cx.error(path, "missing required field 'id'")
        return None
    step_id = obj["id"]
    if not isinstance(step_id, str):
        cx.error((*path, "id"), "must be a string")
        return None
    if not _STEP_ID.fullmatch(step_id):
        cx.error((*path, "id"), f"invalid step id {step_id!r}: must match ^[A-Za-z_][A-Za-z0-9_]{{0,63}}$")
    # Kept even when malformed so that other steps' needs on it do not also report "unknown step".
    return step_id


def _parse_needs(cx: _Ctx, path: Path, obj: dict[str, Any], step_id: str | None) -> list[tuple[int, str]]:
    raw = obj.get("needs", [])
    if not isinstance(raw, list):
        cx.error((*path, "needs"), "must be a list of step ids")
        return []
    needs: list[tuple[int, str]] = []
    seen: set[str] = set()
    for pos, need in enumerate(raw):
        need_path = (*path, "needs", pos)
        if not isinstance(need, str):
            cx.error(need_path, "must be a string (a step id)")
        elif need == step_id:
            cx.error(need_path, f"step '{need}' cannot need itself")
        elif need in seen:
            cx.error(need_path, f"duplicate need '{need}'")
        else:
            seen.add(need)
            needs.append((pos, need))
    return needs


def _parse_when(cx: _Ctx, path: Path, obj: dict[str, Any], refs: list[tuple[Path, str]]) -> str | None:
    if "when" not in obj:
        return None
    when = obj["when"]
    when_path = (*path, "when")
    if not isinstance(when, str):
        cx.error(when_path, "must be a string (a CEL expression)")
        return None
    try:
        source = condition_source(when)
    except ExpressionError as exc:
        cx.error(when_path, str(exc))
        return None
    _check_expression(cx, when_path, source, refs)
    return when


def _parse_retry(cx: _Ctx, path: Path, raw: Any) -> RetryPolicy | None:
    obj = cx.object(path, raw, "must be an object")
    if obj is None:
        return None
    cx.reject_unknown(path, obj, _RETRY_FIELDS)
    attempts = cx.integer((*path, "max_attempts"), obj, minimum=1, maximum=100)
    base = cx.number((*path, "backoff_base_s"), obj, ge=0)
    cap = cx.number((*path, "backoff_max_s"), obj, ge=0)
    jitter = obj.get("jitter", DEFAULT_RETRY.jitter)
    if not isinstance(jitter, bool):
        cx.error((*path, "jitter"), "must be a boolean")
        jitter = DEFAULT_RETRY.jitter
    if base is not None and cap is not None and cap < base:
        cx.error((*path, "backoff_max_s"), "must be at least backoff_base_s")
    return RetryPolicy(
        max_attempts=DEFAULT_RETRY.max_attempts if attempts is None else attempts,
        backoff_base_s=DEFAULT_RETRY.backoff_base_s if base is None else base,
        backoff_max_s=DEFAULT_RETRY.backoff_max_s if cap is None else cap,
        jitter=jitter,
    )


def _step_kind(cx: _Ctx, path: Path, obj: dict[str, Any]) -> StepKind | None:
    kinds = [kind for kind in STEP_KINDS if kind in obj]
    if len(kinds) > 1:
        cx.error(path, f"a step must have exactly one kind, got {', '.join(map(repr, kinds))}")
        return None
    if not kinds:
        cx.error(path, "a step must have exactly one kind: 'tool', 'wait', 'map', 'approval', 'llm' or 'agent'")
        return None
    return kinds[0]


_KindParts = tuple[str | None, dict[str, Any], WaitSpec | None, MapSpec | None]


def _parse_kind(
    cx: _Ctx, path: Path, obj: dict[str, Any], kind: StepKind | None, refs: list[tuple[Path, str]]
) -> _KindParts:
    if "args" in obj and kind != "tool":
        cx.error((*path, "args"), "'args' is only allowed on 'tool' steps (a map step takes map.args)")
    if kind == "tool":
        tool = _tool_name(cx, (*path, "tool"), obj["tool"])
        return tool, _parse_args(cx, (*path, "args"), obj.get("args", {}), refs), None, None
    if kind == "wait":
        return None, {}, _parse_wait(cx, (*path, "wait"), obj["wait"]), None
    if kind == "map":
        return None, {}, None, _parse_map(cx, (*path, "map"), obj["map"], refs)
    return None, {}, None, None


def _parse_approval(cx: _Ctx, path: Path, raw: Any) -> ApprovalSpec | None:
    obj = cx.object(path, raw, "must be an object")
    if obj is None:
        return None
    cx.reject_unknown(path, obj, _APPROVAL_FIELDS)
    reason = obj.get("reason", "")
    if not isinstance(reason, str) or len(reason) > 2000:
        cx.error((*path, "reason"), "must be a string of at most 2000 characters")
        reason = ""
    timeout_s = cx.number((*path, "timeout_s"), obj, gt=0, le=30 * 86_400)
    on_expiry = obj.get("on_expiry")
    if on_expiry is not None and on_expiry not in ("reject", "flag"):
        cx.error((*path, "on_expiry"), "must be 'reject' or 'flag'")
        on_expiry = None
    return ApprovalSpec(reason, timeout_s, on_expiry)


def _parse_model_step(
    cx: _Ctx, path: Path, raw: Any, kind: str, refs: list[tuple[Path, str]]
) -> tuple[ModelStep | None, dict[str, Any]]:
    """An ``llm`` or ``agent`` section: the model settings, and the templated fields as the step's args."""
    obj = cx.object(path, raw, "must be an object")
    if obj is None:
        return None, {}
    cx.reject_unknown(path, obj, _LLM_FIELDS if kind == "llm" else _AGENT_FIELDS)
    ref = _model_ref(cx, (*path, "model"), obj)
    required = "prompt" if kind == "llm" else "input"
    if required not in obj:
        cx.error(path, f"missing required field '{required}'")
    templates = {}
    for key in _MODEL_TEMPLATES[kind]:
        if key not in obj:
            continue
        value = obj[key]
        if key != "input" and not isinstance(value, str):
            cx.error((*path, key), "must be a string")
            continue
        templates[key] = value
    args = _parse_args(cx, path, templates, refs)
    schema = _parse_schema(cx, (*path, "output_schema"), obj["output_schema"]) if "output_schema" in obj else None
    output = obj.get("output", "json" if schema is not None else "text")
    if output not in ("text", "json"):
        cx.error((*path, "output"), "must be 'text' or 'json'")
    elif output == "text" and schema is not None:
        cx.error((*path, "output"), "an output_schema needs output 'json'")
    max_tokens = cx.integer((*path, "max_tokens"), obj, minimum=1, maximum=1_000_000)
    extra: dict[str, Any] = {}
    if kind == "agent":
        extra["tools"] = _agent_tools(cx, (*path, "tools"), obj.get("tools", []))
        turns = cx.integer((*path, "max_turns"), obj, minimum=1, maximum=MAX_AGENT_TURNS)
        extra["max_turns"] = DEFAULT_AGENT_TURNS if turns is None else turns
        loop = cx.integer((*path, "loop_limit"), obj, minimum=2, maximum=100)
        extra["loop_limit"] = DEFAULT_LOOP_LIMIT if loop is None else loop
        size = cx.integer((*path, "max_result_bytes"), obj, minimum=256, maximum=1_000_000)
        extra["max_result_bytes"] = DEFAULT_RESULT_BYTES if size is None else size
    if ref is None:
        return None, args
    return ModelStep(ref[0], ref[1], output, schema, max_tokens, **extra), args


def _model_ref(cx: _Ctx, path: Path, obj: dict[str, Any]) -> tuple[str, str] | None:
    if "model" not in obj:
        cx.error(path[:-1], "missing required field 'model'")
        return None
    raw = obj["model"]
    match = _MODEL_REF.fullmatch(raw) if isinstance(raw, str) else None
    if match is None:
        cx.error(path, "must be '<provider>/<model>', naming a provider registered with /api/v1/providers")
        return None
    provider, model = match.groups()
    if cx.known_models is not None:
        if provider not in cx.known_models:
            known = ", ".join(sorted(cx.known_models)) or "none"
            cx.error(path, f"unknown provider {provider!r}; providers: {known}")
            return None
        if model not in cx.known_models[provider]:
            known = ", ".join(sorted(cx.known_models[provider])) or "none"
            cx.error(path, f"provider {provider!r} has no model {model!r}; its models: {known}")
            return None
    return provider, model


def _agent_tools(cx: _Ctx, path: Path, raw: Any) -> tuple[str, ...]:
    if not isinstance(raw, list):
        cx.error(path, "must be a list of tool names")
        return ()
    if len(raw) > MAX_AGENT_TOOLS:
        cx.error(path, f"an agent may use at most {MAX_AGENT_TOOLS} tools (got {len(raw)}): past that, models "
                       "choose the wrong tool more often; split the work across agents")
        return ()
    names: list[str] = []
    for i, item in enumerate(raw):
        name = _tool_name(cx, (*path, i), item)
        if name is not None and name in names:
            cx.error((*path, i), f"duplicate tool {name!r}")
        elif name is not None:
            names.append(name)
    return tuple(names)


def _parse_schema(cx: _Ctx, path: Path, raw: Any) -> dict[str, Any] | None:
    """A JSON Schema (2020-12), with every problem reported."""
    schema = cx.object(path, raw, "must be an object (a JSON Schema)")
    if schema is None:
        return None
    if _more_values_than(schema, MAX_SCHEMA_VALUES):
        cx.error(path, f"schema too large (over {MAX_SCHEMA_VALUES} values)")
        return None
    meta = Draft202012Validator(
        Draft202012Validator.META_SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER
    )
    errors_before = len(cx.errors)
    for error in sorted(schema_errors(meta, schema), key=lambda e: pointer(tuple(e.absolute_path))):
        cx.error((*path, *error.absolute_path), f"invalid JSON Schema: {error.message}")
    return copy.deepcopy(schema) if len(cx.errors) == errors_before else None


def _parse_permissions(cx: _Ctx, raw: Any) -> Permissions:
    obj = cx.object(("permissions",), raw, "must be an object")
    if obj is None:
        return Permissions()
    cx.reject_unknown(("permissions",), obj, _PERMISSION_FIELDS)
    read_only = obj.get("read_only", False)
    if not isinstance(read_only, bool):
        cx.error(("permissions", "read_only"), "must be a boolean")
        read_only = False
    tools = obj.get("tools")
    if tools is None:
        return Permissions(read_only=read_only)
    if not isinstance(tools, list) or len(tools) > 1000:
        cx.error(("permissions", "tools"), "must be a list of tool names")
        return Permissions(read_only=read_only)
    names = [_tool_name(cx, ("permissions", "tools", i), name) for i, name in enumerate(tools)]
    return Permissions(read_only=read_only, tools=frozenset(n for n in names if n is not None))


def _tool_name(cx: _Ctx, path: Path, raw: Any) -> str | None:
    if not isinstance(raw, str):
        cx.error(path, "must be a string (a tool name)")
        return None
    if cx.known_tools is None:
        if not _TOOL_NAME.fullmatch(raw):
            cx.error(path, f"invalid tool name {raw!r}")
            return None
        return raw
    if raw not in cx.known_tools:
        cx.error(path, f"unknown tool {raw!r}; available tools: {', '.join(sorted(cx.known_tools))}")
        return None
    return raw


def _parse_args(cx: _Ctx, path: Path, raw: Any, refs: list[tuple[Path, str]]) -> dict[str, Any]:
    args = cx.object(path, raw, "must be an object")
    if args is None:
        return {}
    _check_templates(cx, path, args, refs)
    # A private copy, so the caller mutating its document cannot change a frozen definition.
    return copy.deepcopy(args)


def _parse_wait(cx: _Ctx, path: Path, raw: Any) -> WaitSpec | None:
    obj = cx.object(path, raw, "must be an object")
    if obj is None:
        return None
    cx.reject_unknown(path, obj, _WAIT_FIELDS)
    signal = obj.get("signal")
    if "signal" not in obj:
        cx.error(path, "missing required field 'signal'")
    elif not isinstance(signal, str) or not _SIGNAL.fullmatch(signal):
        cx.error((*path, "signal"), "must be a string matching ^[A-Za-z0-9_.:-]{1,128}$")
    timeout_s = cx.number((*path, "timeout_s"), obj, gt=0, le=MAX_WAIT_TIMEOUT_S)
    return WaitSpec(signal, timeout_s) if isinstance(signal, str) else None


def _parse_map(cx: _Ctx, path: Path, raw: Any, refs: list[tuple[Path, str]]) -> MapSpec | None:
    obj = cx.object(path, raw, "must be an object")
    if obj is None:
        return None
    cx.reject_unknown(path, obj, _MAP_FIELDS)
    items = _parse_map_items(cx, (*path, "items"), obj, refs)
    tool = _tool_name(cx, (*path, "tool"), obj["tool"]) if "tool" in obj else None
    if "tool" not in obj:
        cx.error(path, "missing required field 'tool'")
    args = _parse_args(cx, (*path, "args"), obj.get("args", {}), refs)
    default = min(DEFAULT_MAP_CONCURRENCY, cx.max_map_concurrency)
    concurrency = cx.integer((*path, "concurrency"), obj, minimum=1, maximum=cx.max_map_concurrency)
    if tool is None:
        return None
    return MapSpec(
        items=items, tool=tool, args=args, concurrency=default if concurrency is None else concurrency
    )


def _parse_map_items(cx: _Ctx, path: Path, obj: dict[str, Any], refs: list[tuple[Path, str]]) -> Any:
    if "items" not in obj:
        cx.error(path[:-1], "missing required field 'items'")
        return None
    items = obj["items"]
    if isinstance(items, list):
        if len(items) > cx.max_map_items:
            cx.error(path, f"too many items: {len(items)} (at most {cx.max_map_items} allowed)")
        _check_templates(cx, path, items, refs)
        return copy.deepcopy(items)
    source = whole_expression(items) if isinstance(items, str) else None
    if source is None:
        cx.error(path, "must be a list or a single ${{ }} expression")
        return None
    _check_expression(cx, path, source, refs)
    return items


# --- expressions ---------------------------------------------------------------------------------------


def _check_templates(cx: _Ctx, path: Path, value: Any, refs: list[tuple[Path, str]]) -> None:
    """Report bad CEL in every string under ``value`` and record the steps each one references."""
    for string_path, text in _template_strings(cx, path, value):
        try:
            sources = extract_expressions(text)
        except ExpressionError as exc:
            cx.error(string_path, str(exc))
            continue
        for source in sources:
            _check_expression(cx, string_path, source, refs)


def _template_strings(cx: _Ctx, path: Path, value: Any) -> Iterator[tuple[Path, str]]:
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


def _check_expression(cx: _Ctx, path: Path, source: str, refs: list[tuple[Path, str]]) -> None:
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


def _check_graph(cx: _Ctx, drafts: list[_Draft]) -> None:
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


def _step_positions(cx: _Ctx, drafts: list[_Draft]) -> dict[str, int]:
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


def _check_references(cx: _Ctx, draft: _Draft, positions: dict[str, int], upstream: int) -> None:
    """Every ``steps.X`` a step uses must name a step it (transitively) needs; ``upstream`` is a bitset."""
    name = draft.id or "?"
    for path, step in draft.refs:
        if step not in positions:
            cx.error(path, f"step '{name}' uses steps.{step} but there is no step '{step}'")
        elif not upstream >> positions[step] & 1:
            cx.error(
                path, f"step '{name}' uses steps.{step}.output but does not (transitively) need '{step}'"
            )


# --- sections ------------------------------------------------------------------------------------------


def _parse_input_schema(cx: _Ctx, raw: Any) -> dict[str, Any] | None:
    # What Draft202012Validator.check_schema does, but keeping every error instead of raising the first.
    return _parse_schema(cx, ("input_schema",), raw)


def _parse_limits(cx: _Ctx, raw: Any) -> dict[str, Any]:
    obj = cx.object(("limits",), raw, "must be an object")
    if obj is None:
        return {}
    cx.reject_unknown(("limits",), obj, _LIMIT_FIELDS)
    limits: dict[str, Any] = {}
    for key in ("max_steps", "max_tokens"):
        limits[key] = cx.integer(("limits", key), obj, minimum=1, maximum=MAX_LIMITS[key])
    for key in ("max_cost_usd", "timeout_s"):
        limits[key] = cx.number(("limits", key), obj, gt=0, le=MAX_LIMITS[key])
    return {key: value for key, value in limits.items() if value is not None}


def load_definition_text(text: str, content_type: str | None) -> Any:
    """Decode JSON or YAML definition text (chosen by ``content_type``, else sniffed) into plain data.

    Raises :class:`DefinitionError` (pointer "") for text that does not parse, and for YAML that does not
    map onto JSON (non-string keys, binary, sets, NaN) with a pointer to the offending value.
    """
    return load_document(text, content_type)


def validate_input(definition: Definition, value: Any) -> list[dict[str, str]]:
    """Check a run input against the definition's input_schema (JSON Schema 2020-12).

    Returns ``[]`` when valid or when there is no schema, else errors with pointers into the input.
    """
    validator = definition._input_validator
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
