"""Budget endpoints: the tenant's caps and run limits, usage, and raising one run's limits."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from app.auth.deps import require
from app.budgets import service as budgets_service
from app.budgets.schemas import BudgetSettings, Usage
from app.context import Ctx
from app.db import Db
from app.http import JsonRoute, api_responses, problem_responses
from app.runs.schemas import RunLimits

router = APIRouter(prefix="/api/v1", tags=["budgets"], responses=api_responses(404), route_class=JsonRoute)

Viewer = Annotated[Ctx, Depends(require("budgets:read"))]
Admin = Annotated[Ctx, Depends(require("budgets:write"))]


@router.get("/budgets", response_model=BudgetSettings, summary="The tenant's caps and run limits")
async def get_budget(ctx: Viewer, db: Db) -> BudgetSettings:
    return BudgetSettings.from_row(await budgets_service.get_budget(db, ctx))


@router.put(
    "/budgets",
    response_model=BudgetSettings,
    summary="Set the tenant's caps and run limits",
    responses=problem_responses(409),
)
async def put_budget(body: BudgetSettings, ctx: Admin, db: Db) -> BudgetSettings:
    budget = await budgets_service.put_budget(db, ctx, body)
    await db.commit()
    return budget


@router.get("/budgets/usage", response_model=Usage, summary="Spend in the current hour and day; one run's usage")
async def get_usage(
    ctx: Viewer,
    db: Db,
    workflow: Annotated[str | None, Query(max_length=128, description="only this workflow's runs")] = None,
    run: Annotated[uuid.UUID | None, Query(description="also this run's usage and limits")] = None,
) -> Usage:
    return Usage(**await budgets_service.usage(db, ctx, workflow=workflow, run=run))


@router.put(
    "/runs/{run_id}/limits",
    summary="Change one run's limits (then resume it if it was paused)",
    responses=problem_responses(409),
)
async def put_run_limits(run_id: uuid.UUID, body: RunLimits, ctx: Admin, db: Db) -> dict[str, Any]:
    limits = await budgets_service.set_run_limits(db, ctx, run_id, body.given())
    await db.commit()
    return {"run_id": str(run_id), "limits": limits}
