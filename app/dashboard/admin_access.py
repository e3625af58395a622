"""Admin pages for who may act in the tenant: members with their roles, and API keys.

The same service calls (and audit events, and rules: the last admin stays, the cap on live keys) as
``/api/v1/members`` and ``/api/v1/api-keys``. A new key is shown once, on the page answering the form:
never in a URL, never in the session, never cached.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends, Request, Response
from fastapi.responses import RedirectResponse

from app.auth.deps import require
from app.auth.sessions import form_fields
from app.auth.web import templates
from app.context import Ctx
from app.dashboard.admin import checked_roles, parse
from app.dashboard.common import SignedIn, page_router
from app.db import Db
from app.http import AppSettings
from app.pagination import Cursor, keyset, page_size
from app.runtime import AppRuntime
from app.tenants import service as tenants_service
from app.tenants.policy import ROLES
from app.tenants.schemas import ApiKeyCreate, MemberAdd, MemberWrite

router = page_router()
MEMBER_PAGES = keyset("members", uuid.UUID)
KEY_PAGES = keyset("api-keys", uuid.UUID)
Reader = Annotated[Ctx, Depends(require("members:read"))]
Admin = Annotated[Ctx, Depends(require("members:write"))]


# --- members -----------------------------------------------------------------------------------------


@router.get("/admin/members")
async def members_page(
    request: Request, ctx: Reader, me: SignedIn, db: Db, settings: AppSettings, cursor: Cursor = None
) -> Response:
    """The tenant's members by user id, each with a roles form and a remove button; the add form."""
    size = page_size(None, settings)
    rows = await tenants_service.list_members(db, ctx, after=MEMBER_PAGES.after(cursor), limit=size + 1)
    members, next_cursor = MEMBER_PAGES.page(rows, size, lambda m: (m.user_id,))
    return templates.TemplateResponse(request, "dashboard/admin_members.html", {
        "me": me, "members": members, "next_cursor": next_cursor, "roles": ROLES,
    })


@router.post("/admin/members")
async def add_member(
    request: Request, ctx: Admin, db: Db, settings: AppSettings, runtime: AppRuntime
) -> Response:
    """Add a member by identity (issuer and subject), as ``POST /api/v1/members`` does."""
    form = await form_fields(request)
    body = parse(MemberAdd, {
        "subject": form.get("subject", "").strip(), "issuer": form.get("issuer", "").strip() or None,
        "email": form.get("email", "").strip() or None, "name": form.get("name", "").strip() or None,
        "roles": checked_roles(form),
    })
    await tenants_service.add_member(
        db, runtime.pg, ctx, issuer=tenants_service.member_issuer(body.issuer, settings), subject=body.subject,
        roles=body.roles, email=body.email, name=body.name,
    )
    await db.commit()
    return RedirectResponse("/admin/members", status_code=303)


@router.post("/admin/members/{user_id}")
async def set_member_roles(request: Request, user_id: uuid.UUID, ctx: Admin, db: Db) -> Response:
    """Replace a member's roles with those ticked (never the tenant's last admin's admin role)."""
    body = parse(MemberWrite, {"roles": checked_roles(await form_fields(request))})
    await tenants_service.set_member_roles(db, ctx, user_id, body.roles)
    await db.commit()
    return RedirectResponse("/admin/members", status_code=303)


@router.post("/admin/members/{user_id}/remove")
async def remove_member(user_id: uuid.UUID, ctx: Admin, db: Db) -> Response:
    """Remove a member (never the tenant's last admin)."""
    await tenants_service.remove_member(db, ctx, user_id)
    await db.commit()
    return RedirectResponse("/admin/members", status_code=303)


# --- API keys ----------------------------------------------------------------------------------------


@router.get("/admin/keys")
async def keys_page(
    request: Request, ctx: Reader, me: SignedIn, db: Db, settings: AppSettings, cursor: Cursor = None
) -> Response:
    """The tenant's API keys by id (their prefixes, never the keys), the create form, revoke buttons."""
    size = page_size(None, settings)
    rows = await tenants_service.list_api_keys(db, ctx, after=KEY_PAGES.after(cursor), limit=size + 1)
    keys, next_cursor = KEY_PAGES.page(rows, size, lambda k: (k.id,))
    return templates.TemplateResponse(request, "dashboard/admin_keys.html", {
        "me": me, "keys": keys, "next_cursor": next_cursor, "roles": ROLES,
    })


@router.post("/admin/keys")
async def create_key(request: Request, ctx: Admin, me: SignedIn, db: Db) -> Response:
    """Create a key and show it this once: the answer is the page holding it, never stored or cached."""
    form = await form_fields(request)
    days = form.get("expires_in_days", "").strip()
    body = parse(ApiKeyCreate, {
        "name": form.get("name", "").strip(), "roles": checked_roles(form), "expires_in_days": days or None,
    })
    created = await tenants_service.create_api_key(
        db, ctx.tenant_id, name=body.name, roles=body.roles, expires_at=body.expiry(), actor=ctx
    )
    await db.commit()
    return templates.TemplateResponse(
        request, "dashboard/admin_key_created.html", {"me": me, "key": created}, status_code=201,
        headers={"Cache-Control": "no-store"},
    )


@router.post("/admin/keys/{key_id}/revoke")
async def revoke_key(key_id: uuid.UUID, ctx: Admin, db: Db) -> Response:
    """Revoke a key: it stops working at once (never the tenant's last admin key)."""
    await tenants_service.revoke_api_key(db, ctx, key_id)
    await db.commit()
    return RedirectResponse("/admin/keys", status_code=303)
