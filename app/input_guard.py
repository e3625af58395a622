"""The input guard: one place every request passes, refusing values no column or JSON document can hold.

PostgreSQL refuses NUL (U+0000) in ``text`` and ``jsonb``, and lone surrogates (U+D800..U+DFFF) are not
Unicode at all, so either would fail deep inside a handler (a 500) or, worse, be stored where it breaks
every later use. Duplicate keys in a JSON object silently keep the last one; NaN, Infinity and numbers
that overflow a double are not JSON; integers past 64 bits fit no integer column. All of these are
refused here with 422 problem+json, ``errors: [{"pointer", "message"}]`` pointing at each offender:
``/path/<name>``, ``/query/<name>``, ``/header/<name>``, ``/body/...`` (JSON bodies and form fields).

A JSON body is parsed once, strictly, and the parsed value is left in the scope under
:data:`PARSED_JSON` for the route (app.http.JsonRoute) so FastAPI does not parse it again. A body that
does not parse is passed on untouched: the route answers its usual 400. Column-specific bounds (an
``integer`` version, a ``numeric(18,8)`` amount) belong to the request schemas, not here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import parse_qsl

from fastapi import routing as fastapi_routing
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.db import INT64_MAX, INT64_MIN
from app.http import PARSED_JSON, json_pointer, problem_response

# The key itself is never echoed (it may hold what the guard refuses): the pointer names it.
DUPLICATE_KEY = "duplicate key: each key may appear once in an object"

# Enough to show what is wrong without a response as large as the request.
MAX_ERRORS = 20
MAX_FORM_FIELDS = 1000

_BAD_CHAR = re.compile("[\x00\ud800-\udfff]")
# The escapes a JSON document must contain for a string or key in it to hold NUL or a surrogate.
_SUSPECT_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")
_FORM_TYPES = ("application/x-www-form-urlencoded",)


class _Refused:
    """Stands in for a number the strict decoder will not turn into a Python value."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


class _Duplicated(dict[str, Any]):
    """An object that named some keys more than once (the last value kept, as json does)."""

    duplicates: list[str]


def object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A ``json.loads`` object hook that keeps track of repeated keys: see :func:`duplicate_keys`."""
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    seen: set[str] = set()
    repeated: set[str] = set()
    for key, _ in pairs:
        (repeated if key in seen else seen).add(key)
    duplicated = _Duplicated(obj)
    duplicated.duplicates = sorted(repeated)
    return duplicated


def duplicate_keys(obj: Any) -> list[str]:
    """The keys an object made by :func:`object_pairs` had more than once."""
    return obj.duplicates if isinstance(obj, _Duplicated) else []


def char_problem(text: str) -> str | None:
    """Why ``text`` cannot be accepted (NUL, lone surrogate), or None."""
    found = _BAD_CHAR.search(text)
    if found is None:
        return None
    if found.group() == "\x00":
        return "contains a NUL character (U+0000), which cannot be stored"
    return "contains a lone surrogate (U+D800 to U+DFFF), which is not valid Unicode"


def value_errors(value: Any, base: tuple[str | int, ...] = ("body",)) -> list[dict[str, str]]:
    """Every NUL, lone surrogate, duplicate key, non-finite number or integer beyond 64 bits in ``value``
    (decoded JSON or YAML), as ``{"pointer", "message"}`` under ``base``; at most :data:`MAX_ERRORS`."""
    errors: list[dict[str, str]] = []
    for path, message in _walk(value, base):
        errors.append({"pointer": json_pointer(path), "message": message})
        if len(errors) >= MAX_ERRORS:
            break
    return sorted(errors, key=lambda err: err["pointer"])


def _walk(value: Any, base: tuple[str | int, ...]) -> Iterator[tuple[tuple[str | int, ...], str]]:
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, base)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if (problem := char_problem(item)) is not None:
                yield path, problem
        elif isinstance(item, _Refused):
            yield path, item.message
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, int):
            if not INT64_MIN <= item <= INT64_MAX:
                yield path, "integer out of range: must fit in 64 bits"
        elif isinstance(item, float):
            if item != item or item in (float("inf"), float("-inf")):
                yield path, "NaN and Infinity are not JSON numbers"
        elif isinstance(item, dict):
            for key in duplicate_keys(item):
                yield (*path, key), DUPLICATE_KEY
            for key, child in item.items():
                if isinstance(key, str) and (problem := char_problem(key)) is not None:
                    yield (*path, key), "key " + problem
                stack.append((child, (*path, key)))
        elif isinstance(item, list):
            stack.extend((child, (*path, index)) for index, child in enumerate(item))


def _needs_walk(text: str) -> bool:
    """Whether a string in the document may hold NUL or a surrogate; cheap, as most bodies are not."""
    if "\\u" in text and _SUSPECT_ESCAPE.search(text) is not None:
        return True
    if text.isascii():
        return False
    try:  # raw surrogates (json decodes bytes with "surrogatepass") do not encode; a raw NUL is no JSON
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class _StrictDecoder:
    """json.loads with hooks that mark what it must refuse; ``suspect`` says a walk is needed."""

    def __init__(self) -> None:
        self.suspect = False

    def loads(self, text: str) -> Any:
        self.suspect = _needs_walk(text)
        return json.loads(
            text,
            object_pairs_hook=self._object,
            parse_int=self._int,
            parse_float=self._float,
            parse_constant=self._constant,
        )

    def _object(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = object_pairs(pairs)
        if isinstance(obj, _Duplicated):
            self.suspect = True
        return obj

    def _int(self, text: str) -> int | _Refused:
        if len(text) <= 18:  # any 18 digits fit
            return int(text)
        # Checked by length first: int() of a huge digit string is slow (and refused past 4300 digits).
        if len(text) <= 20:
            number = int(text)
            if INT64_MIN <= number <= INT64_MAX:
                return number
        self.suspect = True
        return _Refused("integer out of range: must fit in 64 bits")

    def _float(self, text: str) -> float | _Refused:
        number = float(text)
        if number - number == 0:  # finite
            return number
        self.suspect = True
        return _Refused("number out of range: too large for a double")

    def _constant(self, text: str) -> _Refused:
        self.suspect = True
        return _Refused(f"{text} is not a JSON number")


def check_json(raw: bytes) -> tuple[Any, list[dict[str, str]]] | None:
    """``(value, errors)`` for a JSON body; None when it is not JSON at all (the route's 400 says so)."""
    try:
        text = raw.decode(json.detect_encoding(raw), "surrogatepass")
        decoder = _StrictDecoder()
        value = decoder.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return value, value_errors(value) if decoder.suspect else []


def form_errors(raw: bytes) -> list[dict[str, str]]:
    """NUL in the fields of a form post (decoded as the sign-in pages decode them)."""
    try:
        fields = parse_qsl(raw.decode("utf-8", errors="replace"), keep_blank_values=True,
                           max_num_fields=MAX_FORM_FIELDS)
    except ValueError:
        return []
    return _pairs_errors(fields, "body")


def _pairs_errors(pairs: list[tuple[str, str]], where: str) -> list[dict[str, str]]:
    errors = []
    for name, value in pairs:
        problem = char_problem(name) or char_problem(value)
        if problem is not None:
            errors.append({"pointer": json_pointer((where, name)), "message": problem})
    return errors[:MAX_ERRORS]


def request_line_errors(scope: Scope) -> list[dict[str, str]]:
    """NUL and surrogates in the path, the query string and the headers."""
    errors: list[dict[str, str]] = []
    path: str = scope.get("path", "")
    if (problem := char_problem(path)) is not None:
        errors.extend({"pointer": pointer, "message": problem} for pointer in _path_pointers(scope))
    query = scope.get("query_string", b"").decode("latin-1")
    if query:
        # As Starlette reads it: percent-decoded as UTF-8, bad bytes replaced.
        errors.extend(_pairs_errors(parse_qsl(query, keep_blank_values=True), "query"))
    for name, value in scope.get("headers", ()):
        if b"\x00" in value or b"\x00" in name:
            errors.append({"pointer": json_pointer(("header", name.decode("latin-1"))),
                           "message": "contains a NUL character (U+0000), which cannot be stored"})
    return errors[:MAX_ERRORS]


def _path_pointers(scope: Scope) -> list[str]:
    """``/path/<parameter>`` for each bad parameter of the first route template the path fits; else ``/path``.

    Only reached for a refused path, so the templates are compiled on the spot.
    """
    path: str = scope.get("path", "")
    for route in _flat_routes(getattr(scope.get("app"), "routes", ())):
        template = getattr(route, "path", None)
        if not isinstance(template, str) or "{" not in template:
            continue
        match = compile_path(template)[0].match(path)
        if match is None:
            continue
        bad = [name for name, value in match.groupdict().items() if char_problem(value)]
        if bad:
            return [json_pointer(("path", name)) for name in bad]
    return ["/path"]


def _flat_routes(routes: Sequence[Any]) -> Iterator[Any]:
    # FastAPI 0.16x keeps included routers as such; iter_route_contexts gives their routes with full paths.
    flatten = getattr(fastapi_routing, "iter_route_contexts", None)
    yield from flatten(routes) if flatten is not None else routes


def _media_type(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            media: str = value.decode("latin-1")
            return media.split(";")[0].strip().lower()
    return ""


def _is_json(media: str) -> bool:
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class InputGuardMiddleware:
    """Refuses requests holding values no handler should see (see the module docstring) with 422.

    Sits inside BodySizeLimitMiddleware: the body it buffers is already capped, and a body over the cap
    raises there while this reads it. JSON and form bodies are read whole, checked, then replayed to the
    app as one message; other bodies (YAML, uploads) stream through untouched.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        errors = request_line_errors(scope)
        if errors:
            await _refuse(scope, receive, send, errors)
            return
        media = _media_type(scope)
        if not (_is_json(media) or media in _FORM_TYPES):
            await self.app(scope, receive, send)
            return
        messages, raw, complete = await _buffer(receive)
        if complete and raw:
            if media in _FORM_TYPES:
                errors = form_errors(raw)
            elif (checked := check_json(raw)) is not None:
                value, errors = checked
                if not errors:
                    scope[PARSED_JSON] = value
        if errors:
            await _refuse(scope, receive, send, errors)
            return
        await self.app(scope, _replay(messages, raw, complete, receive), send)


async def _buffer(receive: Receive) -> tuple[list[Message], bytes, bool]:
    """Every message up to the end of the body (or a disconnect), the body, and whether it ended."""
    messages: list[Message] = []
    chunks: list[bytes] = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, b"".join(chunks), False
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return messages, b"".join(chunks), True


def _replay(messages: list[Message], raw: bytes, complete: bool, receive: Receive) -> Receive:
    """The buffered body as one message (or the messages as they came, when the client went away),
    then the real channel (which reports the disconnect)."""
    pending = [{"type": "http.request", "body": raw, "more_body": False}] if complete else list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


async def _refuse(scope: Scope, receive: Receive, send: Send, errors: list[dict[str, str]]) -> None:
    response = problem_response(
        422,
        "invalid",
        "Invalid request",
        "the request holds values that cannot be accepted (see errors)",
        instance=_BAD_CHAR.sub("\ufffd", scope.get("path", "")),
        errors=errors,
    )
    await response(scope, receive, send)

