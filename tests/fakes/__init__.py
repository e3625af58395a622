"""Real HTTP servers on loopback standing in for what is outside our walls (model providers, tools).

Each runs ``http.server.ThreadingHTTPServer`` in a background thread on 127.0.0.1 and a free port, so
async tests, the app and worker subprocesses all reach it over TCP, and timeouts, 429s, hangs and huge
bodies are real. ``model_server.ModelServer`` speaks the OpenAI chat-completions API from a script;
``tool_server.ToolServer`` has misbehaving tool endpoints. Both are context managers, or ``start()`` /
``stop()`` them from a fixture.

This module holds what they share: :class:`BackgroundServer`, :class:`Request` and :class:`Reply`.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl, urlsplit

# Idle keep-alive connections are dropped after this; longer than httpx's 5 s keep-alive expiry.
IDLE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON; None when empty; raises ValueError when it is not JSON."""
        return json.loads(self.body) if self.body else None

    def body_value(self) -> Any:
        """The body as JSON when it is JSON, else as text (None when empty): handy for recording."""
        try:
            return self.json()
        except ValueError:
            return self.body.decode("utf-8", errors="replace")


@dataclass
class Reply:
    """What to answer. ``body`` as bytes goes out with a Content-Length; an iterable of chunks goes out
    chunked (the iterable may sleep between chunks). ``delay`` seconds pass before anything is sent;
    ``drop`` closes the connection without answering."""

    status: int = 200
    body: bytes | Iterable[bytes] = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False

    @classmethod
    def json(cls, status: int, value: Any, headers: Mapping[str, str] | None = None) -> Reply:
        body = json.dumps(value).encode()
        return cls(status, body, {"Content-Type": "application/json", **(headers or {})})


class BackgroundServer:
    """A ThreadingHTTPServer on 127.0.0.1 in a daemon thread; subclasses implement :meth:`handle`."""

    def __init__(self) -> None:
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def handle(self, request: Request) -> Reply:
        raise NotImplementedError

    # --- lifecycle ---

    def start(self) -> Self:
        if self._httpd is not None:
            return self
        self._stopping.clear()
        self._httpd = _Server(("127.0.0.1", 0), _handler_class(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake every sleeping handler and close open connections (clients see them drop)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server is not running")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def sleep(self, seconds: float) -> bool:
        """Sleep in a handler; returns False (early) when the server is stopping."""
        return not self._stopping.wait(max(0.0, seconds))


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a hanging handler must not keep the test process alive
    request_queue_size = 128  # the default 5 drops connections (1 s SYN retry) when 20 clients connect at once

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that vanish mid-request (a worker killed on purpose, a timeout) are part of the tests;
        # anything else is still printed.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _handler_class(server: BackgroundServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        owner = server

    return Handler


class _Handler(BaseHTTPRequestHandler):
    owner: BackgroundServer
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked responses
    timeout = IDLE_TIMEOUT_S

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without this, Nagle + delayed ACK add 40 ms a request.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.owner._connections_lock:
            self.owner._connections.add(self.connection)

    def finish(self) -> None:
        with self.owner._connections_lock:
            self.owner._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests assert on recorded requests, not on stderr

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_GET

    def _dispatch(self) -> None:
        parts = urlsplit(self.path)
        try:
            body = self._read_body()
        except ValueError:
            self.close_connection = True
            self._send(Reply.json(400, {"error": {"message": "unreadable request body"}}))
            return
        request = Request(
            method=self.command,
            path=parts.path,
            query=dict(parse_qsl(parts.query)),
            headers={name.lower(): value for name, value in self.headers.items()},
            body=body,
        )
        try:
            reply = self.owner.handle(request)
        except Exception as exc:  # a bug in a scripted callable: say so rather than hang the client
            reply = Reply.json(500, {"error": {"message": f"fake server error: {type(exc).__name__}: {exc}"}})
        try:
            self._send(reply)
        except OSError:
            # The client gave up (timeout, size limit) while we were answering.
            self.close_connection = True

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, reply: Reply) -> None:
        if reply.delay and not self.owner.sleep(reply.delay):
            reply = Reply(drop=True)
        if reply.drop:
            self.close_connection = True
            return
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if isinstance(reply.body, bytes):
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(reply.body)
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for chunk in _nonempty(reply.body):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")


def _nonempty(chunks: Iterable[bytes]) -> Iterator[bytes]:
    # An empty chunk would end a chunked body early.
    return (chunk for chunk in chunks if chunk)
