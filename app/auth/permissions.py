"""The permission table: what each role may do. Every API route requires exactly one permission.

docs/security.md shows this table (a test keeps the two equal); tests/auth/test_permissions.py calls
every route of the OpenAPI document with every role and checks the answer against it.
"""

from __future__ import annotations

from typing import Final

from app.tenants.policy import ROLES

_READERS = frozenset(ROLES)  # every role may look

# permission -> (what it allows, the roles that hold it). `admin` holds every permission.
PERMISSIONS: Final[dict[str, tuple[str, frozenset[str]]]] = {
    "runs:read": ("List and read runs, steps, events and conversations", _READERS),
    "runs:start": ("Start runs and send them signals", frozenset({"operator", "admin"})),
    "runs:operate": ("Pause, resume, cancel and retry runs", frozenset({"operator", "admin"})),
    "workflows:read": ("List and read workflow definitions", _READERS),
    "workflows:write": ("Create workflow versions", frozenset({"author", "admin"})),
    "tools:read": ("List and read tools", _READERS),
    "tools:write": ("Register and change tools", frozenset({"author", "admin"})),
    "approvals:read": ("List and read approval requests", _READERS),
    "approvals:decide": ("Approve or reject gated actions", frozenset({"approver", "admin"})),
    "budgets:read": ("Read budgets and usage", _READERS),
    "budgets:write": ("Change the tenant's budgets and a run's limits", frozenset({"admin"})),
    "providers:read": ("List and read model providers", _READERS),
    "providers:write": ("Add, change and remove model providers", frozenset({"admin"})),
    "secrets:write": ("Store and delete secrets (values are never readable)", frozenset({"admin"})),
    "secrets:read": ("List secret names", frozenset({"author", "admin"})),
    "settings:read": ("Read the tenant's guardrail and sign-on settings", frozenset({"admin"})),
    "settings:write": ("Change the tenant's guardrail and sign-on settings", frozenset({"admin"})),
    "members:read": ("List the tenant's members and API keys", frozenset({"admin"})),
    "members:write": ("Add, change and remove members; create and revoke API keys", frozenset({"admin"})),
    "audit:read": ("Export and verify the audit log", frozenset({"auditor", "admin"})),
}


def allowed(roles: frozenset[str] | set[str], permission: str) -> bool:
    holders = PERMISSIONS[permission][1]
    return "admin" in roles or not holders.isdisjoint(roles)
