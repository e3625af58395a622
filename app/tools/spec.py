"""Tool definitions: what a tenant registers, validated into a frozen :class:`ToolSpec`.

A tool is a named capability with a JSON Schema for its arguments, an executor (``http`` or
``builtin``), an effect (``read``/``write``), limits, a circuit breaker, an optional fallback, the roles
a run's starter needs, and an autonomy level deciding when a call needs a person's approval.
The builtin tools (``echo``, ``sleep``, ``fail``, ``http``) are always there, as version 0.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Any, Literal

from jsonschema import Draft202012Validator
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from app.json_schema import schema_errors
from app.tenants.policy import Role
from app.workflows.cel.expressions import (
    CompiledExpr,
    ExpressionError,
    check_expression,
    compile_expression,
    condition_source,
    extract_expressions,
    whole_expression,
)

TOOL_NAME = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"
ToolName = Annotated[str, StringConstraints(pattern=TOOL_NAME)]
SECRET_REF = re.compile(r"\bsecrets\.([A-Za-z_][A-Za-z0-9_]*)")
MAX_TIMEOUT_S = 3600
MAX_SCHEMA_CHARS = 65_536
# Validation context of a spec loaded back from the database: it passed the checks of its day and must
# keep loading, so its expressions are not held again to the cost limits.
STORED = {"stored": True}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HttpExecutor(_Strict):
    """Calls an HTTP endpoint. ``url``, ``query`` and ``body`` may use ``${{ args.* }}``; header values
    may also use ``${{ secrets.<name> }}`` (the only place secrets can go)."""

    kind: Literal["http"]
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    url: str = Field(min_length=1, max_length=2048)
    headers: dict[str, str] = Field(default_factory=dict, max_length=50)
    query: dict[str, Any] | None = Field(default=None, description="Query parameters (templates over args)")
    body: Any = Field(default=None, description="Request body (templates over args); default: the args for non-GET")

    @field_validator("url")
    @classmethod
    def _url(cls, url: str, info: ValidationInfo) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError("must be an absolute http:// or https:// URL")
        _check_templates(url, allow_secrets=False, info=info)
        return url

    @field_validator("headers")
    @classmethod
    def _headers(cls, headers: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        for name, value in headers.items():
            if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}", name):
                raise ValueError(f"invalid header name {name!r}")
            _check_templates(value, allow_secrets=True, info=info)
        return headers

    @model_validator(mode="after")
    def _templates(self, info: ValidationInfo) -> HttpExecutor:
        for value in _strings(self.query) + _strings(self.body):
            _check_templates(value, allow_secrets=False, info=info)
        return self

    def secret_names(self) -> set[str]:
        return {name for value in self.headers.values() for name in SECRET_REF.findall(value)}


class BuiltinExecutor(_Strict):
    kind: Literal["builtin"]
    name: Literal["echo", "sleep", "fail", "http"]


class ToolRetry(_Strict):
    max_attempts: int = Field(default=3, ge=1, le=20)
    backoff_base_s: float = Field(default=1.0, ge=0, le=3600)
    backoff_max_s: float = Field(default=60.0, ge=0, le=86400)
    jitter: bool = True


class BreakerSettings(_Strict):
    failure_threshold: int = Field(default=5, ge=1, le=10_000, description="Failures within window_s that open it")
    window_s: float = Field(default=60.0, gt=0, le=86400)
    open_s: float = Field(default=30.0, gt=0, le=86400, description="How long it stays open before probing")
    half_open_probes: int = Field(default=1, ge=1, le=100)


class Autonomy(_Strict):
    mode: Literal["manual", "conditional", "auto"] = "auto"
    condition: str | None = Field(default=None, max_length=2000, description="CEL over `args` (conditional)")

    @model_validator(mode="after")
    def _condition(self, info: ValidationInfo) -> Autonomy:
        if self.mode == "conditional":
            if not self.condition:
                raise ValueError("mode 'conditional' needs a condition (CEL over args, e.g. args.amount > 1000)")
            try:
                _compile(condition_source(self.condition), info)
            except ExpressionError as exc:
                raise ValueError(str(exc)) from exc
        elif self.condition is not None:
            raise ValueError("condition is only used with mode 'conditional'")
        return self


class ToolSpec(_Strict):
    """The registered definition of a tool (one version)."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        json_schema_extra={
            "examples": [
                {
                    "name": "refund",
                    "description": "Refund an order",
                    "input_schema": {
                        "type": "object",
                        "properties": {"order": {"type": "string"}, "amount": {"type": "number"}},
                        "required": ["order", "amount"],
                    },
                    "executor": {
                        "kind": "http",
                        "method": "POST",
                        "url": "https://payments.example.com/refunds",
                        "headers": {"Authorization": "Bearer ${{ secrets.payments_key }}"},
                    },
                    "effect": "write",
                    "autonomy": {"mode": "conditional", "condition": "args.amount > 100"},
                }
            ]
        },
    )

    name: ToolName
    description: str = Field(min_length=1, max_length=2000)
    input_schema: dict[str, Any]
    output_schema: dict[str, Any] | None = None
    executor: HttpExecutor | BuiltinExecutor = Field(discriminator="kind")
    effect: Literal["read", "write"]
    timeout_s: float = Field(default=30.0, gt=0, le=MAX_TIMEOUT_S)
    retry: ToolRetry = Field(default_factory=ToolRetry)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    fallback: ToolName | None = None
    required_roles: list[Role] = Field(default_factory=list, max_length=6)
    autonomy: Autonomy = Field(default_factory=Autonomy)
    response: str | None = Field(
        default=None,
        max_length=2000,
        description="A ${{ CEL }} selector over `status`, `headers` and `body` choosing what the call returns",
    )
    max_response_bytes: int = Field(default=262_144, ge=1024, le=10_485_760)
    cost_usd: Decimal = Field(default=Decimal(0), ge=0, le=1000, description="Charged per call against budgets")

    @field_validator("input_schema", "output_schema")
    @classmethod
    def _schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is None:
            return None
        # Size first: checking against the meta-schema costs ~0.1 ms per value.
        if len(str(schema)) > MAX_SCHEMA_CHARS:
            raise ValueError(f"schema too large (over {MAX_SCHEMA_CHARS} characters)")
        errors = sorted(schema_errors(Draft202012Validator(Draft202012Validator.META_SCHEMA), schema), key=str)
        if errors:
            where = "/".join(map(str, errors[0].absolute_path))
            raise ValueError(f"invalid JSON Schema{' at ' + where if where else ''}: {errors[0].message}")
        return schema

    @field_validator("input_schema")
    @classmethod
    def _object(cls, schema: dict[str, Any]) -> dict[str, Any]:
        if schema.get("type") != "object":
            raise ValueError('must describe an object ("type": "object"): arguments are named')
        return schema

    @field_validator("response")
    @classmethod
    def _response(cls, response: str | None, info: ValidationInfo) -> str | None:
        if response is None:
            return None
        source = whole_expression(response)
        if source is None:
            raise ValueError("must be a single ${{ }} expression over status, headers and body")
        try:
            _compile(source, info)
        except ExpressionError as exc:
            raise ValueError(str(exc)) from exc
        return response

    @model_validator(mode="after")
    def _fallback(self) -> ToolSpec:
        if self.fallback == self.name:
            raise ValueError("a tool cannot be its own fallback")
        return self

    def secret_names(self) -> set[str]:
        return self.executor.secret_names() if isinstance(self.executor, HttpExecutor) else set()


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


def _compile(source: str, info: ValidationInfo) -> CompiledExpr:
    """Compile, and when the spec is being registered (not loaded back), hold it to the cost limits."""
    if info.context is not None and info.context.get("stored"):
        return compile_expression(source)
    return check_expression(source)


def _check_templates(value: str, *, allow_secrets: bool, info: ValidationInfo) -> None:
    try:
        sources = extract_expressions(value)
    except ExpressionError as exc:
        raise ValueError(str(exc)) from exc
    for source in sources:
        try:
            compiled = _compile(source, info)
        except ExpressionError as exc:
            raise ValueError(str(exc)) from exc
        allowed = {"args", "secrets"} if allow_secrets else {"args"}
        unknown = compiled.variables - compiled.bound - allowed
        if unknown:
            where = "args and secrets" if allow_secrets else "args (secrets only in header values)"
            raise ValueError(f"`{source}` uses {', '.join(sorted(unknown))}; only {where} can be used here")


# --- builtins ------------------------------------------------------------------------------------------

_ANY_OBJECT: dict[str, Any] = {"type": "object"}
BUILTIN_SPECS: dict[str, ToolSpec] = {
    spec.name: spec
    for spec in (
        ToolSpec(
            name="echo",
            description="Returns its arguments.",
            input_schema=_ANY_OBJECT,
            executor=BuiltinExecutor(kind="builtin", name="echo"),
            effect="read",
            timeout_s=MAX_TIMEOUT_S,
        ),
        ToolSpec(
            name="sleep",
            description="Sleeps for `seconds`.",
            input_schema={"type": "object", "properties": {"seconds": {"type": "number", "minimum": 0}}},
            executor=BuiltinExecutor(kind="builtin", name="sleep"),
            effect="read",
            timeout_s=MAX_TIMEOUT_S,
        ),
        ToolSpec(
            name="fail",
            description="Fails `times` attempts, then returns (testing).",
            input_schema={
                "type": "object",
                "properties": {
                    "times": {"type": "integer", "minimum": 0},
                    "transient": {"type": "boolean"},
                    "message": {"type": "string"},
                },
            },
            executor=BuiltinExecutor(kind="builtin", name="fail"),
            effect="read",
            timeout_s=MAX_TIMEOUT_S,
        ),
        ToolSpec(
            name="http",
            description="Calls any public HTTP URL.",
            input_schema={
                "type": "object",
                "required": ["url"],
                "properties": {
                    "url": {"type": "string"},
                    "method": {"type": "string"},
                    "headers": {"type": "object"},
                    "body": {"type": "string"},
                },
            },
            executor=BuiltinExecutor(kind="builtin", name="http"),
            effect="write",
            timeout_s=MAX_TIMEOUT_S,
        ),
    )
}
