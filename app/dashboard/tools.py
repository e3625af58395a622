"""The tools pages: the registry with each tool's guardrails and circuit breaker (live), and one tool's
versions and definitions (secrets redacted)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Query, Request, Response

from app.auth.deps import require
from app.auth.web import Me, templates
from app.config import Settings
from app.context import Ctx
from app.dashboard.common import SignedIn, page_router
from app.db import INT32_MAX, Db
from app.http import AppSettings
from app.pagination import Cursor, Limit, page_size
from app.pg import driver
from app.runtime import AppRuntime
from app.tools import service as tools_service
from app.tools.breaker import Breaker, breaker_prefix
from app.tools.spec import TOOL_NAME

router = page_router()
ToolViewer = Annotated[Ctx, Depends(require("tools:read"))]
# Not a tool name (those start with a letter): the live part of the registry cannot shadow a tool's page.
LIVE = "/tools/_live"
# How often the pages read the breakers again: they live in Redis, which sends no notifications.
POLL_S = 3


def _breaker(runtime: AppRuntime) -> Breaker:
    """The breakers the workers share (same Redis, same prefix), read only."""
    return Breaker(runtime.redis, prefix=breaker_prefix(runtime.settings.queue_prefix))


Breakers = Annotated[Breaker, Depends(_breaker)]
ToolName = Annotated[str, Path(pattern=TOOL_NAME, max_length=64)]


@router.get("/tools")
async def tools_page(
    request: Request, ctx: ToolViewer, me: SignedIn, db: Db, settings: AppSettings, breaker: Breakers,
    cursor: Cursor = None, limit: Limit = None,
) -> Response:
    """The registry: each tool's effect, autonomy, required roles, fallback and breaker, by name."""
    return await _registry(request, "dashboard/tools.html", ctx, me, db, settings, breaker, cursor, limit)


@router.get(LIVE)
async def tools_live(
    request: Request, ctx: ToolViewer, me: SignedIn, db: Db, settings: AppSettings, breaker: Breakers,
    cursor: Cursor = None, limit: Limit = None,
) -> Response:
    """The registry's table again, breakers read now: the page polls it."""
    return await _registry(request, "dashboard/_tools_live.html", ctx, me, db, settings, breaker, cursor, limit)


async def _registry(request: Request, template: str, ctx: Ctx, me: Me, db: Db, settings: Settings,
                    breaker: Breaker, cursor: str | None, limit: int | None) -> Response:
    registry = await tools_service.tool_registry(
        await driver(db), ctx, breaker, limit=page_size(limit, settings), cursor=cursor
    )
    return templates.TemplateResponse(request, template, {
        "me": me, "registry": registry, "cursor": cursor, "poll_s": POLL_S, "live": LIVE,
    })


@router.get("/tools/{tool}")
async def tool_page(
    request: Request, tool: ToolName, ctx: ToolViewer, me: SignedIn, db: Db, settings: AppSettings,
    breaker: Breakers, version: Annotated[int | None, Query(ge=0, le=INT32_MAX)] = None, cursor: Cursor = None,
) -> Response:
    """One version of a tool (the latest by default): its definition, breaker and the other versions."""
    detail = await tools_service.tool_detail(
        await driver(db), ctx, breaker, tool, version, limit=page_size(None, settings), cursor=cursor
    )
    return templates.TemplateResponse(request, "dashboard/tool.html", {
        "me": me, "detail": detail, "tool": detail.shown, "poll_s": POLL_S,
    })


@router.get("/tools/{tool}/breaker")
async def tool_breaker(
    request: Request, tool: ToolName, ctx: ToolViewer, me: SignedIn, db: Db, breaker: Breakers,
) -> Response:
    """A tool's breaker as it is now: its page polls it."""
    status = await tools_service.tool_status(await driver(db), ctx, breaker, tool)
    return templates.TemplateResponse(request, "dashboard/_tool_breaker.html", {
        "me": me, "tool": status, "poll_s": POLL_S,
    })
