"""Budget endpoints: the tenant's caps and run limits, usage, and raising one run's limits."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field, PlainSerializer

from app.audit.service import record as audit
from app.auth.deps import require
from app.budgets.service import (
    DEFAULT_LIMITS,
    USD_DIGITS,
    USD_PLACES,
    effective_limits,
    tenant_budget,
    usd_text,
    windows,
)
from app.context import Ctx
from app.db import Db
from app.errors import NotFound
from app.http import JsonRoute, api_responses, problem_responses
from app.pg import driver, dumps
from app.runs.schemas import RunLimits

router = APIRouter(prefix="/api/v1", tags=["budgets"], responses=api_responses(404), route_class=JsonRoute)

Viewer = Annotated[Ctx, Depends(require("budgets:read"))]
Admin = Annotated[Ctx, Depends(require("budgets:write"))]


# What the column holds (refused past it, never rounded), read back as written.
Usd = Annotated[
    Decimal,
    Field(ge=0, max_digits=USD_DIGITS, decimal_places=USD_PLACES),
    PlainSerializer(usd_text, return_type=str, when_used="json"),
]


class BudgetSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hourly_usd: Usd | None = Field(default=None, description="Cap on the tenant's spend per clock hour (UTC)")
    daily_usd: Usd | None = Field(default=None, description="Cap on the tenant's spend per day (UTC)")
    on_exhausted: Literal["pause", "fail"] = Field(
        default="pause", description="What a run does when a limit or cap is hit: pause (resume later) or fail"
    )
    run_defaults: RunLimits = Field(
        default_factory=RunLimits, description=f"Defaults for runs (built in: {DEFAULT_LIMITS})"
    )
    run_maximums: RunLimits = Field(default_factory=RunLimits, description="What workflows and runs may ask for")


class Usage(BaseModel):
    hour: dict[str, Any]
    day: dict[str, Any]
    run: dict[str, Any] | None = Field(
        default=None, description="With ?run=: its limits and usage; tool_calls counts what max_steps limits "
        "(agents' model turns and the tool calls they chose; not tool steps or map items)",
    )


@router.get("/budgets", response_model=BudgetSettings, summary="The tenant's caps and run limits")
async def get_budget(ctx: Viewer, db: Db) -> BudgetSettings:
    row = await tenant_budget(await driver(db), ctx.tenant_id)
    if row is None:
        return BudgetSettings()
    return BudgetSettings(
        hourly_usd=row["hourly_usd"],
        daily_usd=row["daily_usd"],
        on_exhausted=row["on_exhausted"],
        run_defaults=RunLimits(**row["run_defaults"]),
        run_maximums=RunLimits(**row["run_maximums"]),
    )


@router.put(
    "/budgets",
    response_model=BudgetSettings,
    summary="Set the tenant's caps and run limits",
    responses=problem_responses(409),
)
async def put_budget(body: BudgetSettings, ctx: Admin, db: Db) -> BudgetSettings:
    conn = await driver(db)
    await conn.execute(
        "INSERT INTO budget (tenant_id, hourly_usd, daily_usd, on_exhausted, run_defaults, run_maximums, updated_by) "
        "VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb, $7) ON CONFLICT (tenant_id) DO UPDATE SET "
        "hourly_usd = excluded.hourly_usd, daily_usd = excluded.daily_usd, on_exhausted = excluded.on_exhausted, "
        "run_defaults = excluded.run_defaults, run_maximums = excluded.run_maximums, updated_at = now(), "
        "updated_by = excluded.updated_by",
        ctx.tenant_id,
        body.hourly_usd,
        body.daily_usd,
        body.on_exhausted,
        dumps(body.run_defaults.given()),
        dumps(body.run_maximums.given()),
        ctx.principal,
    )
    await audit(conn, ctx.tenant_id, ctx, "budget.update", "budget", data=body.model_dump(mode="json"))
    await db.commit()
    return body


@router.get("/budgets/usage", response_model=Usage, summary="Spend in the current hour and day; one run's usage")
async def get_usage(
    ctx: Viewer,
    db: Db,
    workflow: Annotated[str | None, Query(max_length=128, description="only this workflow's runs")] = None,
    run: Annotated[uuid.UUID | None, Query(description="also this run's usage and limits")] = None,
) -> Usage:
    conn = await driver(db)
    hour, day = windows(datetime.now(UTC))
    result: dict[str, Any] = {}
    for period, start in (("hour", hour), ("day", day)):
        if workflow is None:
            row = await conn.fetchrow(
                "SELECT spent_usd, reserved_usd FROM budget_window WHERE tenant_id = $1 AND period = $2 AND start = $3",
                ctx.tenant_id,
                period,
                start,
            )
        else:
            row = await conn.fetchrow(
                f"SELECT coalesce(sum(r.actual_usd) FILTER (WHERE r.status = 'settled'), 0) AS spent_usd, "
                f"coalesce(sum(r.amount_usd) FILTER (WHERE r.status = 'held'), 0) AS reserved_usd "
                f"FROM budget_reservation r JOIN run_usage u ON u.run_id = r.run_id "
                f"WHERE r.tenant_id = $1 AND r.{period}_start = $2 AND u.workflow_name = $3",
                ctx.tenant_id,
                start,
                workflow,
            )
        result[period] = {
            "start": start,
            "spent_usd": usd_text(row["spent_usd"]) if row else "0",
            "reserved_usd": usd_text(row["reserved_usd"]) if row else "0",
        }
    if run is not None:
        row = await conn.fetchrow(
            "SELECT limits, tool_calls, tokens, reserved_tokens, cost_usd, reserved_usd FROM run_usage "
            "WHERE run_id = $1 AND tenant_id = $2",
            run,
            ctx.tenant_id,
        )
        if row is None:
            raise NotFound(f"run {run} not found")
        result["run"] = {
            **dict(row), "cost_usd": usd_text(row["cost_usd"]), "reserved_usd": usd_text(row["reserved_usd"])
        }
    return Usage(**result)


@router.put(
    "/runs/{run_id}/limits",
    summary="Change one run's limits (then resume it if it was paused)",
    responses=problem_responses(409),
)
async def put_run_limits(run_id: uuid.UUID, body: RunLimits, ctx: Admin, db: Db) -> dict[str, Any]:
    conn = await driver(db)
    current = await conn.fetchval(
        "SELECT limits FROM run_usage WHERE run_id = $1 AND tenant_id = $2 FOR UPDATE", run_id, ctx.tenant_id
    )
    if current is None:
        raise NotFound(f"run {run_id} not found")
    limits = effective_limits(await tenant_budget(conn, ctx.tenant_id), current, body.given())
    await conn.execute("UPDATE run_usage SET limits = $2::jsonb WHERE run_id = $1", run_id, dumps(limits))
    await audit(conn, ctx.tenant_id, ctx, "run.limits", f"run:{run_id}", data={"from": current, "to": limits})
    await db.commit()
    return {"run_id": str(run_id), "limits": limits}
