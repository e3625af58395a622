"""Keyset pagination helpers shared by list endpoints: page sizes and opaque cursors."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated

from fastapi import Query

from app.config import Settings
from app.errors import Invalid

Limit = Annotated[int | None, Query(ge=1, description="Page size (default and maximum are set by the server)")]
Cursor = Annotated[str | None, Query(max_length=1024, description="`next_cursor` of the previous page")]


def page_size(limit: int | None, settings: Settings) -> int:
    return min(limit or settings.page_size_default, settings.page_size_max)


def encode_cursor(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise bad_cursor() from exc


def decode_int_cursor(cursor: str) -> int:
    value = decode_cursor(cursor)
    if not (value.isascii() and value.isdigit() and len(value) <= 10):
        raise bad_cursor()
    return int(value)


def bad_cursor() -> Invalid:
    return Invalid("invalid cursor", errors=[{"pointer": "/query/cursor", "message": "not a cursor from this API"}])
