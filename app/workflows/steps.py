"""A validated workflow definition: frozen, typed steps, one class per kind.

A step is a :data:`StepDef`: a :class:`ToolStep`, :class:`WaitStep`, :class:`MapStep`,
:class:`ApprovalStep`, :class:`LlmStep` or :class:`AgentStep`. They share :class:`BaseStep`'s fields (id,
needs, when, timeout, retry) and each carries only its own spec, so ``isinstance`` (or ``match``) tells
the kind and no caller asserts which optional spec is set. :mod:`app.workflows.definition` builds these
from a submitted document; nothing here validates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar, Literal

from jsonschema import Draft202012Validator
from pydantic import JsonValue

from app.workflows import dag

StepKind = Literal["tool", "wait", "map", "approval", "llm", "agent"]
JsonObject = dict[str, JsonValue]
OutputFormat = Literal["text", "json"]

BUILTIN_TOOLS: frozenset[str] = frozenset({"echo", "sleep", "fail", "http"})
STEP_KINDS: tuple[StepKind, ...] = ("tool", "wait", "map", "approval", "llm", "agent")
# Upper bounds of run limits, wherever they are set (definition, run request, tenant defaults). A deadline
# (start + timeout_s) must stay a time Python and PostgreSQL can hold: one past them breaks every query
# that computes it, the reconciler's included.
MAX_LIMITS: dict[str, int] = {"max_steps": 1_000_000, "max_tokens": 10**12, "max_cost_usd": 10**9, "timeout_s": 10**9}
# The templated fields of each model step kind: its args, rendered into the step's input when it starts.
MODEL_TEMPLATES: dict[str, tuple[str, ...]] = {"llm": ("system", "prompt"), "agent": ("instructions", "input")}
DEFAULT_AGENT_TURNS = 10
DEFAULT_LOOP_LIMIT = 3
DEFAULT_RESULT_BYTES = 4000
DEFAULT_MAP_CONCURRENCY = 10


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    backoff_base_s: float
    backoff_max_s: float
    jitter: bool


# Mirrors the engine defaults in app.config.Settings; a step's partial `retry` is filled from these.
DEFAULT_RETRY = RetryPolicy(max_attempts=3, backoff_base_s=1.0, backoff_max_s=300.0, jitter=True)


@dataclass(frozen=True, kw_only=True)
class WaitSpec:
    signal: str
    timeout_s: float | None = None


@dataclass(frozen=True, kw_only=True)
class ApprovalSpec:
    reason: str = ""
    timeout_s: float | None = None
    on_expiry: Literal["reject", "flag"] | None = None  # None: the tenant's setting


@dataclass(frozen=True)
class Permissions:
    """What the workflow's tool calls may do: ``read_only`` refuses write tools; ``tools`` is an allowlist."""

    read_only: bool = False
    tools: frozenset[str] | None = None


@dataclass(frozen=True, kw_only=True)
class MapSpec:
    items: list[JsonValue] | str  # a literal list, or a "${{ expr }}" string evaluated at run time
    tool: str
    args: JsonObject
    concurrency: int


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """The model settings of an ``llm`` step (one call, ``tools`` empty, one turn) or an ``agent`` step."""

    provider: str
    model: str
    output: OutputFormat
    output_schema: JsonObject | None = None
    max_tokens: int | None = None  # cap on each answer's tokens; None: the worker's default
    tools: tuple[str, ...] = ()
    max_turns: int = 1
    loop_limit: int = DEFAULT_LOOP_LIMIT
    max_result_bytes: int = DEFAULT_RESULT_BYTES

    @cached_property
    def output_validator(self) -> Draft202012Validator | None:
        return None if self.output_schema is None else Draft202012Validator(self.output_schema)


@dataclass(frozen=True, kw_only=True)
class BaseStep:
    """What every step has; ``kind`` names the subclass."""

    kind: ClassVar[StepKind]
    id: str
    needs: tuple[str, ...] = ()
    when: str | None = None
    timeout_s: float | None = None
    retry: RetryPolicy | None = None


@dataclass(frozen=True, kw_only=True)
class ToolStep(BaseStep):
    kind: ClassVar[StepKind] = "tool"
    tool: str
    args: JsonObject = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class WaitStep(BaseStep):
    kind: ClassVar[StepKind] = "wait"
    wait: WaitSpec


@dataclass(frozen=True, kw_only=True)
class MapStep(BaseStep):
    kind: ClassVar[StepKind] = "map"
    map: MapSpec


@dataclass(frozen=True, kw_only=True)
class ApprovalStep(BaseStep):
    kind: ClassVar[StepKind] = "approval"
    approval: ApprovalSpec


@dataclass(frozen=True, kw_only=True)
class ModelStep(BaseStep):
    """An ``llm`` or ``agent`` step; ``args`` holds its templated fields, rendered into its input."""

    model: ModelSpec
    args: JsonObject = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class LlmStep(ModelStep):
    kind: ClassVar[StepKind] = "llm"


@dataclass(frozen=True, kw_only=True)
class AgentStep(ModelStep):
    kind: ClassVar[StepKind] = "agent"


StepDef = ToolStep | WaitStep | MapStep | ApprovalStep | LlmStep | AgentStep


@dataclass(frozen=True, kw_only=True)
class Definition:
    """A validated workflow: steps in their listed order, the run input's schema and the run's limits."""

    steps: tuple[StepDef, ...]
    input_schema: JsonObject | None = None
    limits: dict[str, int | float] = field(default_factory=dict)
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
    def input_validator(self) -> Draft202012Validator | None:
        # No format checker: in 2020-12 "format" is an annotation unless a vocabulary asks for assertion,
        # and which formats could be checked would otherwise depend on optional packages being installed.
        return None if self.input_schema is None else Draft202012Validator(self.input_schema)

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
