"""An OpenTelemetry traces receiver on loopback: ``POST /v1/traces`` (OTLP/HTTP, protobuf), as an
OpenTelemetry Collector would take them, keeping every span it is sent.

    with OtlpReceiver() as receiver:
        ... OTEL_EXPORTER_OTLP_ENDPOINT=receiver.base_url ...
        receiver.spans  # [ReceivedSpan(name, trace_id, span_id, parent_id, kind, attributes, events, service)]
"""

from __future__ import annotations

import base64
import threading
from dataclasses import dataclass
from typing import Any

from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.fakes import BackgroundServer, Reply, Request


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: str
    attributes: dict[str, Any]
    events: list[str]
    service: str
    status: str
    links: list[str]  # the trace ids this span links to


def _hex(encoded: str) -> str:
    """An id as W3C traceparent writes it (the JSON mapping of protobuf bytes is base64)."""
    return base64.b64decode(encoded).hex() if encoded else ""


def _value(value: dict[str, Any]) -> Any:
    if "arrayValue" in value:
        return [_value(v) for v in value["arrayValue"].get("values", [])]
    kind, raw = next(iter(value.items()))
    return int(raw) if kind == "intValue" else raw


class OtlpReceiver(BackgroundServer):
    """``parse=False`` accepts every export unread, counting its bytes (a benchmark's receiver: a real
    collector's work happens on another machine, not on the cores being measured)."""

    def __init__(self, *, parse: bool = True) -> None:
        super().__init__()
        self.parse = parse
        self.received_bytes = 0
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def handle(self, request: Request) -> Reply:
        if request.method != "POST" or request.path != "/v1/traces":
            return Reply(404)
        with self._lock:
            self.received_bytes += len(request.body)
        if not self.parse:
            return Reply(200, ExportTraceServiceResponse().SerializeToString(),
                         {"Content-Type": "application/x-protobuf"})
        export = ExportTraceServiceRequest()
        export.ParseFromString(request.body)
        received = []
        for resource_spans in MessageToDict(export).get("resourceSpans", []):
            resource = {a["key"]: _value(a["value"]) for a in resource_spans["resource"].get("attributes", [])}
            for scope in resource_spans.get("scopeSpans", []):
                for span in scope.get("spans", []):
                    received.append(ReceivedSpan(
                        name=span["name"], trace_id=_hex(span["traceId"]), span_id=_hex(span["spanId"]),
                        parent_id=_hex(span.get("parentSpanId", "")), kind=span.get("kind", ""),
                        attributes={a["key"]: _value(a["value"]) for a in span.get("attributes", [])},
                        events=[e["name"] for e in span.get("events", [])], service=str(resource.get("service.name")),
                        status=span.get("status", {}).get("code", ""),
                        links=[_hex(link["traceId"]) for link in span.get("links", [])],
                    ))
        with self._lock:
            self._spans += received
        body = ExportTraceServiceResponse().SerializeToString()
        return Reply(200, body, {"Content-Type": "application/x-protobuf"})
