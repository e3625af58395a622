"""Who is asking, for which tenant: passed to every service function."""

from __future__ import annotations

import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class Ctx:
    tenant_id: uuid.UUID
    # "key:<api key id>", "user:<user id>" (signed in or OIDC bearer token) or "system".
    principal: str
    roles: frozenset[str]
    # Where the request came from, for the audit log.
    ip: str | None = None
    user_agent: str | None = None

