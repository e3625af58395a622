"""Misbehaving tool endpoints on loopback, for the tool-guardrail tests.

    with ToolServer() as tools:
        url = tools.url + "/flaky?times=2"   # 503, 503, then 200, counted per Idempotency-Key

Every endpoint takes any method (tools default to GET, most tests POST):

- ``/echo``: 200 ``{"received": <JSON body>, "headers": {...}}`` (idempotency-key, authorization,
  content-type, user-agent, traceparent and every ``x-*`` header)
- ``/fail``: 500 always; ``/fail-400``: 400 with a JSON error; ``/echo-400``: 400 quoting the request headers
- ``/flaky?times=N``: 503 for the first N calls per ``Idempotency-Key`` value, then 200
- ``/hang?seconds=S``: answers 200 after S seconds (default 30) without blocking other requests
- ``/ratelimit?times=N&retry_after=R``: 429 with ``Retry-After: R`` for the first N calls per key, then 200
- ``/huge?bytes=B``: 200 with ``{"data": "xxx..."}`` of about B bytes, streamed in chunks
- ``/write``: records the call in ``writes`` and answers ``{"ok": true, "n": <calls with that key>}``
- ``/echo-as-key``: 200 ``{"by_header": {<Authorization header>: true}}`` (a credential as a JSON key)
- ``/pad?before=N``: 200, a text body of N bytes of ``x``, the Authorization header, then 4 KiB of ``y``

``down = True`` turns every endpoint into a 503 (to trip circuit breakers) until set back to False.
Every request lands in ``calls``; ``reset()`` forgets calls, writes, counters and ``down``.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tests.fakes import BackgroundServer, Reply, Request

_ECHOED_HEADERS = frozenset({"idempotency-key", "authorization", "content-type", "user-agent", "traceparent"})


@dataclass(frozen=True)
class ToolCallRecord:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names in lower case
    body: Any  # parsed JSON, else text, else None
    time: float  # time.time() on arrival

    @property
    def idempotency_key(self) -> str | None:
        return self.headers.get("idempotency-key")


@dataclass(frozen=True)
class WriteRecord:
    body: Any
    idempotency_key: str | None
    time: float
    n: int  # how many writes that key had made, this one included


class ToolServer(BackgroundServer):
    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self._lock = threading.Lock()
        self._calls: list[ToolCallRecord] = []
        self._writes: list[WriteRecord] = []
        self._counts: Counter[tuple[str, str]] = Counter()
        self._routes: dict[str, Callable[[Request], Reply]] = {
            "/echo": self._echo,
            "/fail": lambda request: Reply.json(500, {"error": "internal error (scripted)"}),
            "/fail-400": lambda request: Reply.json(400, {"error": "bad request (scripted)", "field": "q"}),
            "/echo-400": lambda request: Reply.json(400, {"error": "rejected", "headers": dict(request.headers)}),
            "/flaky": self._flaky,
            "/hang": self._hang,
            "/ratelimit": self._ratelimit,
            "/huge": self._huge,
            "/write": self._write,
            "/echo-as-key": lambda request: Reply.json(
                200, {"by_header": {request.headers.get("authorization", ""): True}}
            ),
            "/pad": self._pad,
        }

    @property
    def url(self) -> str:
        return self.base_url

    @property
    def calls(self) -> list[ToolCallRecord]:
        """Every request received, oldest first (a copy)."""
        with self._lock:
            return list(self._calls)

    def calls_to(self, path: str) -> list[ToolCallRecord]:
        return [call for call in self.calls if call.path == path]

    @property
    def writes(self) -> list[WriteRecord]:
        """The calls to /write, oldest first (a copy)."""
        with self._lock:
            return list(self._writes)

    def reset(self) -> None:
        with self._lock:
            self._calls.clear()
            self._writes.clear()
            self._counts.clear()
        self.down = False

    # --- serving ---

    def handle(self, request: Request) -> Reply:
        with self._lock:
            self._calls.append(
                ToolCallRecord(
                    method=request.method,
                    path=request.path,
                    query=request.query,
                    headers=request.headers,
                    body=request.body_value(),
                    time=time.time(),
                )
            )
        if self.down:
            return Reply.json(503, {"error": "service unavailable (down)"})
        route = self._routes.get(request.path.rstrip("/"))
        if route is None:
            return Reply.json(404, {"error": f"no tool at {request.path}", "paths": sorted(self._routes)})
        try:
            return route(request)
        except ValueError as exc:  # a malformed query parameter
            return Reply.json(400, {"error": str(exc)})

    def _count(self, request: Request) -> int:
        """This call's number among calls to the same path with the same Idempotency-Key (1-based)."""
        key = (request.path, request.headers.get("idempotency-key", ""))
        with self._lock:
            self._counts[key] += 1
            return self._counts[key]

    def _echo(self, request: Request) -> Reply:
        headers = {
            name: value for name, value in request.headers.items() if name in _ECHOED_HEADERS or name.startswith("x-")
        }
        return Reply.json(200, {"received": request.body_value(), "headers": headers})

    def _flaky(self, request: Request) -> Reply:
        n = self._count(request)
        if n <= int(request.query.get("times", "1")):
            return Reply.json(503, {"error": f"flaky: failure {n}"})
        return Reply.json(200, {"ok": True, "attempt": n})

    def _ratelimit(self, request: Request) -> Reply:
        n = self._count(request)
        if n <= int(request.query.get("times", "1")):
            retry_after = request.query.get("retry_after", "1")
            return Reply.json(429, {"error": "rate limited"}, {"Retry-After": retry_after})
        return Reply.json(200, {"ok": True, "attempt": n})

    def _hang(self, request: Request) -> Reply:
        seconds = float(request.query.get("seconds", "30"))
        # The base server sleeps in this request's own thread before answering (other requests go on).
        return Reply(200, json.dumps({"ok": True, "slept": seconds}).encode(), _JSON, delay=seconds)

    def _huge(self, request: Request) -> Reply:
        size = max(0, int(request.query.get("bytes", str(1024 * 1024))) - len('{"data": ""}'))
        return Reply(200, _huge_body(size), _JSON)

    def _pad(self, request: Request) -> Reply:
        before = b"x" * int(request.query.get("before", "0"))
        body = before + request.headers.get("authorization", "").encode() + b"y" * 4096
        return Reply(200, body, {"Content-Type": "text/plain"})

    def _write(self, request: Request) -> Reply:
        key = request.headers.get("idempotency-key")
        with self._lock:
            n = 1 + sum(1 for write in self._writes if write.idempotency_key == key)
            self._writes.append(WriteRecord(request.body_value(), key, time.time(), n))
        return Reply.json(200, {"ok": True, "n": n})


_JSON = {"Content-Type": "application/json"}


def _huge_body(size: int, chunk: int = 64 * 1024) -> Iterator[bytes]:
    yield b'{"data": "'
    for start in range(0, size, chunk):
        yield b"x" * min(chunk, size - start)
    yield b'"}'
