"""Evaluating CEL where a costly expression can neither block the event loop nor outlive its budget.

The ``cel`` package holds the GIL for a whole evaluation and cannot be interrupted, so a thread does not
help and a timer cannot stop it. Costly evaluations therefore run in a few child processes (``python -m
app.workflows.cel.sandbox``), each serving one request at a time over its stdin/stdout (4-byte length, then
JSON). A dedicated thread per child waits on the pipe with the GIL released, so the event loop keeps
running; a child that overruns its time is killed (SIGKILL) and a fresh one started for the next
request. Children run under an address-space limit, so a comprehension that builds huge lists dies
rather than swapping the machine out, and exit when their parent's end of the pipe closes.

What this promises: the caller's loop is never blocked by an evaluation, and no evaluation runs longer
than the time it was given. What it does not: fairness between tenants (requests wait their turn for
one of :attr:`Sandbox.processes` children).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from app.workflows.cel.expressions import ExpressionError, ExpressionLimit, evaluate_condition, render

_ROOT = Path(__file__).resolve().parents[3]  # the directory holding the `app` package
_STARTUP_S = 30.0  # a child that cannot even import in this long is broken, not slow
MAX_REPLY_BYTES = 16 * 1024 * 1024


class Sandbox:
    """A pool of at most ``processes`` evaluator children, started on first use."""

    def __init__(self, processes: int = 2, memory_mb: int = 512) -> None:
        self.processes = max(1, processes)
        self.memory_mb = memory_mb
        self._idle: list[_Child] = []
        self._lock = threading.Lock()
        self.busy = 0  # requests being evaluated right now
        self._executor = ThreadPoolExecutor(self.processes, thread_name_prefix="cel-sandbox")

    async def evaluate(
        self, request: dict[str, Any], timeout: float, source: str, check: Callable[[], None] | None = None
    ) -> tuple[Any, float]:
        """Run ``request`` in a child within ``timeout`` seconds; returns (result, seconds it ran).

        ``check`` runs first, in the same thread. Raises :class:`ExpressionError` as the evaluation did,
        or :class:`ExpressionLimit` when it ran out of time or memory; ``source`` names the expression."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, request, timeout, source, check)

    def _call(
        self, request: dict[str, Any], timeout: float, source: str, check: Callable[[], None] | None
    ) -> tuple[Any, float]:
        if check is not None:
            check()
        payload = json.dumps(request, separators=(",", ":"), ensure_ascii=False).encode()
        child = self._take(source)
        started = time.monotonic()
        with self._lock:
            self.busy += 1
        try:
            reply = child.ask(payload, timeout)
        except TimeoutError:
            child.kill()
            raise ExpressionLimit(source, f"exceeded its evaluation budget (stopped after {timeout:.2f}s)") from None
        except (OSError, EOFError, ValueError):
            child.kill()
            raise ExpressionLimit(
                source, f"the evaluation failed: it ran out of memory (limit {self.memory_mb} MB) or crashed"
            ) from None
        finally:
            with self._lock:
                self.busy -= 1
        elapsed = time.monotonic() - started
        with self._lock:
            self._idle.append(child)
        if "error" in reply:
            expression, reason, limit = reply["error"]
            raise (ExpressionLimit if limit else ExpressionError)(expression, reason)
        return reply["ok"], elapsed

    def _take(self, source: str) -> _Child:
        with self._lock:
            while self._idle:
                child = self._idle.pop()
                if child.alive():
                    return child
        try:
            return _Child(self.memory_mb)
        except (OSError, TimeoutError, EOFError) as exc:
            raise ExpressionLimit(source, f"could not start an evaluator process: {exc}") from exc

    def close(self) -> None:
        """Stop the children (new ones start if it is used again)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for child in idle:
            child.kill()


class _Child:
    def __init__(self, memory_mb: int) -> None:
        # Only what Python needs: the parent's environment holds database URLs and secret keys.
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")])),
               "PATH": os.environ.get("PATH", ""), "LANG": os.environ.get("LANG", "C.UTF-8")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.workflows.cel.sandbox", str(memory_mb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=_ROOT,
        )
        _children.add(self)
        try:
            if self._read(1, time.monotonic() + _STARTUP_S) != b"R":
                raise EOFError("the evaluator process did not start")
        except BaseException:
            self.kill()
            raise

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ask(self, payload: bytes, timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        deadline = time.monotonic() + max(timeout, 0.0)
        self.proc.stdin.write(len(payload).to_bytes(4, "big") + payload)
        self.proc.stdin.flush()
        size = int.from_bytes(self._read(4, deadline), "big")
        if size > MAX_REPLY_BYTES:
            raise ValueError("reply too large")
        reply: dict[str, Any] = json.loads(self._read(size, deadline))
        return reply

    def _read(self, n: int, deadline: float) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        chunks: list[bytes] = []
        while n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, min(n, 1 << 20))
            if not chunk:
                raise EOFError("the evaluator process exited")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def kill(self) -> None:
        _children.discard(self)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


_children: set[_Child] = set()


@atexit.register
def _kill_children() -> None:
    for child in list(_children):
        child.kill()


# --- the child -----------------------------------------------------------------------------------------


def _serve(memory_mb: int) -> None:
    import resource

    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # The protocol gets its own descriptor; anything printed by accident goes to stderr instead.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    requests = sys.stdin.buffer
    out.write(b"R")
    out.flush()
    while len(header := requests.read(4)) == 4:
        reply = _handle(requests.read(int.from_bytes(header, "big")))
        try:
            data = json.dumps(reply, separators=(",", ":"), ensure_ascii=False).encode()
        except MemoryError:
            data = b""
        if not data or len(data) > MAX_REPLY_BYTES:
            data = json.dumps({"error": ["", "the result is too large", True]}).encode()
        out.write(len(data).to_bytes(4, "big") + data)
        out.flush()


def _handle(body: bytes) -> dict[str, Any]:
    source = ""
    try:
        request = json.loads(body)
        source = request.get("source", "")
        if request["op"] == "condition":
            return {"ok": evaluate_condition(request["text"], request["context"])}
        return {"ok": render(request["value"], request["context"])}
    except ExpressionError as exc:
        return {"error": [exc.expression, exc.reason, isinstance(exc, ExpressionLimit)]}
    except (MemoryError, RecursionError) as exc:
        return {"error": [source, f"the evaluation ran out of memory ({type(exc).__name__})", True]}


if __name__ == "__main__":
    _serve(int(sys.argv[1]) if len(sys.argv) > 1 else 512)
