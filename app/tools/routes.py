"""Tool registry endpoints: register (versioned), read, list."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Response
from pydantic import BaseModel

from app.auth.deps import require
from app.context import Ctx
from app.db import INT32_MAX, Db
from app.http import AppSettings, JsonRoute, api_responses, problem_responses
from app.pagination import Cursor, Limit, keyset, page_size
from app.pg import driver
from app.tools import service
from app.tools.spec import TOOL_NAME, ToolSpec

router = APIRouter(prefix="/api/v1/tools", tags=["tools"], responses=api_responses(404), route_class=JsonRoute)
PAGES = keyset("tools", str)
VERSION_PAGES = keyset("tool-versions", int)

Author = Annotated[Ctx, Depends(require("tools:write"))]
Viewer = Annotated[Ctx, Depends(require("tools:read"))]
Name = Annotated[str, Path(pattern=TOOL_NAME)]


class ToolRead(BaseModel):
    name: str
    version: int
    spec: dict[str, Any]
    created_at: datetime | None
    created_by: str | None = None


class ToolPage(BaseModel):
    items: list[ToolRead]
    next_cursor: str | None


def _read(row: dict[str, Any]) -> ToolRead:
    return ToolRead(
        name=row["name"],
        version=row["version"],
        spec=row["spec"],
        created_at=row["created_at"],
        created_by=row["created_by"],
    )


@router.post(
    "",
    status_code=201,
    response_model=ToolRead,
    summary="Register a tool, or a new version of one",
    responses={
        200: {"model": ToolRead, "description": "Same definition as the latest version"},
        **problem_responses(409),
    },
)
async def register_tool(spec: ToolSpec, response: Response, ctx: Author, db: Db) -> ToolRead:
    row, created = await service.register_tool(await driver(db), ctx, spec)
    await db.commit()
    if not created:
        response.status_code = 200
    return _read(row)


@router.get("", response_model=ToolPage, summary="Registered tools (latest versions), by name")
async def list_tools(
    ctx: Viewer, db: Db, settings: AppSettings, limit: Limit = None, cursor: Cursor = None
) -> ToolPage:
    size = page_size(limit, settings)
    rows = await service.list_tools(
        await driver(db), ctx, limit=size + 1, after=PAGES.after(cursor)
    )
    items, next_cursor = PAGES.page(rows, size, lambda r: (r["name"],))
    return ToolPage(items=[_read(r) for r in items], next_cursor=next_cursor)


@router.get("/{name}", response_model=ToolRead, summary="A tool (latest version unless `version`); builtins too")
async def get_tool(
    name: Name, ctx: Viewer, db: Db, version: Annotated[int | None, Query(ge=0, le=INT32_MAX)] = None
) -> ToolRead:
    return _read(await service.get_tool(await driver(db), ctx, name, version))


@router.get("/{name}/versions", response_model=ToolPage, summary="Versions of a tool, newest first")
async def list_versions(
    name: Name, ctx: Viewer, db: Db, settings: AppSettings, limit: Limit = None, cursor: Cursor = None
) -> ToolPage:
    size = page_size(limit, settings)
    rows = await service.list_versions(
        await driver(db), ctx, name, limit=size + 1, before=VERSION_PAGES.after(cursor)
    )
    items, next_cursor = VERSION_PAGES.page(rows, size, lambda r: (r["version"],))
    return ToolPage(items=[_read(r) for r in items], next_cursor=next_cursor)
