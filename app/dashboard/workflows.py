"""The workflows pages: the tenant's workflows, and one version's definition beside the others."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Query, Request, Response

from app.auth.deps import require
from app.auth.web import templates
from app.context import Ctx
from app.dashboard.common import SignedIn, page_router
from app.db import INT32_MAX, Db
from app.http import AppSettings
from app.pagination import Cursor, keyset, page_size
from app.workflows import service as workflows_service

router = page_router()
WorkflowViewer = Annotated[Ctx, Depends(require("workflows:read"))]
WORKFLOW_PAGES = keyset("workflows", str)
VERSION_PAGES = keyset("workflow-versions", int)


@router.get("/workflows")
async def workflows_page(
    request: Request, ctx: WorkflowViewer, me: SignedIn, db: Db, settings: AppSettings, cursor: Cursor = None,
) -> Response:
    """The tenant's workflows by name, with their latest version."""
    rows, more = await workflows_service.list_workflows(
        db, ctx, limit=page_size(None, settings), after=WORKFLOW_PAGES.after(cursor)
    )
    next_cursor = WORKFLOW_PAGES.encode(rows[-1].name) if more and rows else None
    return templates.TemplateResponse(request, "dashboard/workflows.html", {
        "me": me, "workflows": rows, "next_cursor": next_cursor,
    })


@router.get("/workflows/{name}")
async def workflow_page(
    request: Request,
    name: Annotated[str, Path(max_length=200)],
    ctx: WorkflowViewer,
    me: SignedIn,
    db: Db,
    settings: AppSettings,
    version: Annotated[int | None, Query(ge=1, le=INT32_MAX)] = None,
) -> Response:
    """One version of a workflow (the latest by default): its definition, and the other versions."""
    shown = await workflows_service.get_workflow_version(db, ctx, name, version)
    versions, _ = await workflows_service.list_workflow_versions(db, ctx, name, limit=page_size(None, settings))
    return templates.TemplateResponse(request, "dashboard/workflow.html", {
        "me": me, "name": name, "shown": shown, "versions": versions,
    })
