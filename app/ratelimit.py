"""Rate limits per principal and per tenant (placeholder: no limit yet)."""

from __future__ import annotations

from fastapi import Request

from app.context import Ctx


async def check_rate(request: Request, ctx: Ctx) -> None:
    return None
