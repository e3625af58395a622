"""Workflow endpoints: create (JSON or YAML), read, list, versions."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from app.auth.deps import require
from app.context import Ctx
from app.db import INT32_MAX, Db
from app.errors import BadRequest, Invalid
from app.http import PARSED_JSON, AppSettings, JsonRoute, UnsupportedMediaType, api_responses, problem_responses
from app.input_guard import value_errors
from app.pagination import Cursor, Limit, keyset, page_size
from app.workflows import service, stats
from app.workflows.decode import check_json
from app.workflows.definition import DefinitionError, load_definition_text
from app.workflows.models import Workflow, WorkflowVersion
from app.workflows.schemas import (
    WorkflowCreate,
    WorkflowPage,
    WorkflowStats,
    WorkflowSummary,
    WorkflowVersionPage,
    WorkflowVersionRead,
    WorkflowVersionSummary,
)
from app.workflows.stats import Window

router = APIRouter(
    prefix="/api/v1/workflows", tags=["workflows"], responses=api_responses(404), route_class=JsonRoute
)
PAGES = keyset("workflows", str)
VERSION_PAGES = keyset("workflow-versions", int)

Author = Annotated[Ctx, Depends(require("workflows:write"))]
Viewer = Annotated[Ctx, Depends(require("workflows:read"))]
RunViewer = Annotated[Ctx, Depends(require("runs:read"))]

_JSON_TYPES = ("application/json",)
_YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")

_CREATE_SCHEMA = WorkflowCreate.model_json_schema(ref_template="#/components/schemas/{model}")


@router.post(
    "",
    status_code=201,
    response_model=WorkflowVersionRead,
    summary="Create a workflow, or a new version of one",
    responses={
        200: {"model": WorkflowVersionRead, "description": "Same definition as the latest version"},
        **problem_responses(409, 415),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {media: {"schema": _CREATE_SCHEMA} for media in (*_JSON_TYPES, *_YAML_TYPES[:2])},
        }
    },
)
async def create_workflow(
    request: Request, response: Response, ctx: Author, db: Db, settings: AppSettings
) -> WorkflowVersionRead:
    """Re-posting the latest version's definition returns that version (200); a change adds a version."""
    body = await _read_create_body(request)
    version, created = await service.create_workflow(
        db, ctx, name=body.name, definition=body.definition, description=body.description, settings=settings
    )
    await db.commit()
    if not created:
        response.status_code = 200
    return _version_read(body.name, version)


@router.get("", response_model=WorkflowPage, summary="List workflows by name")
async def list_workflows(
    ctx: Viewer, db: Db, settings: AppSettings, limit: Limit = None, cursor: Cursor = None
) -> WorkflowPage:
    after = PAGES.after(cursor)
    rows, more = await service.list_workflows(db, ctx, limit=page_size(limit, settings), after=after)
    return WorkflowPage(
        items=[_summary(row) for row in rows],
        next_cursor=PAGES.encode(rows[-1].name) if more and rows else None,
    )


@router.get("/{name}", response_model=WorkflowVersionRead, summary="The latest version of a workflow")
async def get_workflow(name: str, ctx: Viewer, db: Db) -> WorkflowVersionRead:
    return _version_read(name, await service.get_workflow_version(db, ctx, name, None))


@router.get("/{name}/versions", response_model=WorkflowVersionPage, summary="Versions, newest first")
async def list_workflow_versions(
    name: str, ctx: Viewer, db: Db, settings: AppSettings, limit: Limit = None, cursor: Cursor = None
) -> WorkflowVersionPage:
    before = VERSION_PAGES.after(cursor)
    rows, more = await service.list_workflow_versions(
        db, ctx, name, limit=page_size(limit, settings), before=before
    )
    return WorkflowVersionPage(
        items=[
            WorkflowVersionSummary(
                id=row.id,
                name=name,
                version=row.version,
                created_at=row.created_at,
                definition_hash=row.definition_hash,
            )
            for row in rows
        ],
        next_cursor=VERSION_PAGES.encode(rows[-1].version) if more and rows else None,
    )


@router.get("/{name}/versions/{version}", response_model=WorkflowVersionRead, summary="One version")
async def get_workflow_version(
    name: str, version: Annotated[int, Path(ge=1, le=INT32_MAX)], ctx: Viewer, db: Db
) -> WorkflowVersionRead:
    return _version_read(name, await service.get_workflow_version(db, ctx, name, version))


@router.get("/{name}/stats", response_model=WorkflowStats, summary="Reliability figures over a window")
async def workflow_stats(
    name: str, ctx: RunViewer, db: Db,
    window: Annotated[Window, Query(description="The runs created in the last 24 hours, 7 or 30 days")] = "24h",
) -> WorkflowStats:
    """Outcomes, completion and success rates, agent success rate, duration percentiles, cost per run,
    MTBF, MTTR, the health of the tools and providers the runs called, and the error budget left when
    the workflow sets an `slo`."""
    return WorkflowStats.model_validate(await stats.workflow_stats(db, ctx, name, window))


# --- helpers -------------------------------------------------------------------------------------------


async def _read_create_body(request: Request) -> WorkflowCreate:
    """The body as JSON or YAML (by Content-Type; sniffed when absent), validated as WorkflowCreate."""
    content_type = request.headers.get("content-type")
    media = (content_type or "").split(";")[0].strip().lower()
    if media and not (media in _JSON_TYPES or media.endswith("+json") or media in _YAML_TYPES):
        raise UnsupportedMediaType(
            f"unsupported Content-Type {media!r}: send application/json or application/yaml"
        )
    try:
        if PARSED_JSON in request.scope:
            # JSON the input guard parsed and checked already; the definition's own size caps still apply.
            data: Any = request.scope[PARSED_JSON]
            check_json(data)
        else:
            data = await _decode_body(request, content_type)
    except DefinitionError as exc:
        if all(err["pointer"] == "" for err in exc.errors):
            raise BadRequest(f"malformed request body: {exc.errors[0]['message']}") from exc
        errors = [{"pointer": "/body" + err["pointer"], "message": err["message"]} for err in exc.errors]
        raise Invalid("the request body is not representable as JSON", errors=errors) from exc
    try:
        return WorkflowCreate.model_validate(data)
    except ValidationError as exc:
        # Rendered by the same handler as FastAPI's own body errors: pointers under /body.
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in exc.errors(include_url=False)]
        ) from exc


async def _decode_body(request: Request, content_type: str | None) -> Any:
    """YAML (or JSON the guard left alone), held to the guard's rules for values: no NUL, no surrogates."""
    try:
        text = (await request.body()).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest("request body is not valid UTF-8") from exc
    # Off the event loop: decoding a large YAML body takes a while (parsing is capped, not free).
    data = await asyncio.to_thread(load_definition_text, text, content_type)
    errors = value_errors(data)
    if errors:
        raise Invalid("the request holds values that cannot be accepted (see errors)", errors=errors)
    return data


def _version_read(name: str, version: WorkflowVersion) -> WorkflowVersionRead:
    return WorkflowVersionRead(
        id=version.id,
        name=name,
        version=version.version,
        created_at=version.created_at,
        definition=version.definition,
        description=version.description,
    )


def _summary(row: Workflow) -> WorkflowSummary:
    return WorkflowSummary(
        name=row.name, latest_version=row.latest_version, created_at=row.created_at, updated_at=row.updated_at
    )
