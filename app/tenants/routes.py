"""Tenant settings: the guardrail policy (shadow mode, four-eyes, allowlisted hosts, alerts, approvals)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from app.audit.service import record as audit
from app.auth.deps import require
from app.context import Ctx
from app.db import Db
from app.http import JsonRoute, api_responses
from app.pg import driver, dumps
from app.tenants.policy import TenantPolicy, load_policy

router = APIRouter(prefix="/api/v1/settings", tags=["settings"], responses=api_responses(), route_class=JsonRoute)

Reader = Annotated[Ctx, Depends(require("settings:read"))]
Admin = Annotated[Ctx, Depends(require("settings:write"))]


@router.get("", response_model=TenantPolicy, summary="The tenant's guardrail settings")
async def get_settings(ctx: Reader, db: Db) -> TenantPolicy:
    return load_policy(await (await driver(db)).fetchval("SELECT policy FROM tenant WHERE id = $1", ctx.tenant_id))


@router.put("", response_model=TenantPolicy, summary="Replace the tenant's guardrail settings")
async def put_settings(body: TenantPolicy, ctx: Admin, db: Db) -> TenantPolicy:
    conn = await driver(db)
    stored = body.model_dump(mode="json")
    await conn.execute("UPDATE tenant SET policy = $2::jsonb WHERE id = $1", ctx.tenant_id, dumps(stored))
    await audit(conn, ctx.tenant_id, ctx, "settings.update", "settings", data=stored)
    await db.commit()
    return body
