"""Workflows: named, versioned definitions. A version is immutable; a changed definition is a new version."""

from __future__ import annotations

import asyncio
import copy
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import yaml
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit.service import record as audit
from app.canonical import digest
from app.config import Settings, get_settings
from app.context import Ctx
from app.errors import Invalid, NotFound
from app.pg import driver
from app.providers.service import model_names
from app.textdiff import DiffLine, line_diff
from app.tools.service import tool_names
from app.workflows.definition import DefinitionError, parse_definition, parse_stored
from app.workflows.form import RunForm, build_form
from app.workflows.models import Workflow, WorkflowVersion
from app.workflows.schemas import NAME_PATTERN
from app.workflows.steps import BUILTIN_TOOLS, Definition

_NAME = re.compile(NAME_PATTERN)


class WorkflowNotFound(NotFound):
    pass


class InvalidDefinition(Invalid):
    pass


def definition_hash(definition: Any) -> str:
    """SHA-256 of the canonical JSON (sorted keys, no whitespace): equal documents, equal hash."""
    return digest(definition)


def validate_definition(
    definition: Any,
    settings: Settings,
    known_tools: frozenset[str] = BUILTIN_TOOLS,
    known_models: dict[str, frozenset[str]] | None = None,
) -> Definition:
    """Parse ``definition`` under the configured limits; errors point at ``/definition/...``."""
    try:
        return parse_definition(
            definition,
            max_steps=settings.max_steps_per_workflow,
            max_map_items=settings.max_map_items,
            max_map_concurrency=settings.max_map_concurrency,
            known_tools=known_tools,
            known_models=known_models,
        )
    except DefinitionError as exc:
        errors = [
            {"pointer": "/definition" + err["pointer"], "message": err["message"]} for err in exc.errors
        ]
        raise InvalidDefinition("the workflow definition is invalid", errors=errors) from exc


def _checked(
    definition: Any, settings: Settings, known: frozenset[str], models: dict[str, frozenset[str]]
) -> tuple[str, Any]:
    """The definition's hash and a private copy to store, once it is valid (InvalidDefinition if not)."""
    validate_definition(definition, settings, known, models)
    # A private copy: the caller's dict (or a module constant) must not alias a stored version.
    return definition_hash(definition), copy.deepcopy(definition)


async def create_workflow(
    db: AsyncSession,
    ctx: Ctx,
    *,
    name: str,
    definition: dict[str, Any],
    description: str | None = None,
    settings: Settings | None = None,
) -> tuple[WorkflowVersion, bool]:
    """Store ``definition`` as version 1 of a new workflow or the next version of ``name``.

    Returns ``(version, created)``; re-posting the latest version's definition creates nothing and
    returns that version. Concurrent calls for one name serialise on the workflow row (created with
    INSERT ... ON CONFLICT, then locked), so versions stay 1, 2, 3... with no gaps or duplicates.
    Only valid definitions are stored.
    """
    if not _NAME.fullmatch(name):
        raise Invalid(
            f"invalid workflow name {name!r}",
            errors=[{"pointer": "/name", "message": f"must match {NAME_PATTERN}"}],
        )
    conn = await driver(db)
    known = frozenset(await tool_names(conn, ctx.tenant_id))
    models = await model_names(conn, ctx.tenant_id)
    # Linear in the definition's (capped) size, but up to ~100 ms for the largest: not on the event loop.
    digest, stored = await asyncio.to_thread(_checked, definition, settings or get_settings(), known, models)
    await db.execute(
        pg_insert(Workflow)
        .values(id=uuid.uuid4(), tenant_id=ctx.tenant_id, name=name, latest_version=0)
        .on_conflict_do_nothing(index_elements=[Workflow.tenant_id, Workflow.name])
    )
    workflow = (
        await db.execute(
            select(Workflow)
            .where(Workflow.tenant_id == ctx.tenant_id, Workflow.name == name)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    ).scalar_one()
    if workflow.latest_version > 0:
        latest = (
            await db.execute(
                select(WorkflowVersion).where(
                    WorkflowVersion.workflow_id == workflow.id,
                    WorkflowVersion.version == workflow.latest_version,
                )
            )
        ).scalar_one()
        if latest.definition_hash == digest:
            return latest, False

    version = WorkflowVersion(
        tenant_id=ctx.tenant_id,
        workflow_id=workflow.id,
        version=workflow.latest_version + 1,
        definition=stored,
        definition_hash=digest,
        description=description,
    )
    db.add(version)
    workflow.latest_version = version.version
    workflow.updated_at = func.now()
    await db.flush()
    await audit(conn, ctx.tenant_id, ctx, "workflow.create", f"workflow:{name}",
                data={"version": version.version, "definition_hash": digest})
    return version, True


async def get_workflow(db: AsyncSession, ctx: Ctx, name: str) -> Workflow:
    """The workflow called ``name`` in the caller's tenant; raises WorkflowNotFound."""
    workflow = (
        await db.execute(select(Workflow).where(Workflow.tenant_id == ctx.tenant_id, Workflow.name == name))
    ).scalar_one_or_none()
    if workflow is None:
        raise WorkflowNotFound(f"workflow {name!r} not found")
    return workflow


async def get_workflow_version(db: AsyncSession, ctx: Ctx, name: str, version: int | None) -> WorkflowVersion:
    """Version ``version`` of workflow ``name`` (the latest when None); raises WorkflowNotFound."""
    wanted = Workflow.latest_version if version is None else version
    found = (
        await db.execute(
            select(WorkflowVersion)
            .join(Workflow, Workflow.id == WorkflowVersion.workflow_id)
            .where(
                Workflow.tenant_id == ctx.tenant_id,
                WorkflowVersion.tenant_id == ctx.tenant_id,
                Workflow.name == name,
                WorkflowVersion.version == wanted,
            )
        )
    ).scalar_one_or_none()
    if found is None:
        what = f"workflow {name!r}" if version is None else f"version {version} of workflow {name!r}"
        raise WorkflowNotFound(f"{what} not found")
    return found


async def list_workflows(
    db: AsyncSession, ctx: Ctx, *, limit: int, after: str | None = None
) -> tuple[list[Workflow], bool]:
    """Up to ``limit`` workflows ordered by name, starting after ``after``; and whether more follow."""
    query = select(Workflow).where(Workflow.tenant_id == ctx.tenant_id)
    if after is not None:
        query = query.where(Workflow.name > after)
    rows = list((await db.execute(query.order_by(Workflow.name).limit(limit + 1))).scalars())
    return rows[:limit], len(rows) > limit


async def list_workflow_versions(
    db: AsyncSession, ctx: Ctx, name: str, *, limit: int, before: int | None = None
) -> tuple[list[WorkflowVersion], bool]:
    """Versions of ``name`` below ``before``, newest first, and whether more follow; WorkflowNotFound."""
    workflow = await get_workflow(db, ctx, name)
    query = select(WorkflowVersion).where(
        WorkflowVersion.tenant_id == ctx.tenant_id, WorkflowVersion.workflow_id == workflow.id
    )
    if before is not None:
        query = query.where(WorkflowVersion.version < before)
    rows = list((await db.execute(query.order_by(WorkflowVersion.version.desc()).limit(limit + 1))).scalars())
    return rows[:limit], len(rows) > limit


# --- the dashboard's views -------------------------------------------------------------------------------

# Runs are counted per version up to this many: past it the page says "10000 or more" (counting a
# million runs to print one number is not worth the scan).
RUN_COUNT_CAP = 10000
_RUN_COUNTS = (
    "SELECT v AS version, c.n FROM unnest($3::int[]) AS v, LATERAL (SELECT count(*) AS n FROM "
    "(SELECT 1 FROM run WHERE tenant_id = $1 AND workflow_name = $2 AND workflow_version = v LIMIT $4) s) c"
)
_YamlDumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def definition_yaml(definition: Any) -> str:
    """A stored definition as YAML, keys in their stored order (what an author would write)."""
    return str(yaml.dump(definition, Dumper=_YamlDumper, sort_keys=False, allow_unicode=True, width=100,
                         default_flow_style=False))


@dataclass(frozen=True)
class VersionRow:
    version: int
    created_at: datetime
    definition_hash: str
    runs: int  # up to RUN_COUNT_CAP + 1
    runs_capped: bool


@dataclass(frozen=True)
class WorkflowOverview:
    name: str
    shown: WorkflowVersion
    yaml: str
    definition: Definition  # parsed, for the step graph
    versions: list[VersionRow]  # newest first, a page of them
    more_before: int | None  # the next page: versions below this one


async def workflow_overview(
    db: AsyncSession, ctx: Ctx, name: str, version: int | None, *, limit: int, before: int | None = None
) -> WorkflowOverview:
    """One version of a workflow (the latest by default) as YAML, and a page of its versions with how many
    runs each has; WorkflowNotFound."""
    shown = await get_workflow_version(db, ctx, name, version)
    versions, more = await list_workflow_versions(db, ctx, name, limit=limit, before=before)
    counts = {
        row["version"]: row["n"]
        for row in await (await driver(db)).fetch(
            _RUN_COUNTS, ctx.tenant_id, name, [v.version for v in versions], RUN_COUNT_CAP + 1
        )
    }
    rows = [VersionRow(v.version, v.created_at, v.definition_hash, min(counts.get(v.version, 0), RUN_COUNT_CAP),
                       counts.get(v.version, 0) > RUN_COUNT_CAP) for v in versions]
    return WorkflowOverview(name, shown, definition_yaml(shown.definition), parse_stored(shown.definition), rows,
                            versions[-1].version if more and versions else None)


@dataclass(frozen=True)
class VersionDiff:
    name: str
    old: WorkflowVersion
    new: WorkflowVersion
    rows: list[DiffLine]  # [] when the definitions are the same


async def diff_versions(db: AsyncSession, ctx: Ctx, name: str, old: int, new: int) -> VersionDiff:
    """Two versions' definitions compared line by line as YAML; WorkflowNotFound for either missing."""
    before = await get_workflow_version(db, ctx, name, old)
    after = await get_workflow_version(db, ctx, name, new)
    return VersionDiff(name, before, after, line_diff(definition_yaml(before.definition),
                                                      definition_yaml(after.definition)))


async def run_form(db: AsyncSession, ctx: Ctx, name: str, version: int | None) -> RunForm:
    """The "start a run" form of a version (the latest by default), from its input_schema; WorkflowNotFound."""
    found = await get_workflow_version(db, ctx, name, version)
    form = build_form(name, found.version, found.definition.get("input_schema"))
    form.request_key = str(uuid.uuid4())
    return form


# --- examples ------------------------------------------------------------------------------------------

HELLO_DEFINITION: dict[str, Any] = {
    "input_schema": {
        "type": "object",
        "properties": {
            "names": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Who to greet",
                "default": ["Ada", "Grace"],
                "examples": [["Ada", "Grace"]],
            }
        },
        "required": ["names"],
    },
    "limits": {"max_steps": 1000, "timeout_s": 600},
    "steps": [
        {
            "id": "start",
            "description": "An echo step: its output is its args.",
            "tool": "echo",
            "args": {"message": "Greeting ${{ size(input.names) }} people"},
        },
        {
            "id": "greet",
            "description": "Fan out: one echo per name, at most 4 at a time; the output is the list.",
            "map": {
                "items": "${{ input.names }}",
                "tool": "echo",
                "args": {"greeting": "Hello, ${{ item }}!", "index": "${{ index }}"},
                "concurrency": 4,
            },
        },
        {
            "id": "summary",
            "description": "Fan in: runs once both branches have succeeded.",
            "needs": ["start", "greet"],
            "tool": "echo",
            "args": {
                "intro": "${{ steps.start.output.message }}",
                "greetings": "${{ steps.greet.output.map(g, g.greeting) }}",
                "count": "${{ size(steps.greet.output) }}",
            },
        },
    ],
}

EXAMPLE_WORKFLOWS: dict[str, dict[str, Any]] = {"hello": HELLO_DEFINITION}


async def ensure_example_workflows(db: AsyncSession, tenant_id: uuid.UUID) -> list[str]:
    """Create each example workflow the tenant lacks; returns the names it created."""
    ctx = Ctx(tenant_id=tenant_id, principal="system:examples", roles=frozenset({"admin"}))
    existing = set(
        (
            await db.execute(
                select(Workflow.name).where(
                    Workflow.tenant_id == tenant_id, Workflow.name.in_(list(EXAMPLE_WORKFLOWS))
                )
            )
        ).scalars()
    )
    created: list[str] = []
    for name, definition in EXAMPLE_WORKFLOWS.items():
        # `created` is False when a concurrent call made it first (create_workflow locks the row).
        if name not in existing and (await create_workflow(db, ctx, name=name, definition=definition))[1]:
            created.append(name)
    return created
