"""Secret endpoints (admin): write-only values; listing shows names and times, never values."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.auth.deps import require
from app.context import Ctx
from app.db import Db
from app.http import AppSettings, JsonRoute, api_responses, problem_responses
from app.pagination import Cursor, Limit, keyset, page_size
from app.pg import driver
from app.runtime import AppRuntime
from app.vault import service
from app.vault.service import MAX_VALUE_CHARS

router = APIRouter(prefix="/api/v1/secrets", tags=["secrets"], responses=api_responses(404), route_class=JsonRoute)
PAGES = keyset("secrets", str)

Admin = Annotated[Ctx, Depends(require("secrets:write"))]
Reader = Annotated[Ctx, Depends(require("secrets:read"))]
SecretName = Annotated[str, Path(pattern=f"^{service.NAME.pattern}$", description="Letters, digits and _ (max 128)")]


class SecretWrite(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: str = Field(
        min_length=1,
        max_length=MAX_VALUE_CHARS,
        description="Sent in HTTP headers, so no control characters but tab (no CR, LF or NUL)",
        json_schema_extra={"writeOnly": True},
    )

    @field_validator("value")
    @classmethod
    def _header_safe(cls, value: str) -> str:
        problem = service.value_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value


class SecretInfo(BaseModel):
    name: str
    created_at: datetime
    updated_at: datetime
    updated_by: str | None = None


class SecretPage(BaseModel):
    items: list[SecretInfo]
    next_cursor: str | None


@router.put(
    "/{name}",
    status_code=204,
    summary="Create or replace a secret (the value is never returned)",
    responses=problem_responses(409),
)
async def put_secret(name: SecretName, body: SecretWrite, ctx: Admin, db: Db, runtime: AppRuntime) -> Response:
    await service.put_secret(await driver(db), runtime.vault, ctx, name, body.value)
    await db.commit()
    return Response(status_code=204)


@router.get("", response_model=SecretPage, summary="Secret names (values are write-only)")
async def list_secrets(
    ctx: Reader, db: Db, settings: AppSettings, limit: Limit = None, cursor: Cursor = None
) -> SecretPage:
    size = page_size(limit, settings)
    rows = await service.list_secrets(
        await driver(db), ctx, limit=size + 1, after=PAGES.after(cursor)
    )
    items, next_cursor = PAGES.page(rows, size, lambda r: (r["name"],))
    return SecretPage(items=[SecretInfo(**r) for r in items], next_cursor=next_cursor)


@router.delete(
    "/{name}",
    status_code=204,
    summary="Delete a secret (409 while a provider or tool uses it, unless forced)",
    responses=problem_responses(409),
)
async def delete_secret(
    name: SecretName,
    ctx: Admin,
    db: Db,
    force: Annotated[
        bool, Query(description="Delete even though providers or tool versions use it (their calls then fail)")
    ] = False,
) -> Response:
    await service.delete_secret(await driver(db), ctx, name, force=force)
    await db.commit()
    return Response(status_code=204)
