"""OIDC access tokens as bearer credentials (placeholder: refused until implemented)."""

from __future__ import annotations

from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncSession

from app.context import Ctx


async def bearer_ctx(request: Request, db: AsyncSession, token: str) -> Ctx:
    from app.auth.deps import InvalidCredentials

    raise InvalidCredentials("invalid API key")
