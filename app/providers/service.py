"""Model providers: OpenAI-compatible endpoints per tenant, the price of their models, and their lookup.

Steps name a model as ``<provider>/<model>``: provider names have no "/", so the first one separates
them and model names may contain more (``together/meta-llama/Llama-3-70b``). The API key is held in
the tenant's vault; a provider stores only the secret's name. Every change is audited.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from app.audit.service import record as audit
from app.context import Ctx
from app.errors import Invalid, NotFound
from app.llm.client import MaxTokensParam, Price
from app.pg import Conn, dumps
from app.vault.crypto import Vault
from app.vault.service import NAME as SECRET_NAME
from app.vault.service import existing as existing_secrets
from app.vault.service import open_secrets

NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
MODEL = re.compile(r"[A-Za-z0-9._:@/-]{1,128}")
MAX_MODELS = 100
MAX_PRICE = Decimal(1_000_000)
# Finer than any real price; also keeps "1e-999999" from becoming a million-digit string.
MAX_PRICE_PLACES = 12
_PLACES = Decimal(1).scaleb(-MAX_PRICE_PLACES)

ModelName = Annotated[str, StringConstraints(pattern=f"^{MODEL.pattern}$")]


class ProviderNotFound(NotFound):
    pass


class ModelPrice(BaseModel):
    """USD per 1M tokens, as non-negative decimals (strings or numbers; stored as decimal strings)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    input_per_mtok: str = Field(examples=["3.00"], json_schema_extra={"type": ["string", "number"]})
    output_per_mtok: str = Field(examples=["15.00"], json_schema_extra={"type": ["string", "number"]})

    @model_validator(mode="before")
    @classmethod
    def _decimals(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not {"input_per_mtok", "output_per_mtok"} <= data.keys():
            return data  # the field checks report what is missing
        if any(isinstance(data[k], str) and len(data[k]) > 40 for k in ("input_per_mtok", "output_per_mtok")):
            raise ValueError("a price has at most 40 characters")
        price = Price.from_mapping(data)
        return {**data, "input_per_mtok": _decimal_text(price.input_per_mtok),
                "output_per_mtok": _decimal_text(price.output_per_mtok)}


def _decimal_text(value: Decimal) -> str:
    if value > MAX_PRICE:
        raise ValueError(f"a price may be at most {MAX_PRICE} USD per 1M tokens")
    if value != value.quantize(_PLACES):
        raise ValueError(f"a price may have at most {MAX_PRICE_PLACES} decimal places")
    return format(value.copy_abs(), "f")  # copy_abs: "-0" is a valid price, printed as "0"


class ProviderWrite(BaseModel):
    """A provider's definition (``PUT /providers/{name}`` replaces the whole of it)."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        json_schema_extra={
            "examples": [
                {
                    "base_url": "https://api.openai.com/v1",
                    "api_key_secret": "openai_key",
                    "models": {"gpt-4o": {"input_per_mtok": "2.50", "output_per_mtok": "10.00"}},
                },
                {
                    "base_url": "https://api.openai.com/v1",
                    "api_key_secret": "openai_key",
                    "max_tokens_param": "max_completion_tokens",
                    "models": {"o3-mini": {"input_per_mtok": "1.10", "output_per_mtok": "4.40"}},
                },
            ]
        },
    )
    base_url: str = Field(
        min_length=1, max_length=2048, description="http(s) URL that `/chat/completions` is appended to"
    )
    api_key_secret: Annotated[str, StringConstraints(pattern=f"^{SECRET_NAME.pattern}$")] | None = Field(
        default=None, description="Name of the secret holding the API key (sent as `Authorization: Bearer`)"
    )
    models: dict[ModelName, ModelPrice] = Field(min_length=1, max_length=MAX_MODELS)
    max_tokens_param: MaxTokensParam = Field(
        default="max_tokens",
        description="The request parameter that caps an answer's tokens: `max_tokens` (most servers) or "
        "`max_completion_tokens` (OpenAI's reasoning models, which refuse `max_tokens`)",
    )

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, url: str) -> str:
        check_base_url(url)
        return url


def check_base_url(url: str) -> None:
    """Raise ValueError unless ``url`` is an http(s) URL with a host and no credentials, query or fragment."""
    if any(c.isspace() or not c.isprintable() for c in url):
        raise ValueError("must not contain whitespace or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a bad port)
    except ValueError as exc:
        raise ValueError(f"not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http:// or https:// URL with a host")
    if "@" in parts.netloc:
        raise ValueError("must not contain credentials: put the API key in a secret (api_key_secret)")
    if "?" in url or "#" in url:
        raise ValueError("must not have a query or fragment")


def split_ref(ref: str) -> tuple[str, str] | None:
    """``"<provider>/<model>"`` as ``(provider, model)``, split at the first "/"; None when malformed."""
    provider, slash, model = ref.partition("/")
    if not slash or NAME.fullmatch(provider) is None or MODEL.fullmatch(model) is None:
        return None
    return provider, model


_COLUMNS = "name, base_url, api_key_secret, models, max_tokens_param, created_at, updated_at"
_UPSERT = (
    "INSERT INTO provider (id, tenant_id, name, base_url, api_key_secret, models, max_tokens_param) "
    "VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7) "
    "ON CONFLICT (tenant_id, name) DO UPDATE SET base_url = excluded.base_url, "
    "api_key_secret = excluded.api_key_secret, models = excluded.models, "
    "max_tokens_param = excluded.max_tokens_param, updated_at = now() "
    f"RETURNING (xmax = 0) AS created, {_COLUMNS}"
)


async def put_provider(conn: Conn, ctx: Ctx, name: str, body: ProviderWrite) -> tuple[dict[str, Any], bool]:
    """Create or replace the provider ``name``; returns ``(provider row, created)``.

    Its ``api_key_secret`` must name an existing secret; the audit event names it, never its value.
    """
    if NAME.fullmatch(name) is None:
        raise Invalid(f"invalid provider name {name!r}",
                      errors=[{"pointer": "/name", "message": f"must match {NAME.pattern}"}])
    secret = body.api_key_secret
    if secret is not None and not await existing_secrets(conn, ctx.tenant_id, {secret}):
        raise Invalid("the provider definition is invalid", errors=[
            {"pointer": "/api_key_secret", "message": f"no secret named {secret!r} (PUT /api/v1/secrets)"}])
    models = {model: price.model_dump() for model, price in body.models.items()}
    row = await conn.fetchrow(_UPSERT, uuid.uuid4(), ctx.tenant_id, name, body.base_url, secret, dumps(models),
                              body.max_tokens_param)
    created = bool(row["created"])
    await audit(
        conn,
        ctx.tenant_id,
        ctx,
        "provider.create" if created else "provider.update",
        f"provider:{name}",
        data={"base_url": body.base_url, "api_key_secret": secret, "models": models,
              "max_tokens_param": body.max_tokens_param},
    )
    return _provider(row), created


async def get_provider(conn: Conn, ctx: Ctx, name: str) -> dict[str, Any]:
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM provider WHERE tenant_id = $1 AND name = $2", ctx.tenant_id, name
    )
    if row is None:
        raise ProviderNotFound(f"no provider named {name!r}")
    return _provider(row)


async def list_providers(conn: Conn, ctx: Ctx, *, limit: int, after: str | None) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM provider WHERE tenant_id = $1 AND ($2::text IS NULL OR name > $2) "
        "ORDER BY name LIMIT $3",
        ctx.tenant_id,
        after,
        limit,
    )
    return [_provider(r) for r in rows]


async def delete_provider(conn: Conn, ctx: Ctx, name: str) -> None:
    gone = await conn.fetchval(
        "DELETE FROM provider WHERE tenant_id = $1 AND name = $2 RETURNING name", ctx.tenant_id, name
    )
    if gone is None:
        raise ProviderNotFound(f"no provider named {name!r}")
    await audit(conn, ctx.tenant_id, ctx, "provider.delete", f"provider:{name}")


async def providers_using_secret(conn: Conn, tenant_id: uuid.UUID, secret: str) -> list[str]:
    """The names of the tenant's providers whose API key is the secret ``secret``."""
    rows = await conn.fetch(
        "SELECT name FROM provider WHERE tenant_id = $1 AND api_key_secret = $2 ORDER BY name", tenant_id, secret
    )
    return [r["name"] for r in rows]


def _provider(row: Any) -> dict[str, Any]:
    return {column: row[column] for column in ("name", "base_url", "api_key_secret", "models", "max_tokens_param",
                                               "created_at", "updated_at")}


async def model_names(conn: Conn, tenant_id: uuid.UUID) -> dict[str, frozenset[str]]:
    """Every provider of the tenant and its model names: what a workflow definition may name."""
    rows = await conn.fetch("SELECT name, models FROM provider WHERE tenant_id = $1", tenant_id)
    return {r["name"]: frozenset(r["models"]) for r in rows}


# --- lookups for workers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """A model as a call needs it: where to send it, the API key in clear (kept out of repr) and its price."""

    provider: str
    model: str
    base_url: str
    api_key: str | None = field(repr=False)
    price: Price
    max_tokens_param: MaxTokensParam = "max_tokens"


async def resolve_model(conn: Conn, vault: Vault, tenant_id: uuid.UUID, ref: str) -> ModelRef | str:
    """The model ``ref`` ("<provider>/<model>") with its decrypted key, or why it cannot be called.

    The error strings name what exists instead, for the step's error; they never contain a key. A key
    the vault cannot decrypt raises :class:`~app.vault.crypto.VaultError`.
    """
    parts = split_ref(ref)
    if parts is None:
        return f"model {ref!r} is not '<provider>/<model>'"
    provider, model = parts
    row = await conn.fetchrow(
        "SELECT base_url, api_key_secret, models, max_tokens_param FROM provider WHERE tenant_id = $1 AND name = $2",
        tenant_id,
        provider,
    )
    if row is None:
        names = await conn.fetch("SELECT name FROM provider WHERE tenant_id = $1 ORDER BY name", tenant_id)
        available = ", ".join(r["name"] for r in names) or "none"
        return f"unknown provider {provider!r}; available providers: {available}"
    models: dict[str, Any] = row["models"]
    if model not in models:
        return f"provider {provider!r} has no model {model!r}; its models: {', '.join(sorted(models)) or 'none'}"
    api_key = None
    secret = row["api_key_secret"]
    if secret is not None:
        api_key = (await open_secrets(conn, vault, tenant_id, {secret})).get(secret)
        if api_key is None:
            return f"secret {secret!r} of provider {provider!r} no longer exists"
    return ModelRef(provider, model, row["base_url"], api_key, Price.from_mapping(models[model]),
                    max_tokens_param=row["max_tokens_param"])
