"""Keyset pagination helpers shared by list endpoints: page sizes and opaque cursors."""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Callable, Sequence
from typing import Annotated, TypeVar

from fastapi import Query

from app.config import Settings
from app.db import INT32_MAX
from app.errors import Invalid

# Bounded like any integer the API takes, though larger sizes are cut to the server's maximum anyway.
Limit = Annotated[
    int | None, Query(ge=1, le=INT32_MAX, description="Page size (default and maximum are set by the server)")
]
Cursor = Annotated[str | None, Query(max_length=1024, description="`next_cursor` of the previous page")]


T = TypeVar("T")


def page(rows: Sequence[T], size: int, key: Callable[[T], str]) -> tuple[list[T], str | None]:
    """Split ``rows`` (fetched with ``LIMIT size + 1``) into the page and the cursor of the next one."""
    items = list(rows[:size])
    return items, encode_cursor(key(items[-1])) if len(rows) > size and items else None


def page_size(limit: int | None, settings: Settings) -> int:
    return min(limit or settings.page_size_default, settings.page_size_max)


def encode_cursor(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The value inside a cursor; one holding NUL (base64 hides it from the input guard) is no cursor of ours."""
    try:
        value = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise bad_cursor() from exc
    if "\x00" in value:
        raise bad_cursor()
    return value


def decode_int_cursor(cursor: str) -> int:
    value = decode_cursor(cursor)
    if not (value.isascii() and value.isdigit() and len(value) <= 10):
        raise bad_cursor()
    return int(value)


def decode_uuid_cursor(cursor: str) -> uuid.UUID:
    try:
        return uuid.UUID(decode_cursor(cursor))
    except ValueError as exc:
        raise bad_cursor() from exc


def bad_cursor() -> Invalid:
    return Invalid("invalid cursor", errors=[{"pointer": "/query/cursor", "message": "not a cursor from this API"}])
