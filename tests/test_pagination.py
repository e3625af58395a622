"""Cursors are typed and tagged with their list: junk, edited and borrowed cursors are refused with 422."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime

import httpx
import pytest

from app.errors import Invalid
from app.pagination import keyset
from tests.support.tenants import TenantKey

LISTINGS = ["workflows", "tools", "secrets", "providers", "approvals", "members", "api-keys", "audit/events", "runs",
            "workflows/w/versions", "tools/echo/versions"]


def raw(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def test_a_cursor_round_trips_its_typed_key() -> None:
    pages = keyset("things", datetime, uuid.UUID, int, str)
    key = (datetime(2026, 1, 2, 3, 4, 5, 678, tzinfo=UTC), uuid.uuid4(), 2**63 - 1, "naïve ✓")
    assert pages.decode(pages.encode(*key)) == key
    assert pages.decode(None) is None and pages.decode("") is None


@pytest.mark.parametrize("cursor", [
    "bm90IGpzb24",  # "not json"
    raw({"things": 1}),  # not a list
    raw(["other", 1]),  # another list's
    raw(["things"]),  # too few parts
    raw(["things", 1, 2]),  # too many
    raw(["things", "1"]),  # a string where an int belongs
    raw(["things", 1.5]),
    raw(["things", True]),
    raw(["things", 2**63]),  # outside bigint
    "!!!",
])
def test_anything_but_a_cursor_of_this_list_is_refused(cursor: str) -> None:
    with pytest.raises(Invalid):
        keyset("things", int).decode(cursor)


def test_naive_times_and_bad_uuids_are_refused() -> None:
    with pytest.raises(Invalid):
        keyset("t", datetime).decode(raw(["t", "2026-01-01T00:00:00"]))
    with pytest.raises(Invalid):
        keyset("t", uuid.UUID).decode(raw(["t", "not-a-uuid"]))


@pytest.mark.parametrize("listing", LISTINGS)
async def test_every_list_refuses_junk_and_other_lists_cursors(
    client: httpx.AsyncClient, tenant: TenantKey, listing: str
) -> None:
    # A cursor of the right shape for some other list ("workflows" keys on a name) and plain junk
    # (base64 of "hello", which the old codec read as a name to page after).
    borrowed = keyset("not-" + listing.replace("/", "-"), str).encode("x")
    for cursor in (borrowed, "aGVsbG8"):
        response = await client.get(f"/api/v1/{listing}", params={"cursor": cursor}, headers=tenant.headers)
        assert response.status_code == 422, (listing, cursor, response.text)
        assert [err["pointer"] for err in response.json()["errors"]] == ["/query/cursor"]
