"""Admin pages for what model calls need: providers with their models' prices, and the secrets holding keys.

The same service calls (and audit events) as ``/api/v1/providers`` and ``/api/v1/secrets``. A secret's
value goes one way: typed into a password field, sealed by the vault, never shown again, not even to the
admin who wrote it (the list shows names and times only).
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from fastapi import Depends, Path, Request, Response
from fastapi.responses import RedirectResponse
from pydantic import ValidationError

from app.auth.deps import require
from app.auth.sessions import form_fields
from app.auth.web import templates
from app.context import Ctx
from app.dashboard.admin import field_errors, parse
from app.dashboard.common import SignedIn, page_router
from app.db import Db
from app.errors import Invalid
from app.http import AppSettings
from app.pagination import Cursor, keyset, page_size
from app.pg import driver
from app.providers import service as providers_service
from app.providers.service import MAX_MODELS, ProviderWrite
from app.runtime import AppRuntime
from app.vault import service as vault_service
from app.vault.routes import SecretWrite

router = page_router()
PROVIDER_PAGES = keyset("providers", str)
SECRET_PAGES = keyset("secrets", str)
ProviderViewer = Annotated[Ctx, Depends(require("providers:read"))]
ProviderAdmin = Annotated[Ctx, Depends(require("providers:write"))]
SecretReader = Annotated[Ctx, Depends(require("secrets:read"))]
SecretAdmin = Annotated[Ctx, Depends(require("secrets:write"))]
ProviderName = Annotated[str, Path(pattern=f"^{providers_service.NAME.pattern}$")]
SecretName = Annotated[str, Path(pattern=f"^{vault_service.NAME.pattern}$")]
FIELDS = ("name", "base_url", "api_key_secret", "max_tokens_param", "models")


# --- providers ---------------------------------------------------------------------------------------


@router.get("/admin/providers")
async def providers_page(
    request: Request, ctx: ProviderViewer, me: SignedIn, db: Db, settings: AppSettings, cursor: Cursor = None
) -> Response:
    """Model providers by name with their models and prices; the add form for those who may."""
    size = page_size(None, settings)
    rows = await providers_service.list_providers(
        await driver(db), ctx, limit=size + 1, after=PROVIDER_PAGES.after(cursor)
    )
    providers, next_cursor = PROVIDER_PAGES.page(rows, size, lambda r: (r["name"],))
    return templates.TemplateResponse(request, "dashboard/admin_providers.html", {
        "me": me, "providers": providers, "next_cursor": next_cursor, "shown": _shown(None), "errors": {},
    })


@router.get("/admin/providers/{provider}")
async def provider_page(
    request: Request, provider: ProviderName, ctx: ProviderViewer, me: SignedIn, db: Db
) -> Response:
    """One provider, as a form for those who may change it."""
    row = await providers_service.get_provider(await driver(db), ctx, provider)
    return _form(request, me, _shown(row), {}, editing=True)


@router.post("/admin/providers")
async def add_provider(request: Request, ctx: ProviderAdmin, me: SignedIn, db: Db) -> Response:
    """Create (or replace) the provider the form names (``PUT /api/v1/providers/{name}``)."""
    form = await form_fields(request)
    return await _put(request, ctx, me, db, form.get("name", "").strip(), form, editing=False)


@router.post("/admin/providers/{provider}")
async def edit_provider(
    request: Request, provider: ProviderName, ctx: ProviderAdmin, me: SignedIn, db: Db
) -> Response:
    """Replace the provider's definition; a refused form comes back with its errors."""
    return await _put(request, ctx, me, db, provider, await form_fields(request), editing=True)


@router.post("/admin/providers/{provider}/delete")
async def delete_provider(provider: ProviderName, ctx: ProviderAdmin, db: Db) -> Response:
    await providers_service.delete_provider(await driver(db), ctx, provider)
    await db.commit()
    return RedirectResponse("/admin/providers", status_code=303)


async def _put(request: Request, ctx: Ctx, me: Any, db: Db, name: str, form: dict[str, str], *,
               editing: bool) -> Response:
    shown = {field: form.get(field, "") for field in FIELDS} | {"name": name}
    models, models_error = _models(shown["models"])
    errors = {"models": models_error} if models_error else {}
    try:
        body = ProviderWrite.model_validate({
            "base_url": shown["base_url"].strip(), "api_key_secret": shown["api_key_secret"].strip() or None,
            "max_tokens_param": shown["max_tokens_param"] or "max_tokens", "models": models,
        })
    except ValidationError as exc:
        errors = field_errors(exc) | errors
    if not errors:
        try:
            await providers_service.put_provider(await driver(db), ctx, name, body)
        except Invalid as exc:  # the name, or a secret that does not exist
            errors = {(e.get("pointer") or "/").rsplit("/", 1)[-1]: e["message"] for e in exc.errors or []}
            errors = errors or {"": exc.detail}
    if errors:
        return _form(request, me, shown, errors, editing=editing, status=422)
    await db.commit()
    return RedirectResponse(f"/admin/providers/{name}", status_code=303)


def _form(request: Request, me: Any, shown: dict[str, str], errors: dict[str, str], *, editing: bool,
          status: int = 200) -> Response:
    return templates.TemplateResponse(request, "dashboard/admin_provider.html", {
        "me": me, "shown": shown, "errors": errors, "editing": editing,
    }, status_code=status)


def _shown(row: dict[str, Any] | None) -> dict[str, str]:
    """A provider as the form's fields hold it (models: one ``model input output`` line each)."""
    if row is None:
        return {"name": "", "base_url": "", "api_key_secret": "", "max_tokens_param": "max_tokens", "models": ""}
    lines = [f"{model} {price['input_per_mtok']} {price['output_per_mtok']}" for model, price in row["models"].items()]
    return {"name": row["name"], "base_url": row["base_url"], "api_key_secret": row["api_key_secret"] or "",
            "max_tokens_param": row["max_tokens_param"], "models": "\n".join(lines)}


def _models(text: str) -> tuple[dict[str, dict[str, str]], str | None]:
    """``model input output`` lines (USD per 1M tokens) as the API's models object, or why not."""
    models: dict[str, dict[str, str]] = {}
    lines = [line.split() for line in text.splitlines() if line.strip()]
    if len(lines) > MAX_MODELS:
        return {}, f"at most {MAX_MODELS} models"
    for number, parts in enumerate(lines, 1):
        if len(parts) != 3:
            return {}, f"line {number}: write `model input-price output-price`"
        try:
            Decimal(parts[1]), Decimal(parts[2])
        except InvalidOperation:
            return {}, f"line {number}: prices are decimal numbers (USD per 1M tokens)"
        models[parts[0]] = {"input_per_mtok": parts[1], "output_per_mtok": parts[2]}
    return models, None


# --- secrets -----------------------------------------------------------------------------------------


@router.get("/admin/secrets")
async def secrets_page(
    request: Request, ctx: SecretReader, me: SignedIn, db: Db, settings: AppSettings, cursor: Cursor = None
) -> Response:
    """Secret names and when they were set, never their values; the set and delete forms."""
    size = page_size(None, settings)
    rows = await vault_service.list_secrets(await driver(db), ctx, limit=size + 1, after=SECRET_PAGES.after(cursor))
    secrets, next_cursor = SECRET_PAGES.page(rows, size, lambda r: (r["name"],))
    return templates.TemplateResponse(request, "dashboard/admin_secrets.html", {
        "me": me, "secrets": secrets, "next_cursor": next_cursor,
    })


@router.post("/admin/secrets")
async def put_secret(request: Request, ctx: SecretAdmin, db: Db, runtime: AppRuntime) -> Response:
    """Set a secret's value (``PUT /api/v1/secrets/{name}``); the value is never shown back."""
    form = await form_fields(request)
    name = form.get("name", "").strip()
    if vault_service.NAME.fullmatch(name) is None:
        raise Invalid("not a secret name", errors=[
            {"pointer": "/form/name", "message": "letters, digits and _ (not first a digit), at most 128"}])
    body = parse(SecretWrite, {"value": form.get("value", "")})
    await vault_service.put_secret(await driver(db), runtime.vault, ctx, name, body.value)
    await db.commit()
    return RedirectResponse("/admin/secrets", status_code=303)


@router.post("/admin/secrets/{secret}/delete")
async def delete_secret(request: Request, secret: SecretName, ctx: SecretAdmin, db: Db) -> Response:
    """Delete a secret: refused (409 page naming its users) while in use, unless "delete anyway" is ticked."""
    force = bool((await form_fields(request)).get("force"))
    try:
        await vault_service.delete_secret(await driver(db), ctx, secret, force=force)
    except vault_service.SecretInUse as exc:  # the service's words are the API's (?force=true): say the form's
        users = ", ".join(f"{u['kind']} {u['name']}" + (f" v{u['version']}" if "version" in u else "")
                          for u in exc.extra["used_by"])
        raise vault_service.SecretInUse(
            f"secret {secret!r} is used by {users}: point them at another secret first, or delete it with "
            "“even if in use” ticked (their calls then fail)", used_by=exc.extra["used_by"]) from exc
    await db.commit()
    return RedirectResponse("/admin/secrets", status_code=303)
