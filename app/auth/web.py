"""Sign-on pages: OIDC sign-in (authorization code + PKCE), local sign-in, sign-out, tenant switch, ``/auth/me``.

The OIDC round trip keeps Authlib's state (state, nonce, PKCE verifier) in Redis for ten minutes under
the hash of a random HttpOnly cookie set when it starts, so the callback only completes in the browser
that started it, and only once. Every sign-in, failed sign-in (when the tenant is known), sign-out and
tenant switch is written to the tenant's audit log.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import uuid
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from authlib.common.errors import AuthlibBaseError
from fastapi import APIRouter, Request
from fastapi.templating import Jinja2Templates
from joserfc.errors import JoseError
from pydantic import BaseModel
from starlette.responses import RedirectResponse, Response

from app.audit.service import record
from app.auth.deps import client_ip, user_agent
from app.auth.local import LOCAL_ADMIN, verify_password_async
from app.auth.oidc import (
    HTTP_ERRORS,
    IdentityProviderUnavailable,
    id_token_claims_options,
    oidc_client,
    oidc_configured,
    provider_metadata,
)
from app.auth.sessions import (
    CSRF_FIELD,
    WebSession,
    check_csrf,
    clear_session_cookie,
    cookie_secure,
    create_session,
    current_session,
    delete_session,
    external_url,
    form_fields,
    is_loopback_request,
    set_active_tenant,
    set_session_cookie,
)
from app.auth.users import (
    LOCAL_ISSUER,
    TenantAccess,
    User,
    get_user,
    groups_from_claims,
    sign_in_user,
    tenant_access,
    tenants_of,
)
from app.context import Ctx
from app.db import ROOT
from app.errors import BadRequest, Forbidden, NotFound, Unauthorized
from app.http import JsonRoute, get_app_settings, problem_responses

log = logging.getLogger(__name__)

router = APIRouter(prefix="/auth", route_class=JsonRoute)
templates = Jinja2Templates(directory=str(ROOT / "templates"))

FLOW_COOKIE = "steward_oidc_flow"
LOGIN_CSRF_COOKIE = "steward_login_csrf"
FLOW_TTL_S = 600
LOCAL_NOTE = "local sign-in: available on this machine only because no identity provider is configured"
_MAX_PASSWORD_CHARS = 1024


def _safe_next(value: str | None) -> str:
    """A same-site path to go to after sign-in (never another site: no open redirect)."""
    if not value or not value.startswith("/") or value.startswith(("//", "/\\")) or any(c in value for c in "\r\n"):
        return "/"
    return value


def _pg(request: Request) -> asyncpg.Pool[asyncpg.Record]:
    pool: asyncpg.Pool[asyncpg.Record] = request.app.state.runtime.pg
    return pool


def _ctx(request: Request, principal: str, tenant: TenantAccess | uuid.UUID) -> Ctx:
    """The audit actor: who, from where."""
    if isinstance(tenant, TenantAccess):
        return Ctx(tenant.id, principal, tenant.roles, ip=client_ip(request), user_agent=user_agent(request))
    return Ctx(tenant, principal, frozenset(), ip=client_ip(request), user_agent=user_agent(request))


def _flow_key(token: str) -> str:
    return "steward:oidc-flow:" + hashlib.sha256(token.encode()).hexdigest()


# --- the sign-in page --------------------------------------------------------------------------------


def _render_login(request: Request, *, next_: str = "/", error: str | None = None, notice: str | None = None,
                  status: int = 200) -> Response:
    settings = get_app_settings(request)
    context: dict[str, Any] = {"next": next_, "error": error, "notice": notice, "local_note": LOCAL_NOTE}
    csrf = None
    if oidc_configured(settings):
        context["mode"] = "oidc"
        context["provider"] = urlsplit(settings.oidc_issuer or "").netloc
    elif is_loopback_request(request):
        context["mode"] = "local"
        context["username"] = LOCAL_ADMIN
        # Reused while it lasts, so two open sign-in tabs both work.
        csrf = request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(32)
    else:
        context["mode"] = "unavailable"
        status = 403 if status == 200 else status
    context["csrf_token"] = csrf
    response = templates.TemplateResponse(request, "auth/login.html", context, status_code=status)
    response.headers["Cache-Control"] = "no-store"
    if csrf is not None:
        # Double-submit: the form's hidden field must match this cookie (there is no session yet).
        response.set_cookie(LOGIN_CSRF_COOKIE, csrf, max_age=3600, path="/auth", httponly=True, samesite="lax",
                            secure=cookie_secure(request))
    return response


@router.get("/login", include_in_schema=False, name="auth_login")
async def login_page(request: Request, next: str = "/", signed_out: bool = False) -> Response:
    next_ = _safe_next(next)
    if await current_session(request) is not None:
        return RedirectResponse(next_, status_code=303)
    return _render_login(request, next_=next_, notice="You have signed out." if signed_out else None)


async def _start_session(request: Request, user: User, tenants: list[TenantAccess], *, method: str,
                         claims: dict[str, Any], id_token: str | None, next_: str) -> Response:
    """Open a session in the user's first tenant (they may switch), audit it, set the cookie."""
    active = tenants[0]
    previous = await current_session(request)
    async with _pg(request).acquire() as conn, conn.transaction():
        if previous is not None:
            await delete_session(conn, previous)
        value, _ = await create_session(conn, request, user=user, tenant_id=active.id,
                                        claims={"method": method, **claims}, id_token=id_token)
        await record(conn, active.id, _ctx(request, user.principal, active), "auth.sign_in", user.principal,
                     data={"method": method, "roles": sorted(active.roles)})
    log.info("%s signed in (%s) to tenant %s", user.principal, method, active.id)
    response = RedirectResponse(next_, status_code=303)
    set_session_cookie(response, request, value)
    for cookie in (FLOW_COOKIE, LOGIN_CSRF_COOKIE):
        if cookie in request.cookies:
            response.delete_cookie(cookie, path="/auth")
    return response


# --- OIDC ----------------------------------------------------------------------------------------------


def _require_oidc(request: Request) -> None:
    if not oidc_configured(get_app_settings(request)):
        raise NotFound("no identity provider is configured")


@router.get("/oidc/start", include_in_schema=False, name="auth_oidc_start")
async def oidc_start(request: Request, next: str = "/") -> Response:
    _require_oidc(request)
    await provider_metadata(request.app)
    request.scope["session"] = {}  # Authlib keeps its state here; we move it to Redis below
    try:
        response: Response = await oidc_client(request.app).authorize_redirect(
            request, external_url(request, "/auth/callback"))
    except (AuthlibBaseError, *HTTP_ERRORS) as exc:
        log.warning("starting OIDC sign-in failed: %r", exc)
        raise IdentityProviderUnavailable("the identity provider cannot be reached; try again shortly") from None
    token = secrets.token_urlsafe(32)
    flow = {"session": request.scope["session"], "next": _safe_next(next)}
    await request.app.state.runtime.redis.set(_flow_key(token), json.dumps(flow), ex=FLOW_TTL_S)
    response.set_cookie(FLOW_COOKIE, token, max_age=FLOW_TTL_S, path="/auth", httponly=True, samesite="lax",
                        secure=cookie_secure(request))
    return response


@router.get("/callback", include_in_schema=False, name="auth_callback")
async def oidc_callback(request: Request) -> Response:
    _require_oidc(request)
    token = request.cookies.get(FLOW_COOKIE)
    stored = await request.app.state.runtime.redis.getdel(_flow_key(token)) if token else None
    if not stored:
        log.warning("OIDC callback without a pending sign-in in this browser (expired, replayed or forged)")
        return _render_login(request, error="This sign-in expired or was started in another browser. "
                                            "Please sign in again.", status=400)
    flow = json.loads(stored)
    request.scope["session"] = flow["session"]
    await provider_metadata(request.app)
    try:
        result = await oidc_client(request.app).authorize_access_token(
            request, claims_options=id_token_claims_options(get_app_settings(request)))
    except (AuthlibBaseError, JoseError, *HTTP_ERRORS) as exc:
        # No tenant is known yet: the log is the only record.
        log.warning("OIDC sign-in failed: %s", getattr(exc, "error", None) or type(exc).__name__)
        return _render_login(request, next_=flow["next"], status=401,
                             error="Sign-in failed at the identity provider. Please try again.")
    userinfo = result.get("userinfo")
    if not userinfo or not userinfo.get("sub"):
        log.warning("OIDC sign-in failed: the provider returned no ID token")
        return _render_login(request, status=401, error="The identity provider returned no ID token.")
    return await _oidc_sign_in(request, dict(userinfo), result.get("id_token"), flow["next"])


async def _oidc_sign_in(request: Request, claims: dict[str, Any], id_token: str | None, next_: str) -> Response:
    settings = get_app_settings(request)
    groups = groups_from_claims(claims, settings.oidc_groups_claim)
    email, name = claims.get("email"), claims.get("name") or claims.get("preferred_username")
    user = await sign_in_user(_pg(request), str(claims["iss"]), str(claims["sub"]),
                              email=email if isinstance(email, str) else None,
                              name=name if isinstance(name, str) else None)
    tenants = await tenants_of(_pg(request), user.id, groups)
    if not tenants:
        log.warning("sign-in refused: %s is not a member of any tenant (groups: %s)", user.principal, groups)
        return _render_login(request, status=403, error=f"You signed in as {email or user.subject}, but you are "
                             "not a member of any tenant here. Ask a tenant admin to add you.")
    kept = {"groups": groups, "email": user.email, "name": user.name}
    return await _start_session(request, user, tenants, method="oidc", claims=kept, id_token=id_token, next_=next_)


# --- local sign-in ---------------------------------------------------------------------------------------

_LOCAL_USER = "SELECT id, password_hash FROM app_user WHERE issuer = $1 AND subject = $2"
_STAMP_LOGIN = "UPDATE app_user SET last_login_at = now() WHERE id = $1"


@router.post("/local", include_in_schema=False, name="auth_local")
async def local_sign_in(request: Request) -> Response:
    if oidc_configured(get_app_settings(request)):
        raise Forbidden("local sign-in is off because an identity provider is configured: sign in with it")
    if not is_loopback_request(request):
        raise Forbidden("local sign-in is only available on this machine (a loopback address, with a loopback Host)")
    form = await form_fields(request)
    expected, sent = request.cookies.get(LOGIN_CSRF_COOKIE), form.get(CSRF_FIELD)
    if not expected or not sent or not hmac.compare_digest(expected.encode(), sent.encode()):
        raise Forbidden("missing or wrong CSRF token: reload the sign-in page")
    username = (form.get("username") or LOCAL_ADMIN)[:255]
    password = form.get("password", "")[:_MAX_PASSWORD_CHARS]
    next_ = _safe_next(form.get("next"))
    pg = _pg(request)
    row = await pg.fetchrow(_LOCAL_USER, LOCAL_ISSUER, username)
    if not await verify_password_async(password, row["password_hash"] if row else None):
        await _local_denied(request, row["id"] if row else None, username)
        return _render_login(request, next_=next_, status=401, error="Wrong user name or password.")
    user = await get_user(pg, row["id"])
    assert user is not None
    tenants = await tenants_of(pg, user.id, ())
    if not tenants:
        log.warning("local sign-in refused: %s is not a member of any tenant", user.principal)
        return _render_login(request, next_=next_, status=403, error="This user is not a member of any tenant.")
    await pg.execute(_STAMP_LOGIN, user.id)
    return await _start_session(request, user, tenants, method="local", claims={}, id_token=None, next_=next_)


async def _local_denied(request: Request, user_id: uuid.UUID | None, username: str) -> None:
    """Audit a wrong password in the user's tenants; an unknown user name has no tenant: log only."""
    if user_id is None:
        log.warning("local sign-in refused: no local user %r", username[:64])
        return
    principal = f"user:{user_id}"
    tenants = await tenants_of(_pg(request), user_id, ())
    log.warning("local sign-in refused: wrong password for %s", principal)
    for tenant in tenants:
        async with _pg(request).acquire() as conn, conn.transaction():
            await record(conn, tenant.id, _ctx(request, principal, tenant.id), "auth.sign_in", principal,
                         outcome="denied", data={"method": "local", "reason": "wrong password"})


# --- sign-out and tenant switch ---------------------------------------------------------------------------


@router.post("/logout", include_in_schema=False, name="auth_logout")
async def logout(request: Request) -> Response:
    session = await current_session(request)
    target = external_url(request, "/auth/login?signed_out=1")
    if session is not None:
        await check_csrf(request, session)
        async with _pg(request).acquire() as conn, conn.transaction():
            await delete_session(conn, session)
            if session.tenant_id is not None:
                await record(conn, session.tenant_id, _ctx(request, session.principal, session.tenant_id),
                             "auth.sign_out", session.principal, data={"method": session.claims.get("method")})
        if session.claims.get("method") == "oidc" and oidc_configured(get_app_settings(request)):
            target = await _end_session_url(request, session) or target
    response = RedirectResponse(target, status_code=303)
    clear_session_cookie(response, request)
    return response


async def _end_session_url(request: Request, session: WebSession) -> str | None:
    """The provider's RP-initiated logout URL, when it has an end-session endpoint."""
    try:
        metadata = await provider_metadata(request.app)
    except IdentityProviderUnavailable:
        return None
    if not metadata.get("end_session_endpoint"):
        return None
    logout_url = await oidc_client(request.app).create_logout_url(
        post_logout_redirect_uri=external_url(request, "/auth/login"), id_token_hint=session.id_token,
        client_id=get_app_settings(request).oidc_client_id)
    return str(logout_url["url"])


@router.post("/tenant", include_in_schema=False, name="auth_switch_tenant")
async def switch_tenant(request: Request) -> Response:
    session = await current_session(request)
    if session is None:
        raise Unauthorized("not signed in")
    await check_csrf(request, session)
    form = await form_fields(request)
    wanted = (form.get("tenant") or "").strip()
    if not wanted:
        raise BadRequest("name the tenant to switch to (id or name) in the `tenant` field")
    access = await tenant_access(_pg(request), session.user_id, session.groups, wanted)
    if access is None:
        raise Forbidden(f"you are not a member of tenant {wanted[:128]!r}")
    async with _pg(request).acquire() as conn, conn.transaction():
        await set_active_tenant(conn, session, access.id)
        await record(conn, access.id, _ctx(request, session.principal, access), "auth.switch_tenant",
                     f"tenant:{access.id}", data={"roles": sorted(access.roles)})
    return RedirectResponse(_safe_next(form.get("next")), status_code=303)


# --- who am I -------------------------------------------------------------------------------------------------


class MeUser(BaseModel):
    id: uuid.UUID
    issuer: str
    subject: str
    email: str | None
    name: str | None


class MeTenant(BaseModel):
    id: uuid.UUID
    name: str
    roles: list[str]


class Me(BaseModel):
    """The signed-in user, the active tenant and their roles there, the tenants they may switch to."""

    user: MeUser
    tenant: MeTenant | None
    roles: list[str]
    tenants: list[MeTenant]
    csrf_token: str
    expires_at: datetime
    idle_expires_at: datetime


def _tenant(access: TenantAccess) -> MeTenant:
    return MeTenant(id=access.id, name=access.name, roles=sorted(access.roles))


@router.get("/me", response_model=Me, tags=["auth"], summary="The signed-in user and their tenants",
            responses=problem_responses(400, 401, 413, 422, 503))
async def me(request: Request) -> Me:
    """The dashboard session's user, active tenant, roles, switchable tenants and CSRF token."""
    signed_in = await signed_in_user(request)
    if signed_in is None:
        raise Unauthorized("not signed in")
    return signed_in


async def signed_in_user(request: Request) -> Me | None:
    """What ``/auth/me`` answers, or None when the request has no live session (pages use it too)."""
    session = await current_session(request)
    if session is None:
        return None
    user = await get_user(_pg(request), session.user_id)
    if user is None:
        return None
    tenants = await tenants_of(_pg(request), user.id, session.groups)
    active = next((tenant for tenant in tenants if tenant.id == session.tenant_id), None)
    return Me(
        user=MeUser(id=user.id, issuer=user.issuer, subject=user.subject, email=user.email, name=user.name),
        tenant=_tenant(active) if active else None,
        roles=sorted(active.roles) if active else [],
        tenants=[_tenant(tenant) for tenant in tenants],
        csrf_token=session.csrf_token,
        expires_at=session.expires_at,
        idle_expires_at=session.idle_expires_at(get_app_settings(request)),
    )
