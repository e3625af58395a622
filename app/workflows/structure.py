"""The structure of a submitted definition, as Pydantic models: fields, types, bounds, required and unknown
fields, defaults. :func:`parse` validates a document against them and maps Pydantic's errors to JSON
pointers; :mod:`app.workflows.definition` builds the frozen steps from a valid one.

A step's kind is the one kind field it has (``tool``, ``wait``, ...): the tagged union below picks the
model by that field, and a step with none or several gets :class:`KindlessStepDoc`, which reports that
and still checks the fields every step shares. Expressions, tool and model names and the step graph are
checked by :mod:`app.workflows.checks`, not here.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self, TypedDict

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    JsonValue,
    ModelWrapValidatorHandler,
    PlainValidator,
    Tag,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)

from app.workflows import fields as f
from app.workflows.cel.expressions import ExpressionError, whole_expression
from app.workflows.document import ErrorList, Path
from app.workflows.steps import (
    DEFAULT_AGENT_TURNS,
    DEFAULT_LOOP_LIMIT,
    DEFAULT_RESULT_BYTES,
    DEFAULT_RETRY,
    MAX_LIMITS,
    STEP_KINDS,
    ModelSpec,
    OutputFormat,
    RetryPolicy,
)

MAX_STEP_TIMEOUT_S = 86_400
MAX_WAIT_TIMEOUT_S = 10**9
MAX_APPROVAL_TIMEOUT_S = 30 * 86_400
# Past about twenty tools, models pick the wrong one noticeably more often.
MAX_AGENT_TOOLS = 20
MAX_AGENT_TURNS = 100
MAX_PERMITTED_TOOLS = 1000
_STEP_ID = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
MODEL_REF = r"([A-Za-z][A-Za-z0-9_-]{0,63})/([A-Za-z0-9._:@/-]{1,128})"


@dataclass(frozen=True, kw_only=True)
class Bounds:
    """The limits a document is held to (the validation context): a stored one gets generous ones."""

    max_steps: int = 200
    max_map_items: int = 10_000
    max_map_concurrency: int = 100


def _bounds(info: ValidationInfo) -> Bounds:
    assert isinstance(info.context, Bounds)
    return info.context


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


ToolName = Annotated[str, f.string("must be a string (a tool name)")]
Timeout = Annotated[float | None, f.number(gt=0, le=MAX_STEP_TIMEOUT_S)]


class RetryDoc(_Doc):
    max_attempts: Annotated[int, f.integer(1, 100)] = DEFAULT_RETRY.max_attempts
    backoff_base_s: Annotated[float, f.number(ge=0)] = DEFAULT_RETRY.backoff_base_s
    backoff_max_s: Annotated[float, f.number(ge=0)] = DEFAULT_RETRY.backoff_max_s
    jitter: Annotated[bool, f.BOOLEAN] = DEFAULT_RETRY.jitter

    @model_validator(mode="wrap")
    @classmethod
    def _cap_over_base(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        found: list[tuple[Path, str]] = []
        base, cap = (_backoff(data, key) for key in ("backoff_base_s", "backoff_max_s"))
        if base is not None and cap is not None and cap < base:
            found.append((("backoff_max_s",), "must be at least backoff_base_s"))
        return f.merged(cls.__name__, found, data, handler)


def _backoff(data: Any, key: str) -> float | None:
    """A valid backoff in ``data``, when given (only two given and valid ones are compared)."""
    value = data.get(key) if isinstance(data, dict) else None
    return float(value) if f.is_number(value) and value >= 0 else None


class WaitDoc(_Doc):
    signal: Annotated[str, f.matching(r"[A-Za-z0-9_.:-]{1,128}", "must be a string matching ^[A-Za-z0-9_.:-]{1,128}$")]
    timeout_s: Annotated[float | None, f.number(gt=0, le=MAX_WAIT_TIMEOUT_S)] = None


def _reason(value: object) -> str:
    if not isinstance(value, str) or len(value) > 2000:
        raise f.problem("must be a string of at most 2000 characters")
    return value


class ApprovalDoc(_Doc):
    reason: Annotated[str, PlainValidator(_reason)] = ""
    timeout_s: Annotated[float | None, f.number(gt=0, le=MAX_APPROVAL_TIMEOUT_S)] = None
    on_expiry: Annotated[
        Literal["reject", "flag"] | None, f.one_of(("reject", "flag"), "must be 'reject' or 'flag'", nullable=True)
    ] = None


def _map_items(value: object, info: ValidationInfo) -> list[JsonValue] | str:
    if isinstance(value, list):
        limit = _bounds(info).max_map_items
        if len(value) > limit:
            raise f.problem(f"too many items: {len(value)} (at most {limit} allowed)")
        return copy.deepcopy(value)
    try:
        single = isinstance(value, str) and whole_expression(value) is not None
    except ExpressionError as exc:
        raise f.problem(str(exc)) from None
    if not single:
        raise f.problem("must be a list or a single ${{ }} expression")
    assert isinstance(value, str)
    return value


class MapDoc(_Doc):
    items: Annotated[list[JsonValue] | str, PlainValidator(_map_items)]
    tool: ToolName
    args: Annotated[dict[str, JsonValue], f.JSON_OBJECT] = Field(default_factory=dict)
    concurrency: Annotated[int | None, f.integer(1, lambda info: _bounds(info).max_map_concurrency)] = None


class _ModelDoc(_Doc):
    model: Annotated[str, f.matching(
        MODEL_REF, "must be '<provider>/<model>', naming a provider registered with /api/v1/providers")]
    output: Annotated[OutputFormat | None, f.one_of(("text", "json"), "must be 'text' or 'json'")] = None
    output_schema: Annotated[dict[str, JsonValue] | None, f.JSON_SCHEMA] = None
    max_tokens: Annotated[int | None, f.integer(1, 1_000_000)] = None

    @model_validator(mode="wrap")
    @classmethod
    def _output_json(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        found: list[tuple[Path, str]] = []
        if isinstance(data, dict) and data.get("output") == "text" and isinstance(data.get("output_schema"), dict):
            found.append((("output",), "an output_schema needs output 'json'"))
        return f.merged(cls.__name__, found, data, handler)

    def spec(
        self, *, tools: tuple[str, ...] = (), max_turns: int = 1, loop_limit: int = DEFAULT_LOOP_LIMIT,
        max_result_bytes: int = DEFAULT_RESULT_BYTES,
    ) -> ModelSpec:
        # The provider part cannot hold a "/": the first one separates it from the model.
        provider, model = self.model.split("/", 1)
        output = self.output or ("json" if self.output_schema is not None else "text")
        return ModelSpec(provider=provider, model=model, output=output, output_schema=self.output_schema,
                         max_tokens=self.max_tokens, tools=tools, max_turns=max_turns, loop_limit=loop_limit,
                         max_result_bytes=max_result_bytes)


class LlmDoc(_ModelDoc):
    system: Annotated[str | None, f.string()] = None
    prompt: Annotated[str, f.string()]


def _too_many_tools(count: int) -> str:
    return (f"an agent may use at most {MAX_AGENT_TOOLS} tools (got {count}): past that, models choose the "
            "wrong tool more often; split the work across agents")


class AgentDoc(_ModelDoc):
    instructions: Annotated[str | None, f.string()] = None
    input: Annotated[JsonValue, f.JSON_VALUE]
    tools: Annotated[
        list[ToolName], f.is_list("must be a list of tool names", at_most=MAX_AGENT_TOOLS, too_many=_too_many_tools)
    ] = Field(default_factory=list)
    max_turns: Annotated[int, f.integer(1, MAX_AGENT_TURNS)] = DEFAULT_AGENT_TURNS
    loop_limit: Annotated[int, f.integer(2, 100)] = DEFAULT_LOOP_LIMIT
    max_result_bytes: Annotated[int, f.integer(256, 1_000_000)] = DEFAULT_RESULT_BYTES


# --- steps ---------------------------------------------------------------------------------------------


def _step_id(value: object) -> str:
    if not isinstance(value, str):
        raise f.problem("must be a string")
    if not _STEP_ID.fullmatch(value):
        raise f.problem(f"invalid step id {value!r}: must match ^[A-Za-z_][A-Za-z0-9_]{{0,63}}$")
    return value


class StepDocBase(_Doc):
    id: Annotated[str, PlainValidator(_step_id)]
    needs: Annotated[list[Annotated[str, f.string("must be a string (a step id)")]],
                     f.is_list("must be a list of step ids")] = Field(default_factory=list)
    when: Annotated[str | None, f.string("must be a string (a CEL expression)")] = None
    timeout_s: Timeout = None
    retry: Annotated[RetryDoc | None, f.is_object()] = None
    description: Annotated[str | None, f.string()] = None

    def common(self) -> _Common:
        """The fields every step type shares, as keyword arguments."""
        retry = None if self.retry is None else RetryPolicy(
            max_attempts=self.retry.max_attempts, backoff_base_s=self.retry.backoff_base_s,
            backoff_max_s=self.retry.backoff_max_s, jitter=self.retry.jitter)
        return _Common(id=self.id, needs=tuple(self.needs), when=self.when, timeout_s=self.timeout_s, retry=retry)


class _Common(TypedDict):
    id: str
    needs: tuple[str, ...]
    when: str | None
    timeout_s: float | None
    retry: RetryPolicy | None


class ToolStepDoc(StepDocBase):
    tool: ToolName
    args: Annotated[dict[str, JsonValue], f.JSON_OBJECT] = Field(default_factory=dict)


def _no_args(value: object) -> None:
    raise f.problem("'args' is only allowed on 'tool' steps (a map step takes map.args)")


class _NotToolDoc(StepDocBase):
    args: Annotated[None, PlainValidator(_no_args)] = None


class WaitStepDoc(_NotToolDoc):
    wait: Annotated[WaitDoc, f.is_object()]


class MapStepDoc(_NotToolDoc):
    map: Annotated[MapDoc, f.is_object()]


class ApprovalStepDoc(_NotToolDoc):
    approval: Annotated[ApprovalDoc, f.is_object()]


class LlmStepDoc(_NotToolDoc):
    llm: Annotated[LlmDoc, f.is_object()]


class AgentStepDoc(_NotToolDoc):
    agent: Annotated[AgentDoc, f.is_object()]


class KindlessStepDoc(_NotToolDoc):
    """A step with no kind field or several: reported, with whatever else is wrong with its fields."""

    tool: Any = None
    wait: Any = None
    map: Any = None
    approval: Any = None
    llm: Any = None
    agent: Any = None

    @model_validator(mode="wrap")
    @classmethod
    def _one_kind(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        kinds = [kind for kind in STEP_KINDS if kind in data] if isinstance(data, dict) else []
        message = (f"a step must have exactly one kind, got {', '.join(map(repr, kinds))}" if kinds else
                   "a step must have exactly one kind: 'tool', 'wait', 'map', 'approval', 'llm' or 'agent'")
        return f.merged(cls.__name__, [((), message)], data, handler)


_KINDLESS = "none"


def _kind_tag(raw: Any) -> str:
    kinds = [kind for kind in STEP_KINDS if kind in raw] if isinstance(raw, dict) else []
    return kinds[0] if len(kinds) == 1 else _KINDLESS


StepDoc = Annotated[
    Annotated[ToolStepDoc, Tag("tool")]
    | Annotated[WaitStepDoc, Tag("wait")]
    | Annotated[MapStepDoc, Tag("map")]
    | Annotated[ApprovalStepDoc, Tag("approval")]
    | Annotated[LlmStepDoc, Tag("llm")]
    | Annotated[AgentStepDoc, Tag("agent")]
    | Annotated[KindlessStepDoc, Tag(_KINDLESS)],
    Discriminator(_kind_tag),
    f.is_object("a step must be an object"),
]


def _steps(value: object, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> list[Any]:
    if not isinstance(value, list):
        raise f.problem("must be a list of steps")
    found: list[tuple[Path, str]] = []
    if not value:
        found.append(((), "must contain at least one step"))
    if len(value) > (limit := _bounds(info).max_steps):
        found.append(((), f"too many steps: {len(value)} (at most {limit} allowed)"))
    steps: list[Any] = f.merged("steps", found, value, handler)
    return steps


# --- the document --------------------------------------------------------------------------------------


class LimitsDoc(_Doc):
    max_steps: Annotated[int | None, f.integer(1, MAX_LIMITS["max_steps"])] = None
    max_tokens: Annotated[int | None, f.integer(1, MAX_LIMITS["max_tokens"])] = None
    max_cost_usd: Annotated[float | None, f.number(gt=0, le=MAX_LIMITS["max_cost_usd"])] = None
    timeout_s: Annotated[float | None, f.number(gt=0, le=MAX_LIMITS["timeout_s"])] = None


ToolNames = Annotated[list[ToolName], f.is_list("must be a list of tool names", at_most=MAX_PERMITTED_TOOLS)]


class PermissionsDoc(_Doc):
    read_only: Annotated[bool, f.BOOLEAN] = False
    tools: ToolNames | None = None  # null, as if absent: any tool


class SloDoc(_Doc):
    """A reliability objective: this share of finished runs succeeds over the window (stats report the
    error budget left)."""

    success_rate: Annotated[float, f.number(gt=0, lt=1)]
    window: Annotated[str, f.one_of(("24h", "7d", "30d"), "must be '24h', '7d' or '30d'")] = "30d"


class DefinitionDoc(_Doc):
    input_schema: Annotated[dict[str, JsonValue] | None, f.JSON_SCHEMA] = None
    limits: Annotated[LimitsDoc | None, f.is_object()] = None
    permissions: Annotated[PermissionsDoc | None, f.is_object()] = None
    shadow: Annotated[bool, f.BOOLEAN] = False
    slo: Annotated[SloDoc | None, f.is_object()] = None
    steps: Annotated[list[StepDoc], WrapValidator(_steps)]

    @model_validator(mode="before")
    @classmethod
    def _object(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise f.problem("the definition must be an object")
        return data


def parse(raw: Any, bounds: Bounds) -> tuple[DefinitionDoc | None, ErrorList]:
    """``raw`` as a :class:`DefinitionDoc`, or None and every structural problem, unknown fields first."""
    try:
        return DefinitionDoc.model_validate(raw, context=bounds), []
    except ValidationError as exc:
        return None, f.pointer_errors(exc, _untagged)


def _untagged(loc: Path) -> Path:
    """The document path of a Pydantic error location: without the tag (the step's kind) a union adds."""
    return (*loc[:2], *loc[3:]) if len(loc) > 2 and loc[0] == "steps" else loc

