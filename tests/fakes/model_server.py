"""A scripted OpenAI-compatible model server on loopback (``POST /v1/chat/completions``, ``GET /v1/models``).

    with ModelServer() as server:
        server.script("scripted-1", [
            Turn.tool_calls([("lookup", {"q": "x"})], usage=(100, 20)),
            Turn.final("the answer", usage=(150, 10)),
        ])
        result = await chat(http, base_url=server.url, api_key=None, model="scripted-1", messages=[...])

Which turn answers is decided from the request alone: turn index = number of ``assistant`` messages in
``messages``. A conversation therefore replays identically after a worker restart, and any number of
concurrent conversations can share one script. Past the end of a script the last turn answers again if it
is a final answer; otherwise the server answers 500 saying the script ran out.

Requests are checked the way OpenAI checks them (``strict``, on by default): every tool call of an
assistant message answered by ``tool`` messages before the conversation goes on, tool-call arguments
sent back as JSON strings. A client bug there gets a 400 here, as it would in production.
"""

from __future__ import annotations

import itertools
import json
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from tests.fakes import BackgroundServer, Reply, Request

Usage = tuple[int, int] | Literal["auto"] | None
TurnFn = Callable[[dict[str, Any]], "Turn"]
Script = Sequence["Turn | TurnFn"] | TurnFn

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_exceeded",
}


@dataclass(frozen=True)
class ScriptedCall:
    name: str
    arguments: Any  # JSON-encoded when sent; a str is sent as is (so it may be invalid JSON)


@dataclass(frozen=True)
class Turn:
    """One scripted answer; build it with the constructors below."""

    kind: Literal["final", "tool_calls", "error", "hang", "raw", "disconnect"]
    content: str | None = None
    calls: tuple[ScriptedCall, ...] = ()
    # (prompt_tokens, completion_tokens); "auto": about chars/4 of the request and answer; None: no usage.
    usage: Usage = "auto"
    finish_reason: str | None = None
    status: int = 200
    message: str | None = None
    retry_after: float | str | None = None
    seconds: float = 0.0
    then: Turn | None = None
    during: Literal["headers", "body"] = "headers"
    body: Any = None
    headers: tuple[tuple[str, str], ...] = ()
    chunked: bool = False

    @classmethod
    def final(cls, text: str, *, usage: Usage = "auto", finish_reason: str = "stop", chunked: bool = False) -> Turn:
        """An answer without tool calls; ``chunked`` streams the body without a Content-Length."""
        return cls("final", content=text, usage=usage, finish_reason=finish_reason, chunked=chunked)

    @classmethod
    def tool_calls(
        cls,
        calls: Iterable[tuple[str, Any]],
        *,
        content: str | None = None,
        usage: Usage = "auto",
        finish_reason: str = "tool_calls",
    ) -> Turn:
        """Calls ``[(name, arguments), ...]``; arguments given as a str are sent verbatim (invalid JSON too).
        Ids are ``call_<turn>_<position>``: unique within a conversation, the same on every replay."""
        scripted = tuple(ScriptedCall(name, arguments) for name, arguments in calls)
        return cls("tool_calls", content=content, calls=scripted, usage=usage, finish_reason=finish_reason)

    @classmethod
    def error(cls, status: int, message: str | None = None, *, retry_after: float | str | None = None) -> Turn:
        """An OpenAI-style error body; ``retry_after`` (seconds, or an HTTP date string) sets Retry-After."""
        return cls("error", status=status, message=message, retry_after=retry_after)

    @classmethod
    def hang(cls, seconds: float, then: Turn | None = None, *, during: Literal["headers", "body"] = "headers") -> Turn:
        """Say nothing for ``seconds`` (before the headers, or halfway through the body), then answer
        ``then`` (default: a final "ok"). Hanging handlers wake up when the server stops."""
        return cls("hang", seconds=seconds, then=then, during=during)

    @classmethod
    def disconnect(cls) -> Turn:
        """Close the connection without answering (clients see a connection error)."""
        return cls("disconnect")

    @classmethod
    def raw(cls, body: Any, *, status: int = 200, headers: dict[str, str] | None = None, chunked: bool = False) -> Turn:
        """Exactly this body: a str or bytes verbatim (malformed responses), anything else as JSON."""
        return cls("raw", body=body, status=status, headers=tuple((headers or {}).items()), chunked=chunked)


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    model: str | None
    body: Any  # the parsed JSON body (or its text when not JSON)
    headers: dict[str, str]  # names in lower case
    time: float  # time.time() on arrival
    turn: int | None  # the script turn chosen, for chat requests
    status: int  # the status answered (a hang's final status; 0: the connection was dropped)

    @property
    def messages(self) -> list[dict[str, Any]]:
        messages = self.body.get("messages") if isinstance(self.body, dict) else None
        return messages if isinstance(messages, list) else []

    @property
    def tool_messages(self) -> list[dict[str, Any]]:
        """The ``role: "tool"`` messages: the tool results fed back to the model."""
        return [m for m in self.messages if isinstance(m, dict) and m.get("role") == "tool"]


@dataclass
class _State:
    scripts: dict[str, Script] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)


class ModelServer(BackgroundServer):
    """Scripted chat completions per model name; see the module docstring."""

    def __init__(self, *, strict: bool = True) -> None:
        super().__init__()
        self.strict = strict
        self.require_key: str | None = None  # when set, requests need "Authorization: Bearer <key>"
        self._lock = threading.Lock()
        self._state = _State()
        self._ids = itertools.count(1)

    @property
    def url(self) -> str:
        """The base URL to configure a client with (ends in /v1)."""
        return self.base_url + "/v1"

    def script(self, model: str, turns: Script) -> ModelServer:
        """Answer requests for ``model`` from ``turns`` (Turns and ``(request_json) -> Turn`` callables, or
        one callable answering every turn). Replaces any previous script for that model."""
        if not callable(turns):
            turns = list(turns)
            if not turns:
                raise ValueError("a script needs at least one turn")
        with self._lock:
            self._state.scripts[model] = turns
        return self

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, oldest first (a copy)."""
        with self._lock:
            return list(self._state.requests)

    def calls(self, model: str | None = None) -> list[RecordedRequest]:
        """The chat-completion requests (for ``model``), whatever was answered; filter on ``.status == 200``
        for the paid ones."""
        return [
            r for r in self.requests if r.path.endswith("/chat/completions") and (model is None or r.model == model)
        ]

    def reset(self) -> None:
        """Forget scripts, recorded requests and ``require_key``."""
        with self._lock:
            self._state = _State()
        self.require_key = None

    # --- serving ---

    def handle(self, request: Request) -> Reply:
        body = request.body_value()
        model = body.get("model") if isinstance(body, dict) and isinstance(body.get("model"), str) else None
        turn_index: int | None = None
        if self.require_key is not None and request.headers.get("authorization") != f"Bearer {self.require_key}":
            reply = _unauthorized(request.headers.get("authorization"))
        elif request.method == "GET" and request.path.rstrip("/") == "/v1/models":
            reply = self._models()
        elif request.method == "POST" and request.path == "/v1/chat/completions":
            turn_index, reply = self._complete(body)
        else:
            reply = _error_reply(404, f"no route for {request.method} {request.path}")
        status = reply.status
        with self._lock:
            self._state.requests.append(
                RecordedRequest(
                    method=request.method,
                    path=request.path,
                    model=model,
                    body=body,
                    headers=dict(request.headers),
                    time=time.time(),
                    turn=turn_index,
                    status=status,
                )
            )
        return reply

    def _models(self) -> Reply:
        with self._lock:
            names = sorted(self._state.scripts)
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "steward-fake"} for name in names]
        return Reply.json(200, {"object": "list", "data": data})

    def _complete(self, body: Any) -> tuple[int | None, Reply]:
        problem = _check_request(body, strict=self.strict)
        if problem:
            return None, _error_reply(400, problem)
        model: str = body["model"]
        with self._lock:
            script = self._state.scripts.get(model)
            known = ", ".join(sorted(self._state.scripts)) or "none"
        if script is None:
            return None, _error_reply(
                404, f"The model `{model}` does not exist (scripted models: {known})", code="model_not_found"
            )
        index = sum(1 for m in body["messages"] if m.get("role") == "assistant")
        turn = _pick(script, index, body)
        if turn is None:
            length = len(script) if isinstance(script, Sequence) else 0
            return index, _error_reply(
                500,
                f"script for model {model!r} ran out: it has {length} turns, the request has {index} assistant "
                "messages, and the last turn is not a final answer",
            )
        return index, self._reply(turn, index, model, body)

    def _reply(self, turn: Turn, index: int, model: str, request: dict[str, Any]) -> Reply:
        if turn.kind == "error":
            headers = {"Retry-After": _header_value(turn.retry_after)} if turn.retry_after is not None else {}
            return _error_reply(turn.status, turn.message or _default_message(turn.status), headers=headers)
        if turn.kind == "disconnect":
            return Reply(status=0, drop=True)
        if turn.kind == "hang":
            reply = self._reply(turn.then or Turn.final("ok"), index, model, request)
            if turn.during == "headers":
                reply.delay += turn.seconds
            else:
                reply.body = self._drip(_as_bytes(reply.body), turn.seconds)
            return reply
        if turn.kind == "raw":
            raw = turn.body if isinstance(turn.body, bytes | str) else json.dumps(turn.body)
            raw_bytes = raw.encode() if isinstance(raw, str) else raw
            reply = Reply(turn.status, raw_bytes, {"Content-Type": "application/json", **dict(turn.headers)})
        else:
            reply = Reply.json(200, self._completion(turn, index, model, request))
        if turn.chunked:
            reply.body = _chunks(_as_bytes(reply.body))
        return reply

    def _completion(self, turn: Turn, index: int, model: str, request: dict[str, Any]) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": turn.content}
        if turn.calls:
            message["tool_calls"] = [
                {
                    "id": f"call_{index}_{position}",
                    "type": "function",
                    "function": {
                        "name": call.name,
                        "arguments": call.arguments if isinstance(call.arguments, str) else json.dumps(call.arguments),
                    },
                }
                for position, call in enumerate(turn.calls)
            ]
        response: dict[str, Any] = {
            "id": f"chatcmpl-fake-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": turn.finish_reason, "logprobs": None}],
        }
        usage = _usage(turn, request, message)
        if usage is not None:
            prompt, completion = usage
            response["usage"] = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
        return response

    def _drip(self, body: bytes, seconds: float) -> Iterator[bytes]:
        half = len(body) // 2
        yield body[:half]
        if self.sleep(seconds):
            yield body[half:]


# --- helpers -----------------------------------------------------------------------------------------------


def _pick(script: Script, index: int, request: dict[str, Any]) -> Turn | None:
    """The turn answering ``request``; None when the script has run out."""
    if callable(script):
        return _resolve(script, request)
    if index < len(script):
        return _resolve(script[index], request)
    last = _resolve(script[-1], request)
    return last if last.kind == "final" else None


def _resolve(entry: Turn | TurnFn, request: dict[str, Any]) -> Turn:
    turn = entry if isinstance(entry, Turn) else entry(request)
    if not isinstance(turn, Turn):
        raise TypeError(f"a scripted callable returned {type(turn).__name__}, not a Turn")
    return turn


def _usage(turn: Turn, request: dict[str, Any], message: dict[str, Any]) -> tuple[int, int] | None:
    if turn.usage != "auto":
        return turn.usage
    # About what a real tokenizer reports for English: 4 characters a token, 4 tokens of framing a message.
    prompt = 3 + sum(4 + _quarter(_text(m)) for m in request["messages"])
    if request.get("tools"):
        prompt += _quarter(json.dumps(request["tools"]))
    answer = (message.get("content") or "") + json.dumps(message.get("tool_calls") or "")
    return prompt, max(1, _quarter(answer))


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    text = content if isinstance(content, str) else json.dumps(content) if content else ""
    if message.get("tool_calls"):
        text += json.dumps(message["tool_calls"])
    return text


def _quarter(text: str) -> int:
    return math.ceil(len(text) / 4)


def _check_request(body: Any, *, strict: bool) -> str | None:
    """What OpenAI would reject in this request, or None."""
    if not isinstance(body, dict):
        return "the request body must be a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "you must provide a model parameter"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty array"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            return f"messages[{i}]: must be an object with a role among {sorted(_ROLES)}"
    tools = body.get("tools")
    if tools is not None and not (
        isinstance(tools, list)
        and all(
            isinstance(t, dict)
            and t.get("type") == "function"
            and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str)
            for t in tools
        )
    ):
        return "'tools' must be an array of {'type': 'function', 'function': {'name', ...}}"
    return _check_tool_flow(messages) if strict else None


def _check_tool_flow(messages: list[dict[str, Any]]) -> str | None:
    pending: list[str] = []
    for i, message in enumerate(messages):
        if message["role"] == "tool":
            call_id = message.get("tool_call_id")
            if call_id not in pending:
                return (
                    f"messages[{i}]: a message with role 'tool' must answer a tool call of the preceding "
                    f"assistant message (tool_call_id {call_id!r} is not among {pending})"
                )
            pending.remove(call_id)
            continue
        if pending:
            return (
                f"messages[{i}]: an assistant message with 'tool_calls' must be followed by tool messages "
                f"answering each tool_call_id; not answered: {pending}"
            )
        if message["role"] == "assistant":
            calls = message.get("tool_calls") or []
            for j, call in enumerate(calls):
                function = call.get("function") if isinstance(call, dict) else None
                if not (
                    isinstance(function, dict)
                    and isinstance(call.get("id"), str)
                    and isinstance(function.get("name"), str)
                    and isinstance(function.get("arguments"), str)
                ):
                    return (
                        f"messages[{i}].tool_calls[{j}]: must be {{'id', 'type': 'function', 'function': "
                        "{'name', 'arguments': <JSON string>}}"
                    )
            pending = [call["id"] for call in calls]
    if pending:
        return f"the last assistant message has tool calls without answers: {pending}"
    return None


def _unauthorized(authorization: str | None) -> Reply:
    if not authorization:
        message = "You didn't provide an API key."
    else:
        # Real providers mask the key they quote; this one quotes it whole, so tests prove clients redact it.
        presented = authorization.removeprefix("Bearer ").strip()
        message = f"Incorrect API key provided: {presented}. You can find your API key in your account settings."
    return _error_reply(401, message, code="invalid_api_key")


def _error_reply(status: int, message: str, *, code: str | None = None, headers: dict[str, str] | None = None) -> Reply:
    error_type = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    return Reply.json(status, body, headers)


def _default_message(status: int) -> str:
    if status == 429:
        return "Rate limit reached for requests. Please try again later."
    if status >= 500:
        return "The server had an error while processing your request. Sorry about that!"
    return f"scripted error {status}"


def _header_value(value: float | str) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _as_bytes(body: bytes | Iterable[bytes]) -> bytes:
    return body if isinstance(body, bytes) else b"".join(body)


def _chunks(body: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]
