"""Who may act in a tenant: members (people, with roles) and API keys (service accounts). Admins only.

Roles a member holds here come on top of the roles their identity-provider groups give through the
tenant's ``role_mapping`` setting. Every change is audited; an API key is shown once, when created.
The rules (the last admin stays, the cap on live keys) are in app/tenants/service.py.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Response

from app.auth.deps import require
from app.context import Ctx
from app.db import Db
from app.http import AppSettings, JsonRoute, api_responses, problem_responses
from app.pagination import Cursor, Limit, keyset, page_size
from app.runtime import AppRuntime
from app.tenants import service as tenants_service
from app.tenants.schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyPage,
    MemberAdd,
    MemberPage,
    MemberRead,
    MemberWrite,
)

router = APIRouter(prefix="/api/v1", tags=["access"], responses=api_responses(404), route_class=JsonRoute)
MEMBER_PAGES = keyset("members", uuid.UUID)
KEY_PAGES = keyset("api-keys", uuid.UUID)

Reader = Annotated[Ctx, Depends(require("members:read"))]
Admin = Annotated[Ctx, Depends(require("members:write"))]


# --- members -----------------------------------------------------------------------------------------


@router.get("/members", response_model=MemberPage, summary="The tenant's members, by user id")
async def list_members(
    ctx: Reader, db: Db, settings: AppSettings, limit: Limit = None, cursor: Cursor = None
) -> MemberPage:
    size = page_size(limit, settings)
    rows = await tenants_service.list_members(db, ctx, after=MEMBER_PAGES.after(cursor), limit=size + 1)
    items, next_cursor = MEMBER_PAGES.page(rows, size, lambda m: (m.user_id,))
    return MemberPage(items=items, next_cursor=next_cursor)


@router.post(
    "/members",
    status_code=201,
    response_model=MemberRead,
    summary="Add a member (by identity)",
    responses=problem_responses(409),
)
async def add_member(
    body: MemberAdd, ctx: Admin, db: Db, settings: AppSettings, runtime: AppRuntime
) -> MemberRead:
    member = await tenants_service.add_member(
        db, runtime.pg, ctx, issuer=tenants_service.member_issuer(body.issuer, settings), subject=body.subject,
        roles=body.roles, email=body.email, name=body.name,
    )
    await db.commit()
    return member


@router.get("/members/{user_id}", response_model=MemberRead, summary="A member")
async def get_member(user_id: uuid.UUID, ctx: Reader, db: Db) -> MemberRead:
    return await tenants_service.get_member(db, ctx, user_id)


@router.put(
    "/members/{user_id}",
    response_model=MemberRead,
    summary="Replace a member's roles",
    responses=problem_responses(409),
)
async def put_member(user_id: uuid.UUID, body: MemberWrite, ctx: Admin, db: Db) -> MemberRead:
    member = await tenants_service.set_member_roles(db, ctx, user_id, body.roles)
    await db.commit()
    return member


@router.delete("/members/{user_id}", status_code=204, summary="Remove a member", responses=problem_responses(409))
async def delete_member(user_id: uuid.UUID, ctx: Admin, db: Db) -> Response:
    await tenants_service.remove_member(db, ctx, user_id)
    await db.commit()
    return Response(status_code=204)


# --- API keys ----------------------------------------------------------------------------------------


@router.get("/api-keys", response_model=ApiKeyPage, summary="The tenant's API keys (never the keys themselves)")
async def list_api_keys(
    ctx: Reader, db: Db, settings: AppSettings, limit: Limit = None, cursor: Cursor = None
) -> ApiKeyPage:
    size = page_size(limit, settings)
    rows = await tenants_service.list_api_keys(db, ctx, after=KEY_PAGES.after(cursor), limit=size + 1)
    items, next_cursor = KEY_PAGES.page(rows, size, lambda k: (k.id,))
    return ApiKeyPage(items=items, next_cursor=next_cursor)


@router.post(
    "/api-keys",
    status_code=201,
    response_model=ApiKeyCreated,
    summary="Create an API key",
    responses=problem_responses(409),
)
async def create_api_key(body: ApiKeyCreate, ctx: Admin, db: Db) -> ApiKeyCreated:
    created = await tenants_service.create_api_key(
        db, ctx.tenant_id, name=body.name, roles=body.roles, expires_at=body.expiry(), actor=ctx
    )
    await db.commit()
    return created


@router.delete(
    "/api-keys/{key_id}",
    status_code=204,
    summary="Revoke an API key (it stops working at once)",
    responses=problem_responses(409),
)
async def revoke_api_key(key_id: Annotated[uuid.UUID, Path()], ctx: Admin, db: Db) -> Response:
    await tenants_service.revoke_api_key(db, ctx, key_id)
    await db.commit()
    return Response(status_code=204)
