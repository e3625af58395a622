"""Model provider endpoints: admins define them, members read them; API keys are shown by secret name only."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Response
from pydantic import BaseModel

from app.auth.deps import require
from app.context import Ctx
from app.db import Db
from app.http import AppSettings, JsonRoute, api_responses, problem_responses
from app.llm.client import MaxTokensParam
from app.pagination import Cursor, Limit, keyset, page_size
from app.pg import driver
from app.providers import service
from app.providers.service import ProviderWrite

router = APIRouter(prefix="/api/v1/providers", tags=["providers"], responses=api_responses(404), route_class=JsonRoute)
PAGES = keyset("providers", str)

Admin = Annotated[Ctx, Depends(require("providers:write"))]
Viewer = Annotated[Ctx, Depends(require("providers:read"))]
Name = Annotated[str, Path(pattern=f"^{service.NAME.pattern}$", description="Letters, digits, _ and - (max 64)")]


class PriceRead(BaseModel):
    input_per_mtok: str
    output_per_mtok: str


class ProviderRead(BaseModel):
    name: str
    base_url: str
    api_key_secret: str | None
    models: dict[str, PriceRead]
    max_tokens_param: MaxTokensParam
    created_at: datetime
    updated_at: datetime


class ProviderPage(BaseModel):
    items: list[ProviderRead]
    next_cursor: str | None


def _read(row: dict[str, Any]) -> ProviderRead:
    return ProviderRead.model_validate(row)


@router.put(
    "/{name}",
    status_code=201,
    response_model=ProviderRead,
    summary="Create or replace a model provider",
    responses={200: {"model": ProviderRead, "description": "Replaced an existing provider"}, **problem_responses(409)},
)
async def put_provider(name: Name, body: ProviderWrite, response: Response, ctx: Admin, db: Db) -> ProviderRead:
    row, created = await service.put_provider(await driver(db), ctx, name, body)
    await db.commit()
    if not created:
        response.status_code = 200
    return _read(row)


@router.get("", response_model=ProviderPage, summary="Model providers, by name")
async def list_providers(
    ctx: Viewer, db: Db, settings: AppSettings, limit: Limit = None, cursor: Cursor = None
) -> ProviderPage:
    size = page_size(limit, settings)
    rows = await service.list_providers(
        await driver(db), ctx, limit=size + 1, after=PAGES.after(cursor)
    )
    items, next_cursor = PAGES.page(rows, size, lambda r: (r["name"],))
    return ProviderPage(items=[_read(r) for r in items], next_cursor=next_cursor)


@router.get("/{name}", response_model=ProviderRead, summary="A model provider")
async def get_provider(name: Name, ctx: Viewer, db: Db) -> ProviderRead:
    return _read(await service.get_provider(await driver(db), ctx, name))


@router.delete("/{name}", status_code=204, summary="Delete a model provider", responses=problem_responses(409))
async def delete_provider(name: Name, ctx: Admin, db: Db) -> Response:
    await service.delete_provider(await driver(db), ctx, name)
    await db.commit()
    return Response(status_code=204)
