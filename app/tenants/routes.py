"""Tenant settings: the guardrail policy (shadow mode, four-eyes, allowlisted hosts, alerts, approvals)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from app.auth.deps import require
from app.context import Ctx
from app.db import Db
from app.http import JsonRoute, api_responses
from app.tenants import service as tenants_service
from app.tenants.policy import TenantPolicy

router = APIRouter(prefix="/api/v1/settings", tags=["settings"], responses=api_responses(), route_class=JsonRoute)

Reader = Annotated[Ctx, Depends(require("settings:read"))]
Admin = Annotated[Ctx, Depends(require("settings:write"))]


@router.get("", response_model=TenantPolicy, summary="The tenant's guardrail settings")
async def get_settings(ctx: Reader, db: Db) -> TenantPolicy:
    return await tenants_service.get_policy(db, ctx)


@router.put("", response_model=TenantPolicy, summary="Replace the tenant's guardrail settings")
async def put_settings(body: TenantPolicy, ctx: Admin, db: Db) -> TenantPolicy:
    policy = await tenants_service.put_policy(db, ctx, body)
    await db.commit()
    return policy
