"""HTTP plumbing shared by every route: problem+json error handlers, the request body size limit, the
statuses every API route documents, and the route class that takes the JSON body app.input_guard parsed.

Every error leaves the API as ``application/problem+json`` (RFC 9457) with a stable ``type``; validation
errors carry ``errors: [{"pointer", "message"}]`` with JSON pointers into the request (``/body/...``,
``/query/...``). Internal errors are logged with their traceback and answered with a generic detail.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Coroutine, Mapping, Sequence
from http import HTTPStatus
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from sqlalchemy.exc import IntegrityError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings
from app.errors import PROBLEM_BASE, AppError

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
# Scope key under which app.input_guard leaves a JSON body it parsed (and found acceptable).
PARSED_JSON = "steward.parsed_json"
_UNPRINTABLE = re.compile("[\x00\ud800-\udfff]")

# Stable problem types for statuses that Starlette raises itself (unknown route, wrong method, ...).
_STATUS_TYPES = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    406: "not-acceptable",
    409: "conflict",
    413: "payload-too-large",
    415: "unsupported-media-type",
    422: "invalid",
    429: "too-many-requests",
    503: "unavailable",
}


class Problem(BaseModel):
    """The body of every error response (RFC 9457); for OpenAPI only."""

    type: str = Field(description="Stable URL naming the kind of problem")
    title: str
    status: int
    detail: str
    instance: str | None = None
    # Flat (no nested model) so the schema has no $defs to break when inlined into OpenAPI.
    errors: list[dict[str, str]] | None = Field(
        default=None,
        description='Validation errors: [{"pointer": "/body/...", "message": "..."}]',
    )


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries documenting problem+json bodies for ``statuses``."""
    return {
        status: {
            "description": _phrase(status),
            "content": {PROBLEM_JSON: {"schema": Problem.model_json_schema()}},
        }
        for status in statuses
    }


def api_responses(*extra: int) -> dict[int | str, dict[str, Any]]:
    """``responses`` for an authenticated API route: what any of them may answer, plus ``extra``.

    400 a malformed body or Content-Length, 401 no or bad credentials, 403 a missing permission, 413 a
    body over the limit, 422 a value the input guard or the schema refuses, 429 the rate limit, 503 the
    database or Redis unreachable.
    """
    return problem_responses(*sorted({400, 401, 403, 413, 422, 429, 503, *extra}))


class JsonRoute(APIRoute):
    """An APIRoute whose request hands FastAPI the body the input guard already parsed (no second parse)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def parsed_once(request: Request) -> Response:
            return await handler(_ParsedJsonRequest(request.scope, request.receive))

        return parsed_once


class _ParsedJsonRequest(Request):
    async def json(self) -> Any:
        if PARSED_JSON in self.scope:
            return self.scope[PARSED_JSON]
        return await super().json()


class UnsupportedMediaType(AppError):
    status = 415
    type = "unsupported-media-type"
    title = "Unsupported media type"


class BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive`` once a streamed body passes the limit; FastAPI lets HTTPExceptions through."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than {limit} bytes")


def problem_response(
    status: int,
    type: str,
    title: str,
    detail: str,
    *,
    headers: Mapping[str, str] | None = None,
    instance: str | None = None,
    **extra: Any,
) -> JSONResponse:
    """A problem+json response; ``type`` is a slug (prefixed with the problem base URL) or a full URL."""
    body: dict[str, Any] = {
        "type": type if "://" in type else PROBLEM_BASE + type,
        "title": title,
        "status": status,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    body.update(extra)
    return JSONResponse(body, status_code=status, headers=dict(headers or {}), media_type=PROBLEM_JSON)


def json_pointer(parts: Sequence[str | int]) -> str:
    """RFC 6901 pointer for a location such as pydantic's ``loc`` (``("body", "steps", 0)``).

    NUL and lone surrogates in keys become U+FFFD: the pointer is echoed in a response, which must encode.
    """
    text = "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in parts)
    return _UNPRINTABLE.sub("\ufffd", text)


def validation_errors(errors: Sequence[Any]) -> list[dict[str, str]]:
    """Pydantic/FastAPI error dicts as ``[{"pointer", "message"}]``; inputs are never echoed back."""
    return [
        {"pointer": json_pointer(err.get("loc", ())), "message": str(err.get("msg", ""))} for err in errors
    ]


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def _app_settings(request: Request) -> Settings:
    # A coroutine: FastAPI calls a plain ``def`` dependency through its thread pool, a hand-off to a
    # thread and back on every request.
    return get_app_settings(request)


AppSettings = Annotated[Settings, Depends(_app_settings)]


# --- handlers ------------------------------------------------------------------------------------------


async def app_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AppError)
    if exc.status >= 500:
        log.error("%s %s failed: %s", request.method, request.url.path, exc.detail, exc_info=exc)
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status == 401:
        # RFC 9110: a 401 must say how to authenticate.
        headers.setdefault("WWW-Authenticate", "Bearer")
    return JSONResponse(
        exc.to_problem(instance=request.url.path),
        status_code=exc.status,
        headers=headers,
        media_type=PROBLEM_JSON,
    )


async def validation_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    malformed = [err for err in errors if err.get("type") == "json_invalid"]
    if malformed:
        err = malformed[0]
        reason = (err.get("ctx") or {}).get("error", "malformed JSON")
        position = err.get("loc", ("body", "?"))[-1]
        return problem_response(
            400,
            "bad-request",
            "Malformed request body",
            f"request body is not valid JSON: {reason} (at character {position})",
            instance=request.url.path,
        )
    return problem_response(
        422,
        "invalid",
        "Invalid request",
        "the request does not match the expected shape",
        instance=request.url.path,
        errors=validation_errors(errors),
    )


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    phrase = _phrase(status)
    detail = exc.detail if isinstance(exc.detail, str) else phrase
    if status == 404 and detail == phrase:
        detail = f"nothing at {request.url.path}"
    elif status == 405 and detail == phrase:
        detail = f"method {request.method} is not allowed on {request.url.path}"
    problem_type = _STATUS_TYPES.get(status) or phrase.lower().replace(" ", "-")
    return problem_response(
        status, problem_type, phrase, detail, headers=exc.headers, instance=request.url.path
    )


async def integrity_error_handler(request: Request, exc: Exception) -> Response:
    # Details of the constraint stay in the log: they name tables and columns.
    log.warning("%s %s: integrity error: %s", request.method, request.url.path, getattr(exc, "orig", exc))
    return problem_response(
        409,
        "conflict",
        "Conflict",
        "the request conflicts with the current state of a resource",
        instance=request.url.path,
    )


async def unhandled_error_handler(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return problem_response(
        500,
        "internal",
        "Internal error",
        "an unexpected error occurred; it has been logged",
        instance=request.url.path,
    )


class InternalErrorMiddleware:
    """Turns an exception no handler took into the 500 problem, inside the other middleware.

    Starlette answers those from its outermost layer, past every middleware added to the app, so the
    answer would miss the security headers (and the metrics); caught here, it goes out through them.
    An exception after the response started can only end the connection: it is re-raised.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            if started:
                raise
            response = await unhandled_error_handler(Request(scope), exc)
            await response(scope, receive, send)


def register_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, app_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_exception_handler)
    app.add_exception_handler(IntegrityError, integrity_error_handler)
    app.add_exception_handler(Exception, unhandled_error_handler)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


# --- body size limit -----------------------------------------------------------------------------------


class BodySizeLimitMiddleware:
    """Reject request bodies over ``max_body_bytes`` with 413.

    A declared Content-Length is checked before the app runs; chunked (or lying) bodies are counted as
    they stream, and the first chunk past the limit raises :class:`BodyTooLarge` inside the app. Should
    the app swallow that and answer something else, its response is replaced by the 413.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared = _content_length(scope)
        if declared == -1:
            await _problem(scope, receive, send, 400, "bad-request", "Bad request", "invalid Content-Length")
            return
        if declared is not None and declared > limit:
            await self._reject(scope, receive, send)
            return

        received = 0
        exceeded = False
        started = False
        suppressed = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise BodyTooLarge(limit)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started, suppressed
            if message["type"] == "http.response.start":
                if exceeded and message["status"] != 413:
                    suppressed = True
                    return
                started = True
            if not suppressed:
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            if started:
                raise
            suppressed = True
        if suppressed and not started:
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"request body is larger than {self.max_body_bytes} bytes"
        # The unread body is left behind: Connection: close stops the server reusing the connection.
        await _problem(
            scope,
            receive,
            send,
            413,
            "payload-too-large",
            "Payload too large",
            detail,
            headers={"Connection": "close"},
        )


def _content_length(scope: Scope) -> int | None:
    """The declared Content-Length; None when absent, -1 when unparseable."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return -1
            return length if length >= 0 else -1
    return None


async def _problem(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    type: str,
    title: str,
    detail: str,
    headers: Mapping[str, str] | None = None,
) -> None:
    response = problem_response(status, type, title, detail, headers=headers, instance=scope.get("path"))
    await response(scope, receive, send)
