"""The workflows pages: the tenant's workflows; one version as YAML beside its versions and their runs; a
diff of any two versions; and the "start a run" form generated from a version's input schema."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Query, Request, Response
from fastapi.responses import RedirectResponse

from app.auth.deps import require
from app.auth.permissions import allowed
from app.auth.sessions import form_fields
from app.auth.web import templates
from app.context import Ctx
from app.dashboard.common import SignedIn, page_router
from app.dashboard.graph import layout
from app.db import INT32_MAX, Db
from app.errors import Invalid
from app.http import AppSettings
from app.pagination import Cursor, keyset, page_size
from app.request_work import Work
from app.runs import service as runs_service
from app.workflows import service as workflows_service

router = page_router()
START = "runs:start"
WorkflowViewer = Annotated[Ctx, Depends(require("workflows:read"))]
Starter = Annotated[Ctx, Depends(require(START))]
WorkflowName = Annotated[str, Path(max_length=200)]
VersionNumber = Annotated[int | None, Query(ge=1, le=INT32_MAX)]
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
    request: Request, name: WorkflowName, ctx: WorkflowViewer, me: SignedIn, db: Db, settings: AppSettings,
    version: VersionNumber = None, cursor: Cursor = None,
) -> Response:
    """One version of a workflow (the latest by default) as YAML; its versions with their runs, a page at a
    time; a form to compare two versions."""
    overview = await workflows_service.workflow_overview(
        db, ctx, name, version, limit=page_size(None, settings), before=VERSION_PAGES.after(cursor)
    )
    return templates.TemplateResponse(request, "dashboard/workflow.html", {
        "me": me, "name": name, "overview": overview, "shown": overview.shown, "may_start": allowed(ctx.roles, START),
        "next_cursor": VERSION_PAGES.encode(overview.more_before) if overview.more_before else None,
        "run_count_cap": workflows_service.RUN_COUNT_CAP, "graph": layout(overview.definition),
    })


@router.get("/workflows/{name}/diff")
async def workflow_diff(
    request: Request, name: WorkflowName, ctx: WorkflowViewer, me: SignedIn, db: Db,
    from_: Annotated[int | None, Query(alias="from", ge=1, le=INT32_MAX)] = None,
    to: VersionNumber = None,
) -> Response:
    """Two versions' definitions, line by line as YAML (``?from=1&to=3``)."""
    if from_ is None or to is None:
        raise Invalid("say which versions to compare", errors=[
            {"pointer": f"/query/{key}", "message": "required"} for key, v in (("from", from_), ("to", to)) if v is None
        ])
    diff = await workflows_service.diff_versions(db, ctx, name, from_, to)
    return templates.TemplateResponse(request, "dashboard/workflow_diff.html", {"me": me, "diff": diff})


@router.get("/workflows/{name}/start")
async def start_form(
    request: Request, name: WorkflowName, ctx: Starter, me: SignedIn, db: Db, version: VersionNumber = None,
) -> Response:
    """The form to start a run of a version (the latest by default), generated from its input schema."""
    form = await workflows_service.run_form(db, ctx, name, version)
    return templates.TemplateResponse(request, "dashboard/start_run.html", {"me": me, "form": form})


@router.post("/workflows/{name}/start")
async def start_from_form(
    request: Request, name: WorkflowName, ctx: Starter, me: SignedIn, work: Work, db: Db, settings: AppSettings,
    version: VersionNumber = None,
) -> Response:
    """Start the run (the same service call and audit event as ``POST /api/v1/runs``) and go to its page; or
    show the form again, each error next to its field (422)."""
    started = await runs_service.start_run_from_form(db, work, ctx, settings, name, version,
                                                     await form_fields(request))
    if started.run_id is None:
        return templates.TemplateResponse(request, "dashboard/start_run.html", {"me": me, "form": started.form},
                                          status_code=422)
    return RedirectResponse(f"/runs/{started.run_id}", status_code=303)
