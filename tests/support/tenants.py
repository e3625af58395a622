"""Tenants and API keys as the tests hold them (made by the ``make_tenant`` / ``make_api_key`` fixtures)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class TenantKey:
    tenant_id: uuid.UUID
    key: str
    headers: dict[str, str]  # {"Authorization": "Bearer <key>"}
    name: str


# ``await make_tenant(name=None, roles=("admin",))``
MakeTenant = Callable[..., Awaitable[TenantKey]]
# ``await make_api_key(tenant_id, roles=("admin",), expires_at=None, revoked_at=None)`` -> the key
MakeApiKey = Callable[..., Awaitable[str]]
