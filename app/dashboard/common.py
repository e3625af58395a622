"""What every dashboard page shares: errors rendered as pages, the signed-in user, and a router per area.

A page handler checks the caller like its API twin (the same ``require(permission)`` dependency, so the
browser and the API share one permission table), makes one service call and renders a template. Errors
render as pages, not problem+json: a signed-out visitor is sent to sign in and comes back, a missing
permission is a 403 page naming it, another tenant's run is the same 404 page as a run that never was.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse

from app.auth.web import Me, signed_in_user, templates
from app.errors import AppError, Conflict, Forbidden, Invalid, NotFound, Unauthorized
from app.http import JsonRoute, validation_errors


class PageRoute(JsonRoute):
    """Errors of a page render as pages (the input guard and size limits still answer first)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def page_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except Unauthorized:
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(f"/auth/login?next={quote(target, safe='')}", status_code=303)
            except (Forbidden, NotFound, Conflict, Invalid) as exc:
                return await error_page(request, exc)
            except RequestValidationError as exc:  # a bad query or path parameter: a 422 page, as for a form
                return await error_page(request, Invalid("invalid request", errors=validation_errors(exc.errors())))

        return page_handler


async def error_page(request: Request, exc: AppError) -> Response:
    return templates.TemplateResponse(
        request, "dashboard/error.html", {"me": await signed_in_user(request), "error": exc}, status_code=exc.status
    )


def page_router() -> APIRouter:
    """A router of pages: HTML by default, errors as pages, out of the OpenAPI document."""
    return APIRouter(include_in_schema=False, route_class=PageRoute, default_response_class=HTMLResponse)


async def _me(request: Request) -> Me:
    me = await signed_in_user(request)
    if me is None:  # a bearer token got past require(): pages are for browsers with a session
        raise Unauthorized("sign in to use the dashboard")
    return me


SignedIn = Annotated[Me, Depends(_me)]
