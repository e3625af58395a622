"""The dashboard: server-rendered pages for people, over the same services and permissions as the REST API.

One module per area, each with its own router of pages (``common.page_router()``); this package's
``router`` gathers them for the app.
"""

from fastapi import APIRouter

from app.dashboard import (
    admin_access,
    admin_providers,
    admin_settings,
    approvals,
    audit,
    budgets,
    run,
    run_forms,
    runs,
    tools,
    workflows,
)

router = APIRouter()
# run_forms before run: its POST routes are more specific than run's /runs/{run_id}/{action}.
for area in (runs, run_forms, run, approvals, workflows, tools, budgets, audit, admin_access, admin_settings,
             admin_providers):
    router.include_router(area.router)
