"""Dashboard sessions (placeholder: no session cookie is recognised yet)."""

from __future__ import annotations

from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncSession

from app.context import Ctx


async def session_ctx(request: Request, db: AsyncSession) -> Ctx | None:
    return None
