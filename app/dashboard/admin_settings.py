"""The tenant settings page: the guardrail policy (``/api/v1/settings``) as a form that round-trips it.

Lists become text areas (one host per line; one ``group: role, role`` per line for the role mapping) and
the form is checked by :class:`TenantPolicy` itself: a refused form comes back as typed, each error next
to its field, and nothing is saved.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.responses import RedirectResponse
from pydantic import ValidationError

from app.auth.deps import require
from app.auth.sessions import form_fields
from app.auth.web import templates
from app.context import Ctx
from app.dashboard.admin import field_errors
from app.dashboard.common import SignedIn, page_router
from app.db import Db
from app.tenants import service as tenants_service
from app.tenants.policy import ROLES, TenantPolicy

router = page_router()
Reader = Annotated[Ctx, Depends(require("settings:read"))]
Admin = Annotated[Ctx, Depends(require("settings:write"))]
FIELDS = ("shadow", "four_eyes", "http_allowlist", "alert_webhook", "approval_timeout_s", "approval_on_expiry",
          "role_mapping")


@router.get("/admin/settings")
async def settings_page(request: Request, ctx: Reader, me: SignedIn, db: Db) -> Response:
    """The tenant's guardrail settings as a form."""
    policy = await tenants_service.get_policy(db, ctx)
    return _form(request, me, _shown(policy), {})


@router.post("/admin/settings")
async def save_settings(request: Request, ctx: Admin, me: SignedIn, db: Db) -> Response:
    """Replace the settings (``PUT /api/v1/settings``); a refused form comes back with its errors."""
    form = await form_fields(request)
    shown: dict[str, Any] = {field: form.get(field, "") for field in FIELDS}
    mapping, mapping_error = _role_mapping(shown["role_mapping"])
    try:
        policy = TenantPolicy.model_validate({
            "shadow": bool(form.get("shadow")), "four_eyes": bool(form.get("four_eyes")),
            "http_allowlist": [line.strip() for line in shown["http_allowlist"].splitlines() if line.strip()],
            "alert_webhook": shown["alert_webhook"].strip() or None,
            "approval_timeout_s": shown["approval_timeout_s"].strip(),
            "approval_on_expiry": shown["approval_on_expiry"], "role_mapping": mapping,
        })
        errors = {"role_mapping": mapping_error} if mapping_error else {}
    except ValidationError as exc:
        errors = field_errors(exc) | ({"role_mapping": mapping_error} if mapping_error else {})
    if errors:
        shown |= {"shadow": bool(form.get("shadow")), "four_eyes": bool(form.get("four_eyes"))}
        return _form(request, me, shown, errors, status=422)
    await tenants_service.put_policy(db, ctx, policy)
    await db.commit()
    return RedirectResponse("/admin/settings?saved=1", status_code=303)


def _form(request: Request, me: Any, shown: dict[str, Any], errors: dict[str, str], status: int = 200) -> Response:
    return templates.TemplateResponse(request, "dashboard/admin_settings.html", {
        "me": me, "shown": shown, "errors": errors, "roles": ROLES, "saved": request.query_params.get("saved"),
    }, status_code=status)


def _shown(policy: TenantPolicy) -> dict[str, Any]:
    """The policy as the form's fields hold it."""
    return {
        "shadow": policy.shadow, "four_eyes": policy.four_eyes, "http_allowlist": "\n".join(policy.http_allowlist),
        "alert_webhook": str(policy.alert_webhook) if policy.alert_webhook else "",
        "approval_timeout_s": f"{policy.approval_timeout_s:g}", "approval_on_expiry": policy.approval_on_expiry,
        "role_mapping": "\n".join(f"{group}: {', '.join(roles)}" for group, roles in policy.role_mapping.items()),
    }


def _role_mapping(text: str) -> tuple[dict[str, list[str]], str | None]:
    """``group: role, role`` lines as a mapping (the group is all before the last ``:``), or why not."""
    mapping: dict[str, list[str]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        group, colon, roles = line.rpartition(":")
        if not colon or not group.strip():
            return {}, f"line {number}: write `group: role, role`"
        mapping[group.strip()] = [role.strip() for role in roles.split(",") if role.strip()]
    return mapping, None
