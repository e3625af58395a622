"""Settings, read from the environment (prefix ``STEWARD_``; ``DATABASE_URL``/``REDIS_URL`` too)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every option is documented in docs/operations.md; keep the two in step."""

    model_config = SettingsConfigDict(env_prefix="STEWARD_", extra="ignore")

    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("DATABASE_URL", "STEWARD_DATABASE_URL")
    )
    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("REDIS_URL", "STEWARD_REDIS_URL")
    )
    data_dir: Path = Path(".steward")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, validation_alias=AliasChoices("PORT", "STEWARD_PORT"))
    # arq queues are named "<queue_prefix>:<priority>"; tests give each run its own prefix.
    queue_prefix: str = "steward"
    db_pool_size: int = 10
    db_max_overflow: int = 10

    # Request and definition limits.
    max_body_bytes: int = 1_048_576
    max_steps_per_workflow: int = 200
    max_map_items: int = 10_000
    max_map_concurrency: int = 100
    max_output_bytes: int = 262_144
    # CEL expressions (docs/workflows.md, "Cost limits"): the evaluation time one step's expressions may
    # use together; the evaluator processes each API and worker process keeps for costly ones, and
    # the memory each may use.
    expression_timeout_s: float = Field(default=2.0, gt=0, le=300)
    expression_processes: int = Field(default=2, ge=1, le=64)
    expression_memory_mb: int = Field(default=512, ge=128)
    max_long_poll_s: float = 60.0
    page_size_default: int = 50
    page_size_max: int = 500

    # Engine defaults (a step's own `timeout_s` / `retry` override them).
    step_timeout_s: float = 300.0
    # Model calls: the answer cap (and budget reservation) when a step sets no max_tokens, and the
    # deadline of one call (the step's own timeout still bounds the whole step).
    model_max_output_tokens: int = 4096
    model_timeout_s: float = 120.0
    retry_max_attempts: int = 3
    retry_backoff_base_s: float = 1.0
    retry_backoff_max_s: float = 300.0
    # A worker that finishes a step claims the run's next ready step itself, up to this many in a row.
    inline_continue_max: int = 1000
    # How many steps of one run a worker job takes and runs side by side (map items, parallel
    # branches): fewer transactions and queue round trips per step. 1 turns batching off.
    worker_batch: int = 100

    # Worker and reconciler.
    worker_concurrency: int = 20
    # Workers are woken through Redis pub/sub when jobs arrive; this idle poll is only the safety net.
    worker_poll_delay_s: float = 0.5
    worker_shutdown_grace_s: float = 10.0
    reconcile_interval_s: float = 5.0
    # Serve the worker's Prometheus metrics (tool calls, guardrails, breakers) on this port; None: off.
    worker_metrics_port: int | None = Field(default=None, ge=1, le=65535)
    outbox_stale_s: float = 5.0
    relay_retry_s: float = 1.0
    # Steps keep a lease while they run; a worker renews it every lease_s / 3. A lease that runs out
    # (the worker died) counts as a transient failure of that attempt.
    lease_s: float = 30.0
    arq_job_timeout_s: float = 7 * 86400

    # Keys sealing secrets at rest (AES-256-GCM): comma-separated, base64url 32-byte keys, newest first.
    # Unset: a key file made under data_dir on first use (fine for one machine; set this for several).
    secret_keys: str | None = Field(default=None, repr=False)

    # The builtin `http` tool refuses loopback, link-local and private addresses unless this is set.
    http_allow_private_networks: bool = False

    # --- identity and security (docs/security.md) ---
    # API requests run as this database role (SET ROLE at connect), which row-level security applies
    # to; the migrating user (the tables' owner) keeps running workers and the reconciler. Empty: off.
    db_app_role: str = "steward_app"
    # OpenID Connect provider for dashboard sign-on and bearer JWTs. Unset: local sign-in on loopback.
    oidc_issuer: str | None = None
    oidc_client_id: str | None = None
    oidc_client_secret: str | None = Field(default=None, repr=False)
    oidc_scopes: str = "openid profile email groups"
    # The claim holding the groups/roles that tenants map to roles (tenant settings `role_mapping`).
    oidc_groups_claim: str = "groups"
    # Bearer JWTs must carry this audience (the API's resource identifier); unset: bearer JWTs refused.
    oidc_audience: str | None = None
    # Signing algorithms accepted on ID tokens and bearer JWTs (never `none`, never HMAC).
    oidc_algorithms: str = "RS256,ES256,PS256,EdDSA"
    # The address people reach Steward at (for the OIDC redirect URI); unset: taken from each request.
    public_url: str | None = None
    # Dashboard sessions end after this long without a request, and this long after sign-in at most.
    session_idle_s: float = Field(default=8 * 3600, gt=0)
    session_absolute_s: float = Field(default=7 * 86400, gt=0)
    # Token-bucket rate limits (requests per second, burst) per API key/user and per tenant; 0: off.
    rate_limit_principal_rps: float = Field(default=50.0, ge=0)
    rate_limit_principal_burst: int = Field(default=100, ge=1)
    rate_limit_tenant_rps: float = Field(default=200.0, ge=0)
    rate_limit_tenant_burst: int = Field(default=400, ge=1)
    # Audit events older than this many days are deleted by the reconciler (the chain then starts at
    # the oldest row kept); None: kept for ever.
    audit_retention_days: int | None = Field(default=None, ge=1)
    # Workers seal (hash-chain) committed audit rows at least this often, sooner when woken by a commit.
    audit_seal_interval_s: float = Field(default=1.0, gt=0, le=60)
    # Logs on stderr: one JSON object a line, or text lines for a terminal (`steward up` uses text for
    # the processes it starts unless this is set); the least level written.
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Metrics: distinct tool, model and workflow label values past this read "other"; a tenant label on
    # the per-tenant metrics only when asked (one series per tenant).
    metrics_max_label_values: int = Field(default=100, ge=1, le=10_000)
    metrics_tenant_label: bool = False
    # Traces: prompts, answers, tool arguments and results on the GenAI spans (redacted as run events
    # are), only when asked; each such attribute cut to this many bytes.
    trace_content: bool = False
    trace_content_max_bytes: int = Field(default=8192, ge=256, le=1_048_576)
    # Traces (when the OTEL_* variables turn them on): a client span per database statement inside a
    # traced request or step, statement text only, never its parameters.
    trace_db: bool = False
    # Traces: the dashboard links trace ids to this address (``{trace_id}`` replaced), e.g. a Tempo or
    # Jaeger trace view; unset: trace ids show as text.
    trace_url: str | None = None

    @field_validator("trace_url")
    @classmethod
    def _trace_url_template(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value.replace("{trace_id}", "0"))
        if "{trace_id}" not in value or parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("STEWARD_TRACE_URL must be an http(s) address with {trace_id} in it, e.g. "
                             "https://tempo.example/trace/{trace_id}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _empty_is_unset(cls, data: Any) -> Any:
        """``NAME=`` (set but empty, as compose files and shells often leave variables) means unset: the
        default applies. Only plain text settings keep an empty value, where it means something
        (``STEWARD_DB_APP_ROLE=`` turns the application role off)."""
        if not isinstance(data, dict):
            return data
        return {key: value for key, value in data.items() if value != "" or key in _TEXT_KEYS}


def _names(name: str, alias: Any) -> set[str]:
    names = {name}
    if isinstance(alias, AliasChoices):
        names.update(choice for choice in alias.choices if isinstance(choice, str))
    elif isinstance(alias, str):
        names.add(alias)
    return names


# The names (field names and environment aliases) of the settings whose type is plain `str`.
_TEXT_KEYS = frozenset(
    key
    for name, info in Settings.model_fields.items()
    if info.annotation is str
    for key in _names(name, info.validation_alias)
)


@lru_cache
def get_settings() -> Settings:
    return Settings()
