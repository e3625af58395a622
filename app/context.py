"""Who is asking, for which tenant: passed to every service function."""

from __future__ import annotations

import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class Ctx:
    tenant_id: uuid.UUID
    principal: str
    roles: frozenset[str]

    def has(self, role: str) -> bool:
        return "admin" in self.roles or role in self.roles
