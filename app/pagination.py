"""Keyset pagination shared by list endpoints: page sizes and opaque, typed cursors.

A cursor is the key of the last item of a page, tagged with the list it belongs to:
``base64url(JSON [list, key...])``. Decoding checks the tag, the number of parts and each part's type,
so a cursor of another list, an edited cursor or junk is refused with 422 (``/query/cursor``) rather
than quietly read as some position in the list.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, TypeVar

from fastapi import Query

from app.config import Settings
from app.db import INT32_MAX, INT64_MAX, INT64_MIN
from app.errors import Invalid

# Bounded like any integer the API takes, though larger sizes are cut to the server's maximum anyway.
Limit = Annotated[
    int | None, Query(ge=1, le=INT32_MAX, description="Page size (default and maximum are set by the server)")
]
Cursor = Annotated[str | None, Query(max_length=1024, description="`next_cursor` of the previous page")]

T = TypeVar("T")
KeyPart = str | int | uuid.UUID | datetime


def page_size(limit: int | None, settings: Settings) -> int:
    return min(limit or settings.page_size_default, settings.page_size_max)


def bad_cursor() -> Invalid:
    return Invalid("invalid cursor", errors=[{"pointer": "/query/cursor", "message": "not a cursor from this list"}])


def _dump(part: KeyPart) -> str | int:
    if isinstance(part, datetime):
        return part.isoformat()
    if isinstance(part, uuid.UUID):
        return str(part)
    return part


def _load(kind: type, value: Any) -> KeyPart:
    if kind is str and isinstance(value, str) and "\x00" not in value:
        return value
    if kind is int and type(value) is int and INT64_MIN <= value <= INT64_MAX:
        return value
    if kind is uuid.UUID and isinstance(value, str):
        return uuid.UUID(value)
    if kind is datetime and isinstance(value, str):
        at = datetime.fromisoformat(value)
        if at.tzinfo is not None:
            return at
    raise ValueError(f"not a {kind.__name__}")


@dataclass(frozen=True)
class Keyset:
    """The cursors of one list: its name and the types of the key it is ordered by."""

    name: str
    types: tuple[type, ...]

    def encode(self, *key: KeyPart) -> str:
        body = json.dumps([self.name, *map(_dump, key)], separators=(",", ":"), ensure_ascii=False)
        return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")

    def decode(self, cursor: str | None) -> tuple[Any, ...] | None:
        """The key inside ``cursor`` (``None`` for no cursor: the first page); 422 for anything else."""
        if not cursor:
            return None
        try:
            body = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
            if not (isinstance(body, list) and len(body) == len(self.types) + 1 and body[0] == self.name):
                raise ValueError("another list's cursor")
            return tuple(_load(kind, value) for kind, value in zip(self.types, body[1:], strict=True))
        except (binascii.Error, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise bad_cursor() from exc

    def after(self, cursor: str | None) -> Any:
        """The one-part key inside ``cursor``, or ``None``."""
        key = self.decode(cursor)
        return key[0] if key else None

    def page(self, rows: Sequence[T], size: int, key: Callable[[T], tuple[KeyPart, ...]]) -> tuple[list[T], str | None]:
        """Split ``rows`` (fetched with ``LIMIT size + 1``) into the page and the cursor of the next one."""
        items = list(rows[:size])
        return items, self.encode(*key(items[-1])) if len(rows) > size and items else None


def keyset(name: str, *types: type) -> Keyset:
    return Keyset(name, types)
