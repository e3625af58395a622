"""The tool registry: versioned tool definitions per tenant, and their lookup by workers.

A version is immutable; registering a changed definition under an existing name adds the next
version (re-registering the latest definition creates nothing). Every change is audited.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jsonschema import Draft202012Validator

from app.audit.service import record as audit
from app.canonical import digest
from app.context import Ctx
from app.errors import Invalid, NotFound
from app.json_schema import schema_errors
from app.pagination import keyset
from app.pg import Conn, dumps
from app.tools.breaker import Breaker, BreakerPolicy, BreakerState, tool_key
from app.tools.redact import redact_spec
from app.tools.spec import BUILTIN_SPECS, SECRET_REF, STORED, BreakerSettings, ToolSpec
from app.vault.service import existing as existing_secrets
from app.workflows.document import pointer


@dataclass(frozen=True)
class ToolRef:
    """A tool as a call sees it: its name, the version that will run (0 for builtins) and its definition."""

    name: str
    version: int
    spec: ToolSpec

    @property
    def builtin(self) -> bool:
        return self.version == 0


class ToolNotFound(NotFound):
    pass


def spec_hash(spec: dict[str, Any]) -> str:
    return digest(spec)


def stored(spec: ToolSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json", exclude_none=True)


async def register_tool(conn: Conn, ctx: Ctx, spec: ToolSpec) -> tuple[dict[str, Any], bool]:
    """Store ``spec`` as the next version of its tool; returns ``(version row, created)``."""
    if spec.name in BUILTIN_SPECS:
        raise Invalid(f"{spec.name!r} is a builtin tool", errors=[{"pointer": "/name", "message": "reserved name"}])
    errors = []
    if spec.fallback is not None and spec.fallback not in BUILTIN_SPECS:
        found = await conn.fetchval(
            "SELECT 1 FROM tool WHERE tenant_id = $1 AND name = $2", ctx.tenant_id, spec.fallback
        )
        if found is None:
            errors.append({"pointer": "/fallback", "message": f"no tool named {spec.fallback!r}"})
    missing = spec.secret_names() - await existing_secrets(conn, ctx.tenant_id, spec.secret_names())
    for name in sorted(missing):
        errors.append({"pointer": "/executor/headers", "message": f"no secret named {name!r} (PUT /api/v1/secrets)"})
    if errors:
        raise Invalid("the tool definition is invalid", errors=errors)
    body = stored(spec)
    digest = spec_hash(body)
    await conn.execute(
        "INSERT INTO tool (id, tenant_id, name, latest_version) VALUES ($1, $2, $3, 0) "
        "ON CONFLICT (tenant_id, name) DO NOTHING",
        uuid.uuid4(),
        ctx.tenant_id,
        spec.name,
    )
    # The tool row's lock serialises concurrent registrations of one name: versions 1, 2, 3... no gaps.
    tool = await conn.fetchrow(
        "SELECT id, latest_version FROM tool WHERE tenant_id = $1 AND name = $2 FOR UPDATE", ctx.tenant_id, spec.name
    )
    if tool["latest_version"] > 0:
        latest = await conn.fetchrow(
            _VERSION_ROW + " WHERE v.tool_id = $1 AND v.version = $2", tool["id"], tool["latest_version"]
        )
        if latest["spec_hash"] == digest:
            return dict(latest), False
    version = tool["latest_version"] + 1
    await conn.execute(
        "INSERT INTO tool_version (id, tenant_id, tool_id, version, spec, spec_hash, created_by) "
        "VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7)",
        uuid.uuid4(),
        ctx.tenant_id,
        tool["id"],
        version,
        dumps(body),
        digest,
        ctx.principal,
    )
    await conn.execute("UPDATE tool SET latest_version = $2, updated_at = now() WHERE id = $1", tool["id"], version)
    await audit(
        conn,
        ctx.tenant_id,
        ctx,
        "tool.register",
        f"tool:{spec.name}",
        data={"version": version, "spec_hash": digest, "effect": spec.effect, "autonomy": spec.autonomy.mode},
    )
    row = await conn.fetchrow(_VERSION_ROW + " WHERE v.tool_id = $1 AND v.version = $2", tool["id"], version)
    return dict(row), True


_VERSION_ROW = (
    "SELECT t.name, v.version, v.spec, v.spec_hash, v.created_at, v.created_by "
    "FROM tool_version v JOIN tool t ON t.id = v.tool_id"
)


async def get_tool(conn: Conn, ctx: Ctx, name: str, version: int | None) -> dict[str, Any]:
    row = await conn.fetchrow(
        _VERSION_ROW + " WHERE t.tenant_id = $1 AND t.name = $2 AND v.version = coalesce($3, t.latest_version)",
        ctx.tenant_id,
        name,
        version,
    )
    if row is None:
        if name in BUILTIN_SPECS and version in (None, 0):
            return {
                "name": name,
                "version": 0,
                "spec": stored(BUILTIN_SPECS[name]),
                "spec_hash": None,
                "created_at": None,
                "created_by": None,
            }
        raise ToolNotFound(f"no tool named {name!r}" + (f" with version {version}" if version else ""))
    return dict(row)


async def list_tools(conn: Conn, ctx: Ctx, *, limit: int, after: str | None) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        _VERSION_ROW + " WHERE t.tenant_id = $1 AND v.version = t.latest_version AND ($2::text IS NULL OR t.name > $2) "
        "ORDER BY t.name LIMIT $3",
        ctx.tenant_id,
        after,
        limit,
    )
    return [dict(r) for r in rows]


async def list_versions(conn: Conn, ctx: Ctx, name: str, *, limit: int, before: int | None) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        _VERSION_ROW + " WHERE t.tenant_id = $1 AND t.name = $2 AND ($3::int IS NULL OR v.version < $3) "
        "ORDER BY v.version DESC LIMIT $4",
        ctx.tenant_id,
        name,
        before,
        limit,
    )
    if not rows and before is None:
        raise ToolNotFound(f"no tool named {name!r}")
    return [dict(r) for r in rows]


async def tool_names(conn: Conn, tenant_id: uuid.UUID) -> set[str]:
    """Every tool a workflow of this tenant may name: registered ones and the builtins."""
    rows = await conn.fetch("SELECT name FROM tool WHERE tenant_id = $1", tenant_id)
    return {r["name"] for r in rows} | set(BUILTIN_SPECS)


# --- lookups for workers -------------------------------------------------------------------------------

_specs: OrderedDict[tuple[uuid.UUID, str, int], ToolSpec] = OrderedDict()


async def resolve(conn: Conn, tenant_id: uuid.UUID, name: str, version: int | None = None) -> ToolRef | None:
    """The tool ``name`` (its latest version unless ``version``), or None when there is no such tool."""
    if name in BUILTIN_SPECS:
        # Builtin names cannot be registered: no query on the hot path of every builtin step.
        return ToolRef(name, 0, BUILTIN_SPECS[name]) if version in (None, 0) else None
    row = await conn.fetchrow(
        "SELECT v.version, v.spec FROM tool t JOIN tool_version v ON v.tool_id = t.id "
        "AND v.version = coalesce($3, t.latest_version) WHERE t.tenant_id = $1 AND t.name = $2",
        tenant_id,
        name,
        version,
    )
    if row is None:
        return None
    key = (tenant_id, name, row[0])
    spec = _specs.get(key)
    if spec is None:
        # Versions are immutable: parse each once per process.
        spec = _specs[key] = ToolSpec.model_validate(row[1], context=STORED)
        if len(_specs) > 1024:
            _specs.popitem(last=False)
    return ToolRef(name, row[0], spec)


# --- argument and output checks ---------------------------------------------------------------------

# Keyed by the schema object's identity (parsed specs are cached and immutable), holding the schema
# itself so that an id is never reused by another object while its entry lives.
_validators: OrderedDict[int, tuple[dict[str, Any], Draft202012Validator]] = OrderedDict()


def _validator(schema: dict[str, Any]) -> Draft202012Validator:
    entry = _validators.get(id(schema))
    if entry is not None and entry[0] is schema:
        _validators.move_to_end(id(schema))
        return entry[1]
    validator = Draft202012Validator(schema)
    _validators[id(schema)] = (schema, validator)
    if len(_validators) > 2048:
        _validators.popitem(last=False)
    return validator


def validate_args(ref: ToolRef, args: Any) -> list[dict[str, str]]:
    errors = schema_errors(_validator(ref.spec.input_schema), args)
    return sorted(({"pointer": pointer(tuple(e.absolute_path)), "message": e.message} for e in errors),
                  key=lambda e: (e["pointer"], e["message"]))


def validate_output(ref: ToolRef, output: Any) -> list[dict[str, str]]:
    if ref.spec.output_schema is None:
        return []
    errors = schema_errors(_validator(ref.spec.output_schema), output)
    return [{"pointer": pointer(tuple(e.absolute_path)), "message": e.message} for e in errors]


async def versions_using_secret(conn: Conn, tenant_id: uuid.UUID, secret: str) -> list[tuple[str, int]]:
    """The tool versions (name, version) whose HTTP headers refer to the secret ``secret``.

    Every version counts, not only the latest: a step may run the version it was approved or started with.
    """
    rows = await conn.fetch(
        "SELECT t.name, v.version, v.spec -> 'executor' -> 'headers' AS headers FROM tool_version v "
        "JOIN tool t ON t.id = v.tool_id WHERE v.tenant_id = $1 "
        "AND strpos((v.spec -> 'executor' -> 'headers')::text, 'secrets.' || $2) > 0 ORDER BY t.name, v.version",
        tenant_id,
        secret,
    )
    return [
        (r["name"], r["version"])
        for r in rows
        if any(secret in SECRET_REF.findall(value) for value in (r["headers"] or {}).values() if isinstance(value, str))
    ]


# --- the registry as the dashboard shows it -----------------------------------------------------------


@dataclass(frozen=True)
class ToolStatus:
    """One version of a tool for people: its definition (secrets redacted), the guardrails it carries,
    and its circuit breaker now (None: Redis is not answering)."""

    name: str
    version: int  # 0 for builtins
    spec: dict[str, Any]
    created_at: datetime | None
    created_by: str | None
    breaker: BreakerState | None

    @property
    def builtin(self) -> bool:
        return self.version == 0

    @property
    def effect(self) -> str:
        return str(self.spec.get("effect", ""))

    @property
    def autonomy(self) -> dict[str, Any]:
        found = self.spec.get("autonomy")
        return found if isinstance(found, dict) else {"mode": "auto"}

    @property
    def required_roles(self) -> list[str]:
        return list(self.spec.get("required_roles") or [])

    @property
    def fallback(self) -> str | None:
        found = self.spec.get("fallback")
        return str(found) if found else None


@dataclass(frozen=True)
class ToolRegistry:
    tools: list[ToolStatus]  # registered tools, latest versions, by name
    builtins: list[ToolStatus]  # on the first page only
    next_cursor: str | None


@dataclass(frozen=True)
class ToolDetail:
    shown: ToolStatus
    latest_version: int
    versions: list[dict[str, Any]]  # newest first: name, version, spec_hash, created_at, created_by
    next_cursor: str | None


REGISTRY_PAGES = keyset("tools", str)
VERSION_PAGES = keyset("tool-versions", int)


def _policy(spec: dict[str, Any]) -> BreakerPolicy:
    return BreakerPolicy(**BreakerSettings.model_validate(spec.get("breaker") or {}).model_dump())


async def _with_breakers(ctx: Ctx, breaker: Breaker, rows: list[dict[str, Any]]) -> list[ToolStatus]:
    states = await breaker.read([(tool_key(ctx.tenant_id, r["name"]), _policy(r["spec"])) for r in rows])
    return [
        ToolStatus(r["name"], r["version"], redact_spec(r["spec"]), r["created_at"], r["created_by"],
                   states[i] if states is not None else None)
        for i, r in enumerate(rows)
    ]


def _builtin_row(name: str) -> dict[str, Any]:
    return {"name": name, "version": 0, "spec": stored(BUILTIN_SPECS[name]), "created_at": None, "created_by": None}


async def tool_registry(conn: Conn, ctx: Ctx, breaker: Breaker, *, limit: int, cursor: str | None) -> ToolRegistry:
    """A keyset page of the tenant's tools (latest versions) with their breakers; the builtins on the first."""
    rows = await list_tools(conn, ctx, limit=limit + 1, after=REGISTRY_PAGES.after(cursor))
    page, next_cursor = REGISTRY_PAGES.page(rows, limit, lambda r: (r["name"],))
    builtins = [_builtin_row(name) for name in sorted(BUILTIN_SPECS)] if cursor is None else []
    statuses = await _with_breakers(ctx, breaker, [*page, *builtins])
    return ToolRegistry(statuses[:len(page)], statuses[len(page):], next_cursor)


async def tool_detail(conn: Conn, ctx: Ctx, breaker: Breaker, name: str, version: int | None, *, limit: int,
                      cursor: str | None) -> ToolDetail:
    """One version of a tool (the latest by default, redacted), its breaker, and a keyset page of its versions."""
    shown = await get_tool(conn, ctx, name, version)
    latest = shown if version is None else await get_tool(conn, ctx, name, None)
    versions: list[dict[str, Any]] = []
    next_cursor = None
    if shown["version"] != 0:
        rows = await list_versions(conn, ctx, name, limit=limit + 1, before=VERSION_PAGES.after(cursor))
        versions, next_cursor = VERSION_PAGES.page(rows, limit, lambda r: (r["version"],))
    # The breaker follows the latest version's settings: that is what calls resolve to.
    states = await breaker.read([(tool_key(ctx.tenant_id, name), _policy(latest["spec"]))])
    status = ToolStatus(shown["name"], shown["version"], redact_spec(shown["spec"]), shown["created_at"],
                        shown["created_by"], states[0] if states else None)
    return ToolDetail(status, latest["version"],
                      [{k: v for k, v in r.items() if k != "spec"} for r in versions], next_cursor)



async def tool_status(conn: Conn, ctx: Ctx, breaker: Breaker, name: str) -> ToolStatus:
    """A tool's latest version (redacted) with its breaker now: what its page refreshes."""
    latest = await get_tool(conn, ctx, name, None)
    states = await breaker.read([(tool_key(ctx.tenant_id, name), _policy(latest["spec"]))])
    return ToolStatus(latest["name"], latest["version"], redact_spec(latest["spec"]), latest["created_at"],
                      latest["created_by"], states[0] if states else None)
