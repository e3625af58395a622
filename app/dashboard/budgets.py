"""The budgets page: spend this hour and today against the tenant's caps, today's burn as a chart drawn on the
server (SVG, with a table saying the same), the workflows that spent most, and runs paused on a budget."""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any

from fastapi import Depends, Request, Response

from app.auth.deps import require
from app.auth.web import templates
from app.budgets import service as budgets_service
from app.budgets.service import HourSpend, usd_text
from app.context import Ctx
from app.dashboard.common import SignedIn, page_router
from app.db import Db
from app.http import AppSettings
from app.pagination import Cursor, Limit, page_size

router = page_router()
BudgetViewer = Annotated[Ctx, Depends(require("budgets:read"))]

# The chart's drawing area, in SVG user units (it scales with the page).
WIDTH, HEIGHT, LEFT, BOTTOM, TOP = 720, 240, 64, 28, 12


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    label: str
    hour: str


@dataclass(frozen=True)
class Chart:
    """Today's spend drawn: a bar per hour (spent in it), the running total as a line, the daily cap."""

    bars: list[Bar]
    line: str  # polyline points of the running total
    cap_y: float | None
    ticks: list[tuple[float, str]]  # y, label
    hour_ticks: list[tuple[float, str]]  # x, label
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    bottom: float = HEIGHT - BOTTOM


def usd(value: Any) -> str:
    return "$" + usd_text(Decimal(str(value)))


def _step(top: float) -> float:
    """A round step (1, 2 or 5 times a power of ten) reaching ``top`` in at most five gridlines."""
    power: float = 10.0 ** math.floor(math.log10(top / 5))
    return next(power * m for m in (1, 2, 5, 10) if power * m * 5 >= top)


def chart(hours: list[HourSpend], cap: Decimal | None) -> Chart:
    """Geometry only: the figures are the service's."""
    top = max([cap or Decimal(0), *(h.cumulative_usd for h in hours), Decimal("0.01")])
    step = _step(float(top) * 1.05)
    lines = math.ceil(float(top) * 1.05 / step)
    scale = step * lines
    plot_h = HEIGHT - BOTTOM - TOP
    slot = (WIDTH - LEFT - 8) / 24

    def y(value: Decimal) -> float:
        return round(HEIGHT - BOTTOM - float(value) / scale * plot_h, 2)

    bars = [Bar(round(LEFT + i * slot + 2, 2), y(h.spent_usd), round(slot - 4, 2),
                round(HEIGHT - BOTTOM - y(h.spent_usd), 2), usd(h.spent_usd), h.start.strftime("%H:00"))
            for i, h in enumerate(hours)]
    line = " ".join(f"{round(LEFT + (i + 1) * slot, 2)},{y(h.cumulative_usd)}" for i, h in enumerate(hours))
    ticks = [(y(Decimal(str(step * k))), usd(Decimal(str(round(step * k, 6))))) for k in range(lines + 1)]
    hour_ticks = [(round(LEFT + i * slot + slot / 2, 2), f"{i:02d}") for i in range(0, 24, 3)]
    return Chart(bars, line, y(cap) if cap is not None else None, ticks, hour_ticks)


@router.get("/budgets")
async def budgets_page(
    request: Request, ctx: BudgetViewer, me: SignedIn, db: Db, settings: AppSettings, cursor: Cursor = None,
    limit: Limit = None,
) -> Response:
    """Caps and spend now, today's burn by hour, top workflows by spend, and runs a budget paused."""
    view = await budgets_service.overview(db, ctx, limit=page_size(limit, settings), cursor=cursor)
    caps = view.budget or {}
    return templates.TemplateResponse(request, "dashboard/budgets.html", {
        "me": me, "view": view, "hourly_cap": caps.get("hourly_usd"), "daily_cap": caps.get("daily_usd"),
        "on_exhausted": caps.get("on_exhausted", "pause"), "chart": chart(view.hours, caps.get("daily_usd")),
        "usd": usd,
    })
