"""Secrets: written and deleted through the API, read in clear only by workers calling tools and models."""

from __future__ import annotations

import re
import uuid
from typing import Any

from app.audit.service import record as audit
from app.context import Ctx
from app.errors import Conflict, NotFound
from app.pg import Conn
from app.vault.crypto import Vault

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
MAX_VALUE_CHARS = 16_384
# Secrets are sent as HTTP header values (tool headers, model API keys), where RFC 9110 allows no control
# character but tab: a value with CR, LF or NUL would be stored, then break every call that uses it.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def value_problem(value: str) -> str | None:
    """Why ``value`` cannot be a secret (it must fit in an HTTP header value), or None."""
    found = _CONTROL.search(value)
    if found is None:
        return None
    names = {"\x00": "NUL", "\r": "CR", "\n": "LF"}
    char = found.group()
    name = names.get(char, f"U+{ord(char):04X}")
    return f"must not contain control characters ({name}): secrets go into HTTP headers"


_UPSERT = (
    "INSERT INTO secret (tenant_id, name, ciphertext, updated_by) VALUES ($1, $2, $3, $4) "
    "ON CONFLICT (tenant_id, name) DO UPDATE SET ciphertext = excluded.ciphertext, updated_at = now(), "
    "updated_by = excluded.updated_by RETURNING (xmax = 0) AS created, created_at, updated_at"
)


async def put_secret(conn: Conn, vault: Vault, ctx: Ctx, name: str, value: str) -> dict[str, Any]:
    row = await conn.fetchrow(_UPSERT, ctx.tenant_id, name, vault.seal(ctx.tenant_id, name, value), ctx.principal)
    await audit(conn, ctx.tenant_id, ctx, "secret.put", f"secret:{name}", data={"created": row["created"]})
    return {"name": name, "created": row["created"], "created_at": row["created_at"], "updated_at": row["updated_at"]}


async def list_secrets(conn: Conn, ctx: Ctx, *, limit: int, after: str | None) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT name, created_at, updated_at, updated_by FROM secret WHERE tenant_id = $1 AND ($2::text IS NULL "
        "OR name > $2) ORDER BY name LIMIT $3",
        ctx.tenant_id,
        after,
        limit,
    )
    return [dict(r) for r in rows]


class SecretInUse(Conflict):
    type = "secret-in-use"


async def delete_secret(conn: Conn, ctx: Ctx, name: str, *, force: bool = False) -> None:
    """Delete a secret; SecretInUse (naming its users) while a provider or a tool version refers to it,
    unless ``force``.

    The secret's row is locked before its users are looked for, and :func:`existing` share-locks the
    secrets a new provider or tool version names: a definition committed meanwhile is seen, or finds the
    secret gone.
    """
    found = await conn.fetchval(
        "SELECT name FROM secret WHERE tenant_id = $1 AND name = $2 FOR UPDATE", ctx.tenant_id, name
    )
    if found is None:
        raise NotFound(f"no secret named {name!r}")
    users = await secret_users(conn, ctx.tenant_id, name)
    if users and not force:
        raise SecretInUse(
            f"secret {name!r} is used by {_describe(users)}: point them at another secret first, "
            "or delete with ?force=true (their calls then fail)",
            used_by=users,
        )
    await conn.execute("DELETE FROM secret WHERE tenant_id = $1 AND name = $2", ctx.tenant_id, name)
    await audit(conn, ctx.tenant_id, ctx, "secret.delete", f"secret:{name}",
                data={"forced": True, "used_by": users} if users else None)


async def secret_users(conn: Conn, tenant_id: uuid.UUID, name: str) -> list[dict[str, Any]]:
    """The providers and tool versions that refer to the secret ``name``, by name (and version)."""
    # The provider and tool services import this module (to check the secrets a definition names).
    from app.providers import service as providers_service
    from app.tools import service as tools_service

    providers = await providers_service.providers_using_secret(conn, tenant_id, name)
    tools = await tools_service.versions_using_secret(conn, tenant_id, name)
    return [{"kind": "provider", "name": p} for p in providers] + [
        {"kind": "tool", "name": tool, "version": version} for tool, version in tools
    ]


def _describe(users: list[dict[str, Any]]) -> str:
    return ", ".join(
        f"{u['kind']} {u['name']!r}" + (f" version {u['version']}" if "version" in u else "") for u in users
    )


async def existing(conn: Conn, tenant_id: uuid.UUID, names: set[str]) -> set[str]:
    """Those of ``names`` that exist, share-locked until commit (see :func:`delete_secret`)."""
    rows = await conn.fetch(
        "SELECT name FROM secret WHERE tenant_id = $1 AND name = ANY($2::text[]) FOR SHARE", tenant_id, sorted(names)
    )
    return {r["name"] for r in rows}


async def open_secrets(conn: Conn, vault: Vault, tenant_id: uuid.UUID, names: set[str]) -> dict[str, str]:
    """The clear values of ``names`` (those that exist); for workers only, never for a response."""
    if not names:
        return {}
    rows = await conn.fetch(
        "SELECT name, ciphertext FROM secret WHERE tenant_id = $1 AND name = ANY($2::text[])", tenant_id, sorted(names)
    )
    return {r["name"]: vault.open(tenant_id, r["name"], r["ciphertext"]) for r in rows}
