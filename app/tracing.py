"""Traces: OpenTelemetry, off unless the standard ``OTEL_*`` variables ask for them.

Tracing is on when ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``, ``console``; ``none`` is off) or
an OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), and
``OTEL_SDK_DISABLED`` is not ``true``. The SDK reads the rest itself: the sampler
(``OTEL_TRACES_SAMPLER=parentbased_traceidratio``, ``OTEL_TRACES_SAMPLER_ARG=0.1``), the batch
processor's delays, the exporter's endpoint, headers and timeout, ``OTEL_SERVICE_NAME`` and
``OTEL_RESOURCE_ATTRIBUTES``. Spans leave through a ``BatchSpanProcessor`` over OTLP/HTTP (protobuf),
flushed when the process stops.

What is traced (docs/operations.md, "Traces"): API requests (health and metrics left out), each step
attempt queued through arq (a short ``send <queue>`` producer span, whose traceparent the attempt keeps)
and each one a worker runs (``process <queue>``, the consumer: a child of that ``send`` span; the messaging
conventions with ``messaging.system=arq``), and
inside it the GenAI conventions as pinned by the installed ``opentelemetry-semantic-conventions``:
``invoke_agent <step>``, ``chat <model>``, ``execute_tool <tool>``, plus the outbound HTTP calls (W3C
``traceparent`` sent to tools and model providers). Guardrail refusals and approval requests are span
events. Attributes carry ids, names, counts and outcomes: never arguments, prompts or secrets, unless
``STEWARD_TRACE_CONTENT`` opts in. Then ``chat`` spans also carry the input and output messages and
``execute_tool`` spans the call's arguments and result (:func:`records_content`, :func:`set_content`),
redacted exactly as run events are (``writeOnly`` argument values and the tool's secrets replaced by
``[redacted]``) before they reach the span, each cut to ``STEWARD_TRACE_CONTENT_MAX_BYTES``. With the setting
off, or a span not sampled, nothing of the content is built or serialised.

With ``STEWARD_TRACE_DB`` set, every asyncpg statement (direct, and SQLAlchemy's) is a client span too
(``db.system=postgresql``, the statement text, never its parameters), but only inside a sampled span of
ours: the background loops (outbox relay, reconciler, LISTEN connections, health checks, metrics scrapes)
poll all day and start no trace of their own.

Run events keep the trace id of the span they are written in (``current_trace_id``), which the dashboard links to
``STEWARD_TRACE_URL``. Every helper here returns at once, doing nothing, while tracing is off.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
from opentelemetry.semconv._incubating.attributes import messaging_attributes as messaging
from opentelemetry.semconv.attributes.http_attributes import HTTP_ROUTE
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from app.config import Settings

log = logging.getLogger(__name__)
TRACER = trace.get_tracer("steward")
EXCLUDED_URLS = "healthz,readyz,metrics,static/"
_provider: TracerProvider | None = None
_statements: Any = None  # the asyncpg instrumentor, when STEWARD_TRACE_DB
# The semantic conventions' names, as the installed opentelemetry-semantic-conventions pins them.
GEN_AI_OPERATION = gen_ai.GEN_AI_OPERATION_NAME
GEN_AI_PROVIDER = gen_ai.GEN_AI_PROVIDER_NAME
GEN_AI_MODEL = gen_ai.GEN_AI_REQUEST_MODEL
GEN_AI_INPUT_TOKENS = gen_ai.GEN_AI_USAGE_INPUT_TOKENS
GEN_AI_OUTPUT_TOKENS = gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS
GEN_AI_FINISH_REASONS = gen_ai.GEN_AI_RESPONSE_FINISH_REASONS
GEN_AI_TOOL = gen_ai.GEN_AI_TOOL_NAME
GEN_AI_TOOL_CALL_ID = gen_ai.GEN_AI_TOOL_CALL_ID
GEN_AI_AGENT = gen_ai.GEN_AI_AGENT_NAME
# Content, recorded only under STEWARD_TRACE_CONTENT.
GEN_AI_INPUT_MESSAGES = gen_ai.GEN_AI_INPUT_MESSAGES
GEN_AI_OUTPUT_MESSAGES = gen_ai.GEN_AI_OUTPUT_MESSAGES
GEN_AI_TOOL_CALL_ARGUMENTS = gen_ai.GEN_AI_TOOL_CALL_ARGUMENTS
GEN_AI_TOOL_CALL_RESULT = gen_ai.GEN_AI_TOOL_CALL_RESULT
CONTENT_ATTRIBUTES = (GEN_AI_INPUT_MESSAGES, GEN_AI_OUTPUT_MESSAGES, GEN_AI_TOOL_CALL_ARGUMENTS,
                      GEN_AI_TOOL_CALL_RESULT)
MESSAGING_SYSTEM = messaging.MESSAGING_SYSTEM
MESSAGING_DESTINATION = messaging.MESSAGING_DESTINATION_NAME
MESSAGING_OPERATION = messaging.MESSAGING_OPERATION_TYPE


def enabled() -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return exporters != "none"
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def _exporter(name: str) -> SpanExporter:
    if name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if name == "console":
        return ConsoleSpanExporter()
    raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (otlp, console or none)")


def configure(service: str, *, db: bool = False) -> bool:
    """Install this process's tracer provider when tracing is asked for (once a process), with a span per
    database statement when ``db`` (``STEWARD_TRACE_DB``); whether on."""
    global _provider
    if _provider is not None:
        return True
    if not enabled():
        return False
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or service})
    provider = TracerProvider(resource=resource)
    names = [n.strip() for n in (os.environ.get("OTEL_TRACES_EXPORTER") or "otlp").lower().split(",") if n.strip()]
    processors = [BatchSpanProcessor(_exporter(name)) for name in names]
    for processor in processors:
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    _provider = provider
    if db:
        _instrument_statements(resource, processors)
    log.info("tracing on: %s to %s%s", ", ".join(names), os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
             or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "the default endpoint",
             ", a span per database statement" if db else "")
    return True


def _instrument_statements(resource: Resource, processors: list[BatchSpanProcessor]) -> None:
    """asyncpg's statements as client spans, through a provider of their own whose sampler follows the
    parent and never starts a trace: a statement outside a sampled span (a poll of a background loop)
    makes no span. It shares the main provider's processors, which the main provider flushes and stops.
    Parameters are never captured (they hold run inputs and sealed secrets)."""
    global _statements
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

    statements = TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_OFF), shutdown_on_exit=False)
    for processor in processors:
        statements.add_span_processor(processor)
    _statements = AsyncPGInstrumentor(capture_parameters=False)  # type: ignore[no-untyped-call]
    _statements.instrument(tracer_provider=statements)


def instrument_app(app: Any) -> None:
    """FastAPI's instrumentation: one span a request (the ASGI receive and send spans, two or more a
    request, cost more than they tell), named by the route template.

    The instrumentation finds a request's route by trying every route's pattern on the path before the
    router does the same again: a tenth of the API's CPU per request with this app's routes (py-spy,
    bench/tracing.py). So its span is named by the method alone at first (:func:`_method_only`) and given
    the route the router found when the response starts (:func:`name_by_route`, from the metrics
    middleware, which reads the same ``scope["route"]``)."""
    from opentelemetry.instrumentation import fastapi as instrumentation

    instrumentation._get_default_span_details = _method_only
    instrumentation.FastAPIInstrumentor.instrument_app(app, excluded_urls=EXCLUDED_URLS,
                                                       exclude_spans=["receive", "send"])


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _method_only(scope: Mapping[str, Any]) -> tuple[str, dict[str, str]]:
    method = scope.get("method")
    return (method if method in _METHODS else "HTTP"), {}


def name_by_route(method: str, route: str | None) -> None:
    """Name the current request's span ``<method> <route template>`` and set ``http.route`` (an
    unmatched request keeps the method alone)."""
    if route is None or _provider is None or method not in _METHODS:
        return
    current = trace.get_current_span()
    if current.is_recording():
        current.update_name(f"{method} {route}")
        current.set_attribute(HTTP_ROUTE, route)


def shutdown() -> None:
    """Send what is buffered and stop (a process stopping)."""
    global _provider, _statements
    if _statements is not None:
        _statements.uninstrument()
        _statements = None
    if _provider is not None:
        _provider.shutdown()
        _provider = None


def _present(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """Attributes without the None-valued ones (an attribute is left out rather than empty)."""
    return {k: v for k, v in attributes.items() if v is not None}


def span(name: str, attributes: Mapping[str, Any], kind: SpanKind = SpanKind.INTERNAL) -> AbstractContextManager[Span]:
    """A span of ours, current inside the block; None-valued attributes are left out."""
    return TRACER.start_as_current_span(name, kind=kind, attributes=_present(attributes))


_PROPAGATOR = TraceContextTextMapPropagator()


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span, to store with what it queues; None outside a sampled span
    (tracing off: nothing is stored)."""
    if _provider is None:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent")


def trace_id_of(traceparent: str | None) -> str | None:
    parts = (traceparent or "").split("-")
    return parts[1] if len(parts) == 4 else None


def current_trace_id() -> str | None:
    """The trace id of the current span, for what is written in it (run events); None with tracing off or
    outside a span. Sampled or not, as logs and the run's ``trace_id`` have it."""
    if _provider is None:
        return None
    found = trace.get_current_span().get_span_context()
    return format(found.trace_id, "032x") if found.is_valid else None


def queue_attributes(operation: str, queue: str, tenant_id: Any, run_id: Any, step_id: str | None, attempt: int,
                     map_index: int | None) -> dict[str, Any]:
    """The attributes of a step attempt's ``send`` and ``process`` spans: the messaging conventions' and ours."""
    return {MESSAGING_SYSTEM: "arq", MESSAGING_DESTINATION: queue, MESSAGING_OPERATION: operation,
            "steward.tenant.id": str(tenant_id), "steward.run.id": str(run_id), "steward.step.id": step_id,
            "steward.step.attempt": attempt, "steward.step.map_index": map_index}


def sent(queue: str, tenant_id: Any, run_id: Any, step_id: str | None, attempt: int,
         map_index: int | None) -> str | None:
    """A ``send <queue>`` producer span (the messaging conventions) for a step attempt queued in the
    current trace; returns its traceparent, which the attempt keeps so that the worker's ``process``
    span is its child. None with tracing off or outside a span (the attempt then starts a trace)."""
    if _provider is None or not trace.get_current_span().get_span_context().is_valid:
        return None
    with span(f"send {queue}", queue_attributes("send", queue, tenant_id, run_id, step_id, attempt, map_index),
              SpanKind.PRODUCER):
        return current_traceparent()


@contextmanager
def resumed(traceparent: str | None) -> Iterator[None]:
    """Inside the block, the span of ``traceparent`` is current again (no new span): what a worker records
    after an attempt's ``process`` span ended (its events, the steps it queues) stays in that trace."""
    parent = _span_context(traceparent) if _provider is not None else None
    if parent is None:
        yield
        return
    with trace.use_span(NonRecordingSpan(parent), end_on_exit=False):
        yield


_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def _span_context(traceparent: str | None) -> SpanContext | None:
    """A stored traceparent (one of ours: version 00) read straight into a remote span context; the
    propagator's extract builds a whole context to get there, at every step attempt."""
    found = _TRACEPARENT.fullmatch(traceparent) if traceparent else None
    if found is None:
        return None
    context = SpanContext(int(found[1], 16), int(found[2], 16), is_remote=True,
                          trace_flags=TraceFlags(int(found[3], 16)))
    return context if context.is_valid else None


def continued(name: str, attributes: Mapping[str, Any], kind: SpanKind, parent: str | None,
              first: str | None) -> AbstractContextManager[Span]:
    """A span continuing the trace of ``parent`` (a stored traceparent), or, without one, the root of a new
    trace; linked to ``first`` (the run's first trace) when that is another trace."""
    parent_context = _span_context(parent)
    first_context = _span_context(first)
    context = trace.set_span_in_context(NonRecordingSpan(parent_context)) if parent_context else Context()
    links = [Link(first_context)] if first_context and (
        parent_context is None or first_context.trace_id != parent_context.trace_id) else None
    return TRACER.start_as_current_span(name, context=context, kind=kind, links=links,
                                        attributes=_present(attributes))


def outcome(current: Span, ok: bool, error_class: str | None) -> None:
    current.set_attribute("steward.outcome", "ok" if ok else error_class or "error")
    if not ok:
        current.set_attribute("error.type", error_class or "error")
        current.set_status(Status(StatusCode.ERROR, error_class))


def event(name: str, **attributes: Any) -> None:
    """An event on the current span (a guardrail refusal, an approval request)."""
    trace.get_current_span().add_event(name, _present(attributes))


def records_content(current: Span, settings: Settings) -> bool:
    """Whether ``current`` takes prompts, answers, arguments and results: the operator opted in and the span
    is sampled. Callers build (and redact) the content only when this holds."""
    return settings.trace_content and current.is_recording()


def set_content(current: Span, settings: Settings, attributes: Mapping[str, Any]) -> None:
    """Already-redacted ``attributes`` as JSON text, each cut to ``STEWARD_TRACE_CONTENT_MAX_BYTES``."""
    for key, value in attributes.items():
        text = json.dumps(value, ensure_ascii=False, default=str)
        current.set_attribute(key, cut(text, settings.trace_content_max_bytes))


def cut(text: str, limit: int) -> str:
    """``text`` within ``limit`` UTF-8 bytes, a marker saying how long it was when it had to be cut."""
    raw = text.encode()
    if len(raw) <= limit:
        return text
    marker = f"…[truncated: {len(raw)} bytes]".encode()
    return raw[: limit - len(marker)].decode(errors="ignore") + marker.decode()
