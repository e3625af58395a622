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
events. Attributes carry ids, names, counts and outcomes, never arguments, prompts or secrets. Run events
keep the trace id of the span they are written in (``current_trace_id``), which the dashboard links to
``STEWARD_TRACE_URL``. Every helper here returns at once, doing nothing, while tracing is off.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
from opentelemetry.semconv._incubating.attributes import messaging_attributes as messaging
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)
TRACER = trace.get_tracer("steward")
EXCLUDED_URLS = "healthz,readyz,metrics,static/"
_provider: TracerProvider | None = None
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


def configure(service: str) -> bool:
    """Install this process's tracer provider when tracing is asked for (once a process); whether on."""
    global _provider
    if _provider is not None:
        return True
    if not enabled():
        return False
    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME")
                                                        or service}))
    names = [n.strip() for n in (os.environ.get("OTEL_TRACES_EXPORTER") or "otlp").lower().split(",") if n.strip()]
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
    trace.set_tracer_provider(provider)
    _provider = provider
    log.info("tracing on: %s to %s", ", ".join(names), os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
             or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "the default endpoint")
    return True


def shutdown() -> None:
    """Send what is buffered and stop (a process stopping)."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None


@contextmanager
def span(name: str, attributes: Mapping[str, Any], kind: SpanKind = SpanKind.INTERNAL) -> Iterator[Span]:
    """A span of ours, current inside the block; None-valued attributes are left out."""
    with TRACER.start_as_current_span(name, kind=kind, attributes={k: v for k, v in attributes.items()
                                                                   if v is not None}) as current:
        yield current


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


def trace_id_while_on(traceparent: str | None) -> str | None:
    """The trace id of a stored traceparent, with tracing on (None off: nothing is written then)."""
    return trace_id_of(traceparent) if _provider is not None else None


def sent(queue: str, tenant_id: Any, run_id: Any, step_id: str | None, attempt: int,
         map_index: int | None) -> str | None:
    """A ``send <queue>`` producer span (the messaging conventions) for a step attempt queued in the
    current trace; returns its traceparent, which the attempt keeps so that the worker's ``process``
    span is its child. None with tracing off or outside a span (the attempt then starts a trace)."""
    if _provider is None or not trace.get_current_span().get_span_context().is_valid:
        return None
    with TRACER.start_as_current_span(f"send {queue}", kind=SpanKind.PRODUCER, attributes={k: v for k, v in {
        MESSAGING_SYSTEM: "arq", MESSAGING_DESTINATION: queue, MESSAGING_OPERATION: "send",
        "steward.tenant.id": str(tenant_id), "steward.run.id": str(run_id), "steward.step.id": step_id,
        "steward.step.attempt": attempt, "steward.step.map_index": map_index,
    }.items() if v is not None}):
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


def _span_context(traceparent: str | None) -> SpanContext | None:
    if not traceparent:
        return None
    found = trace.get_current_span(_PROPAGATOR.extract({"traceparent": traceparent})).get_span_context()
    return found if found.is_valid else None


@contextmanager
def continued(name: str, attributes: Mapping[str, Any], kind: SpanKind, parent: str | None,
              first: str | None) -> Iterator[Span]:
    """A span continuing the trace of ``parent`` (a stored traceparent), or, without one, the root of a new
    trace; linked to ``first`` (the run's first trace) when that is another trace."""
    parent_context = _span_context(parent)
    first_context = _span_context(first)
    context = trace.set_span_in_context(NonRecordingSpan(parent_context)) if parent_context else Context()
    links = [Link(first_context)] if first_context and (
        parent_context is None or first_context.trace_id != parent_context.trace_id) else []
    with TRACER.start_as_current_span(name, context=context, kind=kind, links=links, attributes={
            k: v for k, v in attributes.items() if v is not None}) as current:
        yield current


def outcome(current: Span, ok: bool, error_class: str | None) -> None:
    current.set_attribute("steward.outcome", "ok" if ok else error_class or "error")
    if not ok:
        current.set_attribute("error.type", error_class or "error")
        current.set_status(Status(StatusCode.ERROR, error_class))


def event(name: str, **attributes: Any) -> None:
    """An event on the current span (a guardrail refusal, an approval request)."""
    trace.get_current_span().add_event(name, {k: v for k, v in attributes.items() if v is not None})
