"""A client for the OpenAI-compatible ``POST {base_url}/chat/completions`` API (non-streaming).

One call, one answer or one :class:`ModelError`: ``chat()`` never retries, the engine does, with backoff
and the ``retry_after`` hint. Errors say whether they are ``transient`` (timeouts, connection errors, 408,
429, 5xx) or not (other 4xx, malformed or oversized responses).

The API key travels only in the ``Authorization`` header; every error message is scrubbed of it (and of
any other credential header passed in) because providers echo keys back in their error bodies.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, localcontext
from typing import Any, Literal, TypeAlias
from urllib.parse import urlsplit

import httpx

from app.retry_after import retry_after_seconds

log = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 4 * 1024 * 1024
# An error body is only mined for a message: no need to read much of it.
MAX_ERROR_BYTES = 64 * 1024
ERROR_DETAIL_CHARS = 300
# Role markers and separators a chat template adds around each message, in tokens; generous.
MESSAGE_OVERHEAD_TOKENS = 8
REQUEST_OVERHEAD_TOKENS = 16
# Headers whose values are credentials, besides the api_key argument itself.
# The request parameter that caps an answer's tokens: most OpenAI-compatible servers take `max_tokens`;
# OpenAI's reasoning models refuse it and take `max_completion_tokens`. A provider setting chooses.
MaxTokensParam: TypeAlias = Literal["max_tokens", "max_completion_tokens"]

_CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "api-key", "x-api-key"})
_BEARER = re.compile(r"(?i)\bbearer\s+\S+")


@dataclass(frozen=True)
class Price:
    """USD per 1M tokens."""

    input_per_mtok: Decimal
    output_per_mtok: Decimal

    @classmethod
    def from_mapping(cls, value: Mapping[str, Any]) -> Price:
        """From a provider's ``{"input_per_mtok": "3.00", "output_per_mtok": "15.00"}`` (strings or numbers)."""
        return cls(_decimal(value["input_per_mtok"]), _decimal(value["output_per_mtok"]))


@dataclass(frozen=True)
class ToolCallRequest:
    id: str
    name: str
    arguments: Any  # parsed JSON arguments (usually a dict); the raw string when arguments_error is set
    arguments_error: str | None  # set when the model sent arguments that are not valid JSON


@dataclass(frozen=True)
class ChatResult:
    message: dict[str, Any]  # the assistant message to append to the conversation
    content: str | None
    tool_calls: tuple[ToolCallRequest, ...]
    finish_reason: str | None
    input_tokens: int
    output_tokens: int
    usage_reported: bool  # False when the response had no usage: the tokens are then our (upper) estimate
    latency_s: float
    model: str  # the model name reported by the server, else the requested one


class ModelError(Exception):
    """A model call that did not produce an answer; ``transient`` ones are worth retrying later."""

    def __init__(
        self,
        error_class: str,
        message: str,
        *,
        transient: bool,
        retry_after: float | None = None,
        status_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.message = message
        self.transient = transient
        self.retry_after = retry_after
        self.status_code = status_code

    def __repr__(self) -> str:
        return (
            f"ModelError(error_class={self.error_class!r}, message={self.message!r}, "
            f"transient={self.transient!r}, retry_after={self.retry_after!r})"
        )

    def _scrub(self, secrets: Iterable[str]) -> None:
        self.message = mask_secrets(self.message, secrets)
        self.args = (self.message,)


# --- the call ------------------------------------------------------------------------------------------


async def chat(
    http: httpx.AsyncClient,
    *,
    base_url: str,
    api_key: str | None,
    model: str,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    max_tokens: int | None = None,
    max_tokens_param: MaxTokensParam = "max_tokens",
    response_format: dict[str, Any] | None = None,
    timeout_s: float = 60.0,
    headers: dict[str, str] | None = None,
) -> ChatResult:
    """One chat completion; raises :class:`ModelError`, never retries.

    ``max_tokens`` is sent under the name ``max_tokens_param`` (the provider's setting). ``timeout_s``
    bounds the whole exchange (connect, send, wait, read the body), not each read.
    """
    request_headers = {**(headers or {}), "Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        request_headers["Authorization"] = f"Bearer {api_key}"
    secrets = [api_key or ""] + [v for k, v in request_headers.items() if k.lower() in _CREDENTIAL_HEADERS]
    try:
        body = _request_body(model, messages, tools, max_tokens, max_tokens_param, response_format)
        url = base_url.rstrip("/") + "/chat/completions"
        started = time.monotonic()
        status, response_headers, raw = await _post(http, url, body, request_headers, timeout_s)
        latency = time.monotonic() - started
        if not 200 <= status < 300:
            raise _status_error(status, response_headers, raw)
        result = _parse(raw, model=model, messages=messages, tools=tools, max_tokens=max_tokens, latency=latency)
    except ModelError as exc:
        exc._scrub(secrets)
        raise
    log.debug(
        "model call %s: %.2fs, %d+%d tokens%s, finish=%s",
        result.model,
        result.latency_s,
        result.input_tokens,
        result.output_tokens,
        "" if result.usage_reported else " (estimated)",
        result.finish_reason,
    )
    return result


def _request_body(
    model: str,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    max_tokens: int | None,
    max_tokens_param: MaxTokensParam,
    response_format: dict[str, Any] | None,
) -> bytes:
    payload: dict[str, Any] = {"model": model, "messages": messages}
    if tools:
        payload["tools"] = tools
    if max_tokens is not None:
        payload[max_tokens_param] = max_tokens
    if response_format is not None:
        payload["response_format"] = response_format
    try:
        return json.dumps(payload, allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise ModelError("bad_request", f"request is not JSON-serialisable: {exc}", transient=False) from exc


async def _post(
    http: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str], timeout_s: float
) -> tuple[int, httpx.Headers, bytes]:
    """POST and read the body under one deadline; httpx's own timeouts restart on every chunk."""
    try:
        async with asyncio.timeout(timeout_s):
            async with http.stream(
                "POST", url, content=body, headers=headers, timeout=httpx.Timeout(timeout_s)
            ) as response:
                status = response.status_code
                if 200 <= status < 300:
                    raw = await _read_limited(response, MAX_RESPONSE_BYTES, refuse=True)
                else:
                    raw = await _read_limited(response, MAX_ERROR_BYTES, refuse=False)
                return status, response.headers, raw
    except (TimeoutError, httpx.TimeoutException) as exc:
        raise ModelError(
            "timeout", f"no complete response from {_where(url)} within {timeout_s:g}s", transient=True
        ) from exc
    except (httpx.UnsupportedProtocol, httpx.InvalidURL, httpx.LocalProtocolError) as exc:
        raise ModelError("bad_request", f"cannot send the request: {exc}", transient=False) from exc
    except httpx.DecodingError as exc:
        raise ModelError("bad_response", f"cannot decode the response: {exc}", transient=False) from exc
    except httpx.TransportError as exc:
        reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
        raise ModelError("connection", f"{_where(url)}: {reason}", transient=True) from exc


def _where(url: str) -> str:
    """Host and port only: a URL may carry credentials in its user info or query."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)


async def _read_limited(response: httpx.Response, limit: int, *, refuse: bool) -> bytes:
    """At most ``limit`` bytes of (decoded) body; past it, raise when ``refuse``, else truncate."""
    declared = response.headers.get("content-length")
    if refuse and declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks = bytearray()
    async for chunk in response.aiter_bytes():
        chunks += chunk
        if len(chunks) > limit:
            if refuse:
                raise _too_large(limit)
            return bytes(chunks[:limit])
    return bytes(chunks)


def _too_large(limit: int) -> ModelError:
    return ModelError("bad_response", f"response body is larger than {limit} bytes", transient=False)


# --- errors --------------------------------------------------------------------------------------------


def _status_error(status: int, headers: httpx.Headers, raw: bytes) -> ModelError:
    transient = status in (408, 429) or status >= 500
    detail = _error_detail(raw)
    message = f"model server returned {status}" + (f": {detail}" if detail else "")
    retry_after = retry_after_seconds(headers.get("retry-after-ms"), milliseconds=True)
    if retry_after is None:
        retry_after = retry_after_seconds(headers.get("retry-after"))
    return ModelError(
        f"http_{status}",
        message,
        transient=transient,
        retry_after=retry_after if transient else None,
        status_code=status,
    )


def _error_detail(raw: bytes) -> str:
    """``error.message`` of an OpenAI-style error body, else the start of the body, on one short line."""
    text = raw.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            text = error["message"]
        elif isinstance(error, str):
            text = error
        elif isinstance(data.get("message"), str):
            text = data["message"]
    return " ".join(text.split())[:ERROR_DETAIL_CHARS]


def mask_secrets(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret, and whatever follows a ``Bearer``, replaced by ``[redacted]``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return _BEARER.sub("Bearer [redacted]", text)


# --- the answer ----------------------------------------------------------------------------------------


def _bad(message: str) -> ModelError:
    return ModelError("bad_response", message, transient=False)


def _parse(
    raw: bytes,
    *,
    model: str,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    max_tokens: int | None,
    latency: float,
) -> ChatResult:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise _bad(f"response is not JSON ({exc}): {_error_detail(raw)[:100]}") from exc
    if not isinstance(data, dict):
        raise _bad("response is not a JSON object")
    choices = data.get("choices")
    if not choices and data.get("error") is not None:
        raise _bad(f"response carries an error and no choices: {_error_detail(raw)}")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _bad("response has no choices")
    choice = choices[0]
    reply = choice.get("message")
    if not isinstance(reply, dict):
        raise _bad("response choice has no message")
    content = _content(reply.get("content"))
    tool_calls, wire_calls = _tool_calls(reply.get("tool_calls"))
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if wire_calls:
        message["tool_calls"] = wire_calls
    finish_reason = choice.get("finish_reason")
    usage = _usage(data.get("usage"))
    if usage is not None:
        input_tokens, output_tokens = usage
    else:
        input_tokens = estimate_input_tokens(messages, tools)
        output_tokens = _json_bytes({"content": content, "tool_calls": wire_calls})
        if max_tokens is not None:
            output_tokens = min(output_tokens, max_tokens)
    reported_model = data.get("model")
    return ChatResult(
        message=message,
        content=content,
        tool_calls=tool_calls,
        finish_reason=finish_reason if isinstance(finish_reason, str) else None,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        usage_reported=usage is not None,
        latency_s=latency,
        model=reported_model if isinstance(reported_model, str) and reported_model else model,
    )


def _content(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    # Some servers answer with content parts, as in requests: keep the text.
    if isinstance(value, list):
        return "".join(part["text"] for part in value if isinstance(part, dict) and isinstance(part.get("text"), str))
    raise _bad(f"message content is a {type(value).__name__}")


def _tool_calls(value: Any) -> tuple[tuple[ToolCallRequest, ...], list[dict[str, Any]]]:
    """The parsed calls, and the calls as they go back to the server (arguments always a JSON string)."""
    if value is None:
        return (), []
    if not isinstance(value, list):
        raise _bad("message tool_calls is not a list")
    parsed: list[ToolCallRequest] = []
    wire: list[dict[str, Any]] = []
    for index, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise _bad(f"tool call {index} has no function")
        name = function.get("name")
        name = name if isinstance(name, str) else ""
        arguments, raw_arguments, error = _arguments(function.get("arguments"))
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            # Some servers (older Ollama) send no ids; tool results must name one. Derived, so replays agree.
            digest = hashlib.sha256(f"{index}\0{name}\0{raw_arguments}".encode()).hexdigest()[:16]
            call_id = f"call_{digest}"
        parsed.append(ToolCallRequest(id=call_id, name=name, arguments=arguments, arguments_error=error))
        # Rebuilt rather than copied: some servers reject extra keys (such as "index") sent back to them.
        wire.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": raw_arguments}})
    return tuple(parsed), wire


def _arguments(value: Any) -> tuple[Any, str, str | None]:
    """(parsed arguments, the JSON string to send back, error); invalid JSON keeps the raw string."""
    if value is None:
        return {}, "{}", None
    if not isinstance(value, str):
        # A few servers send the object itself rather than its JSON text.
        return value, json.dumps(value, ensure_ascii=False, separators=(",", ":")), None
    if not value.strip():
        # Models call parameterless tools with "" as often as with "{}".
        return {}, value, None
    try:
        return json.loads(value), value, None
    except ValueError as exc:
        return value, value, f"arguments are not valid JSON: {exc}"


def _usage(value: Any) -> tuple[int, int] | None:
    if not isinstance(value, dict):
        return None
    prompt = _count(value.get("prompt_tokens"))
    completion = _count(value.get("completion_tokens"))
    if prompt is None or completion is None:
        return None
    return prompt, completion


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


# --- tokens, prices, tools -----------------------------------------------------------------------------


def estimate_input_tokens(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
    """An upper bound on the prompt tokens, to reserve budget before the call.

    The UTF-8 size of the compact JSON of messages and tools: byte-level BPE tokenizers never produce
    more tokens than bytes (a plain character count would undercount emoji and rare CJK characters), and
    the JSON spells out more than the chat template renders. Plus a small overhead per message.
    """
    size = _json_bytes({"messages": messages, "tools": tools or []})
    return size + MESSAGE_OVERHEAD_TOKENS * len(messages) + REQUEST_OVERHEAD_TOKENS


def _json_bytes(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str).encode())


def cost_usd(price: Price, input_tokens: int, output_tokens: int) -> Decimal:
    """The exact cost of a call in USD (no rounding: the caller rounds for display)."""
    if input_tokens < 0 or output_tokens < 0:
        raise ValueError("token counts cannot be negative")
    with localcontext() as ctx:
        # Enough digits that nothing rounds: counts and prices have far fewer than this.
        ctx.prec = 100
        total = Decimal(input_tokens) * price.input_per_mtok + Decimal(output_tokens) * price.output_per_mtok
        return total.scaleb(-6)


def _decimal(value: Any) -> Decimal:
    if isinstance(value, Decimal):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"not a price: {value!r}")
    # str() first: Decimal(0.1) would carry the binary float's 55 digits.
    try:
        result = Decimal(str(value).strip())
    except ArithmeticError as exc:
        raise ValueError(f"not a price: {value!r}") from exc
    if not result.is_finite() or result < 0:
        raise ValueError(f"not a price: {value!r}")
    return result


def tool_spec(name: str, description: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """A tool as chat-completions ``tools`` entries describe it."""
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}
