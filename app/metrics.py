"""Prometheus metrics: every ``steward_`` metric of the API and the workers, in base units, with bounded
labels (docs/operations.md, "Metrics", lists them).

Three sources, so nothing is counted twice and nothing that describes the database lives in memory:

- **what a process did**, counted where it happens: HTTP requests, step attempts, tool and model calls;
- **what a transaction committed**, counted after commit from the run events it wrote
  (:func:`observe_commit`): runs finished, retries, approvals, guardrail decisions; a transaction tried
  again after a conflict counts once;
- **what the database holds**, read when Prometheus scrapes an API process (:func:`database_families`):
  active runs, queue depth and age, the outbox backlog, budget spend and caps; likewise the circuit
  breakers' state, read from Redis (:func:`breaker_family`). A source that does not answer leaves its
  series out and counts ``steward_scrape_errors_total{source}``: the scrape itself never fails.

Label values that come from users (tool, model, provider, workflow) are bounded: past
``STEWARD_METRICS_MAX_LABEL_VALUES`` distinct values a label reads ``other``. Tenants are a label only
with ``STEWARD_METRICS_TENANT_LABEL=true`` (and an empty label, which Prometheus treats as absent,
otherwise). Run, user, key and trace ids are never labels.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

if TYPE_CHECKING:
    from app.config import Settings
    from app.pg import Conn

log = logging.getLogger(__name__)

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 86400)
COUNTS = (0, 1, 2, 3, 5, 10, 25, 50, 100, 250, 1000)
USD = (0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 50, 100)
TOKENS = (100, 1000, 10_000, 50_000, 100_000, 500_000, 1_000_000)
OTHER = "other"


class Bounded:
    """The first ``limit`` distinct values of a label pass; later ones read ``other`` (per process)."""

    def __init__(self, limit: int = 100) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: object) -> str:
        text = str(value) if value is not None else ""
        if text in self._seen:
            return text
        with self._lock:
            if len(self._seen) < self.limit:
                self._seen.add(text)
                return text
        return OTHER


class _Labels:
    """The label policy of this process, set from its settings at start (:func:`configure`)."""

    def __init__(self) -> None:
        self.tools = Bounded()
        self.models = Bounded()
        self.workflows = Bounded()
        self.tenants = False

    def tenant(self, tenant_id: object) -> str:
        return str(tenant_id) if self.tenants and tenant_id is not None else ""


LABELS = _Labels()


def configure(settings: Settings) -> None:
    global LABELS
    labels = _Labels()
    labels.tools = Bounded(settings.metrics_max_label_values)
    labels.models = Bounded(settings.metrics_max_label_values)
    labels.workflows = Bounded(settings.metrics_max_label_values)
    labels.tenants = settings.metrics_tenant_label
    LABELS = labels


# Module-level: prometheus_client's default registry refuses a second metric of the same name, and tests
# build several apps and workers in one process.
RUNS_FINISHED = Counter("steward_runs_finished_total", "Runs that ended, by workflow and outcome",
                        ["workflow", "outcome", "tenant"])
RUN_DURATION = Histogram("steward_run_duration_seconds", "Time from a run's creation to its end",
                         ["workflow"], buckets=SECONDS)
RUN_TOOL_CALLS = Histogram("steward_run_tool_calls", "Agent steps a run took (model turns and the tool calls "
                           "agents chose: what max_steps limits)", ["workflow"], buckets=COUNTS)
RUN_COST = Histogram("steward_run_cost_usd", "Model and tool cost of a run", ["workflow"], buckets=USD)
RUN_TOKENS = Histogram("steward_run_tokens", "Model tokens a run used", ["workflow"], buckets=TOKENS)

STEP_ATTEMPTS = Counter("steward_step_attempts_total", "Step attempts a worker ran, by kind and outcome",
                        ["kind", "outcome"])
STEP_DURATION = Histogram("steward_step_attempt_duration_seconds", "Time a step attempt took in the worker",
                          ["kind"], buckets=SECONDS)
STEP_RETRIES = Counter("steward_step_retries_total", "Failed attempts that will be tried again, by error class",
                       ["error_class"])
RECOVERIES = Counter("steward_reconciler_recoveries_total", "What the reconciler repaired, by kind",
                     ["kind"])

TOOL_CALLS = Counter("steward_tool_calls_total", "Tool calls that ran, by tool and outcome", ["tool", "outcome"])
TOOL_CALL_DURATION = Histogram("steward_tool_call_duration_seconds", "Time tool calls took (execution only)",
                               ["tool"], buckets=SECONDS)
MODEL_CALLS = Counter("steward_model_calls_total", "Model calls, by provider, model and outcome",
                      ["provider", "model", "outcome"])
MODEL_CALL_DURATION = Histogram("steward_model_call_duration_seconds", "Time model calls took",
                                ["provider", "model"], buckets=SECONDS)
MODEL_TOKENS = Counter("steward_model_tokens_total", "Model tokens, by type (input, output)",
                       ["provider", "model", "type"])
MODEL_COST = Counter("steward_model_cost_usd_total", "Cost of model calls at the tenant's prices",
                     ["provider", "model"])
GUARDRAIL_DECISIONS = Counter(
    "steward_guardrail_decisions_total",
    "Tool calls decided by the guardrails: allowed, rejected (by which guardrail), gated for approval, shadowed",
    ["guardrail", "outcome"],
)
APPROVALS_REQUESTED = Counter("steward_approvals_requested_total", "Approvals asked for")
APPROVALS_DECIDED = Counter("steward_approvals_decided_total", "Approvals decided, by decision",
                            ["decision"])
APPROVAL_WAIT = Histogram("steward_approval_wait_seconds", "Time from an approval's request to its decision",
                          ["decision"], buckets=SECONDS)

SCRAPE_ERRORS = Counter("steward_scrape_errors_total", "Scrapes of the API that left out the series of a source "
                        "that did not answer in time (database, redis)", ["source"])
SCRAPE_SOURCES = ("database", "redis")

# Refusals that are guardrail decisions although the tool call path names them by their error class.
_GUARDRAIL_OF_ERROR = {"approval_rejected": "approval", "approval_expired": "approval",
                       "circuit_open": "breaker", "budget_exhausted": "budget"}
_RUN_END = {"run_succeeded": "succeeded", "run_failed": "failed", "run_cancelled": "cancelled"}


def split_model(name: object) -> tuple[str, str]:
    provider, _, model = str(name or "").partition("/")
    return LABELS.models(provider), LABELS.models(model or provider)


def observe_attempt(kind: str, ok: bool, error_class: str | None, seconds: float) -> None:
    STEP_ATTEMPTS.labels(kind, "ok" if ok else error_class or "error").inc()
    STEP_DURATION.labels(kind).observe(max(0.0, seconds))


def observe_events(events: Iterable[dict[str, Any]]) -> None:
    """Count what committed run events say: one call per committed transaction."""
    for event in events:
        kind, data = event["type"], event["data"] or {}
        if kind == "tool_called":
            tool = LABELS.tools(data.get("tool"))
            TOOL_CALLS.labels(tool, "ok" if data.get("ok") else data.get("error") or "error").inc()
            if data.get("ms") is not None:
                TOOL_CALL_DURATION.labels(tool).observe(data["ms"] / 1000)
            GUARDRAIL_DECISIONS.labels("all", "allowed").inc()
        elif kind == "guardrail_rejected":
            GUARDRAIL_DECISIONS.labels(str(data.get("reason") or "unknown"), "rejected").inc()
        elif kind == "tool_call_failed" and data.get("error") in _GUARDRAIL_OF_ERROR:
            GUARDRAIL_DECISIONS.labels(_GUARDRAIL_OF_ERROR[data["error"]], "rejected").inc()
        elif kind == "budget_exhausted" and data.get("tool"):  # a model call refused is no guardrail decision
            GUARDRAIL_DECISIONS.labels("budget", "rejected").inc()
        elif kind == "tool_shadowed":
            GUARDRAIL_DECISIONS.labels("shadow", "shadowed").inc()
        elif kind == "approval_requested":
            APPROVALS_REQUESTED.inc()
            if data.get("tool"):
                GUARDRAIL_DECISIONS.labels("approval", "gated").inc()
        elif kind in ("approval_approved", "approval_rejected", "approval_expired"):
            decision = kind.removeprefix("approval_")
            APPROVALS_DECIDED.labels(decision).inc()
            if data.get("waited_s") is not None:
                APPROVAL_WAIT.labels(decision).observe(data["waited_s"])
        elif kind == "step_retrying":
            STEP_RETRIES.labels(str(data.get("error_class") or "error")).inc()
        elif kind == "model_called":
            provider, model = split_model(data.get("model"))
            MODEL_CALLS.labels(provider, model, "ok").inc()
            if data.get("ms") is not None:
                MODEL_CALL_DURATION.labels(provider, model).observe(data["ms"] / 1000)
            MODEL_TOKENS.labels(provider, model, "input").inc(data.get("input_tokens") or 0)
            MODEL_TOKENS.labels(provider, model, "output").inc(data.get("output_tokens") or 0)
            MODEL_COST.labels(provider, model).inc(float(data.get("cost_usd") or 0))
        elif kind == "model_call_failed":
            provider, model = split_model(data.get("model"))
            MODEL_CALLS.labels(provider, model, str(data.get("error") or "error")).inc()


_ENDED = """
SELECT r.tenant_id, r.workflow_name, r.status, extract(epoch FROM r.finished_at - r.created_at) AS seconds,
       u.tool_calls, u.tokens, u.cost_usd
FROM run r LEFT JOIN run_usage u ON u.run_id = r.id
WHERE r.id = ANY($1::uuid[]) AND r.status IN ('succeeded', 'failed', 'cancelled')
"""


async def observe_ended(conn: Conn, run_ids: Sequence[uuid.UUID]) -> None:
    """Runs that ended in a committed transaction: one query for all of them."""
    for row in await conn.fetch(_ENDED, list(run_ids)):
        workflow = LABELS.workflows(row["workflow_name"])
        RUNS_FINISHED.labels(workflow, row["status"], LABELS.tenant(row["tenant_id"])).inc()
        if row["seconds"] is not None:
            RUN_DURATION.labels(workflow).observe(float(row["seconds"]))
        if row["tool_calls"] is not None:
            RUN_TOOL_CALLS.labels(workflow).observe(row["tool_calls"])
            RUN_TOKENS.labels(workflow).observe(row["tokens"])
            RUN_COST.labels(workflow).observe(float(row["cost_usd"]))


# --- what the database holds, read at scrape time ----------------------------------------------------

_DATABASE = """
SELECT
    (SELECT coalesce(jsonb_object_agg(status, n), '{}') FROM (
        SELECT status, count(*) AS n FROM run WHERE status IN ('queued', 'running', 'waiting', 'paused')
        GROUP BY status) s) AS active,
    (SELECT coalesce(jsonb_agg(q), '[]') FROM (
        SELECT r.priority, count(*) AS depth, extract(epoch FROM now() - min(a.queued_at)) AS oldest_s
        FROM step_attempt a JOIN run r ON r.id = a.run_id WHERE a.status = 'queued' GROUP BY r.priority) q) AS queues,
    (SELECT count(*) FROM outbox) AS outbox,
    (SELECT extract(epoch FROM now() - min(created_at)) FROM outbox) AS outbox_oldest_s,
    (SELECT count(*) FROM audit_event WHERE seq IS NULL) AS audit_unsealed,
    (SELECT extract(epoch FROM now() - min(at)) FROM audit_event WHERE seq IS NULL) AS audit_unsealed_oldest_s,
    (SELECT coalesce(jsonb_agg(w), '[]') FROM (
        SELECT CASE WHEN $1 THEN w.tenant_id::text ELSE '' END AS tenant, w.period, sum(w.spent) AS spent,
               sum(CASE w.period WHEN 'hour' THEN b.hourly_usd ELSE b.daily_usd END) AS cap
        FROM (
            -- Each tenant's current windows, with the settled spend not folded into them yet.
            SELECT tenant_id, period, sum(spent_usd) AS spent FROM (
                SELECT tenant_id, period, spent_usd FROM budget_window
                WHERE (period = 'hour' AND start = date_trunc('hour', now(), 'UTC'))
                   OR (period = 'day' AND start = date_trunc('day', now(), 'UTC'))
                UNION ALL
                SELECT tenant_id, p.period, actual_usd FROM budget_reservation
                CROSS JOIN (VALUES ('hour'), ('day')) AS p (period)
                WHERE NOT windowed AND status = 'settled' AND day_start = date_trunc('day', now(), 'UTC')
                  AND (p.period = 'day' OR hour_start = date_trunc('hour', now(), 'UTC'))) s
            GROUP BY 1, 2) w
        LEFT JOIN budget b ON b.tenant_id = w.tenant_id
        GROUP BY 1, 2) w) AS spend
"""
ACTIVE_STATUSES = ("queued", "running", "waiting", "paused")


async def database_families(conn: Conn, *, tenant_label: bool) -> list[Metric]:
    """Gauges of what the database holds now (an API process serves them, workers do not)."""
    row = await conn.fetchrow(_DATABASE, tenant_label)
    assert row is not None
    active = GaugeMetricFamily("steward_runs_active", "Runs not yet ended, by status", labels=["status"])
    for status in ACTIVE_STATUSES:
        active.add_metric([status], float(row["active"].get(status, 0)))
    depth = GaugeMetricFamily("steward_queue_depth", "Step attempts waiting for a worker, by priority",
                              labels=["priority"])
    oldest = GaugeMetricFamily("steward_queue_oldest_age_seconds",
                               "Age of the oldest step attempt waiting for a worker, by priority", labels=["priority"])
    queues = {q["priority"]: q for q in row["queues"]}
    for priority in ("high", "normal", "low"):
        depth.add_metric([priority], float(queues.get(priority, {}).get("depth", 0)))
        oldest.add_metric([priority], float(queues.get(priority, {}).get("oldest_s") or 0))
    outbox = GaugeMetricFamily("steward_outbox_backlog", "Jobs committed and not yet taken by a worker",
                               value=float(row["outbox"]))
    outbox_age = GaugeMetricFamily("steward_outbox_oldest_age_seconds", "Age of the oldest job in the outbox",
                                   value=float(row["outbox_oldest_s"] or 0))
    unsealed = GaugeMetricFamily("steward_audit_unsealed_rows",
                                 "Audit rows committed and not yet sealed (hash-chained) by a worker",
                                 value=float(row["audit_unsealed"]))
    unsealed_age = GaugeMetricFamily("steward_audit_unsealed_oldest_age_seconds",
                                     "Age of the oldest audit row not yet sealed",
                                     value=float(row["audit_unsealed_oldest_s"] or 0))
    spend = GaugeMetricFamily("steward_budget_spend_usd", "Spend in the current UTC hour and day",
                              labels=["tenant", "window"])
    caps = GaugeMetricFamily("steward_budget_cap_usd", "Each tenant's cap of the current hour and day "
                             "(with STEWARD_METRICS_TENANT_LABEL only)", labels=["tenant", "window"])
    for window in row["spend"]:
        spend.add_metric([window["tenant"], window["period"]], float(window["spent"] or 0))
        if tenant_label and window["cap"] is not None:
            caps.add_metric([window["tenant"], window["period"]], float(window["cap"]))
    return [active, depth, oldest, outbox, outbox_age, unsealed, unsealed_age, spend, caps]


def breaker_family(states: Mapping[str, int]) -> Metric:
    """The breaker-state gauge from what Redis holds (``tool_key`` -> 0, 1 or 2): the worst state of the
    breakers that share a label set (a tool of several tenants without the tenant label, or ``other``)."""
    worst: dict[tuple[str, str], int] = {}
    for key in sorted(states):
        tenant, _, tool = key.partition(":")  # tool_key(): "<tenant id>:<tool>"
        labels = (LABELS.tools(tool), LABELS.tenant(tenant))
        worst[labels] = max(worst.get(labels, 0), states[key])
    family = GaugeMetricFamily("steward_breaker_state", "Tools' circuit breakers, read from Redis: 0 closed with "
                               "recent failures, 1 half-open, 2 open (closed ones without failures are left out)",
                               labels=["tool", "tenant"])
    for (tool, tenant), state in sorted(worst.items()):
        family.add_metric([tool, tenant], float(state))
    return family


def exposed_registry() -> CollectorRegistry:
    """This process's metrics; in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set, several worker
    processes on one host behind one scrape), every process's, merged from that directory."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return REGISTRY


def exposition(extra: Sequence[Metric] = ()) -> bytes:
    """The text exposition of :func:`exposed_registry`, plus ``extra``."""
    text = generate_latest(exposed_registry())
    if extra:
        extra_registry = CollectorRegistry()
        extra_registry.register(_Fixed(extra))
        text += generate_latest(extra_registry)
    return text


class _Fixed:
    def __init__(self, families: Sequence[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families

