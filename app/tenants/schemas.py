"""What the access API and the services exchange: members and API keys, in and out."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.errors import Invalid
from app.tenants.policy import Role

Roles = Annotated[list[Role], Field(min_length=1, max_length=6)]

MAX_KEY_LIFETIME_DAYS = 3650


# --- members -----------------------------------------------------------------------------------------


class MemberWrite(BaseModel):
    model_config = ConfigDict(extra="forbid")
    roles: Roles


class MemberAdd(MemberWrite):
    subject: str = Field(min_length=1, max_length=255, description="The user's `sub` at the identity provider")
    issuer: str | None = Field(
        default=None, max_length=255, description="The identity provider (default: the configured one, else `local`)"
    )
    email: str | None = Field(default=None, max_length=320)
    name: str | None = Field(default=None, max_length=255)


class MemberRead(BaseModel):
    user_id: uuid.UUID
    issuer: str
    subject: str
    email: str | None
    name: str | None
    roles: list[str]
    created_by: str | None
    created_at: datetime
    updated_at: datetime
    last_login_at: datetime | None


class MemberPage(BaseModel):
    items: list[MemberRead]
    next_cursor: str | None


# --- API keys ----------------------------------------------------------------------------------------


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)
    roles: Roles
    expires_in_days: float | None = Field(
        default=None, gt=0, le=MAX_KEY_LIFETIME_DAYS, description="Lifetime; omit for a key that does not expire"
    )
    expires_at: datetime | None = Field(default=None, description="Or an exact expiry (with a time zone)")

    @model_validator(mode="after")
    def _one_expiry(self) -> ApiKeyCreate:
        if self.expires_in_days is not None and self.expires_at is not None:
            raise ValueError("give expires_in_days or expires_at, not both")
        if self.expires_at is not None and self.expires_at.tzinfo is None:
            raise ValueError("expires_at needs a time zone")
        return self

    def expiry(self) -> datetime | None:
        """When the key expires (None: never); refused if that is not in the future."""
        expires_at = self.expires_at
        if self.expires_in_days is not None:
            expires_at = datetime.now(UTC) + timedelta(days=self.expires_in_days)
        if expires_at is not None and expires_at <= datetime.now(UTC):
            raise Invalid("the key would be expired already",
                          errors=[{"pointer": "/body/expires_at", "message": "must be in the future"}])
        return expires_at


class ApiKeyRead(BaseModel):
    id: uuid.UUID
    name: str
    prefix: str = Field(description="The key's first characters, to tell keys apart")
    roles: list[str]
    created_at: datetime
    created_by: str | None
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


class ApiKeyCreated(ApiKeyRead):
    key: str = Field(description="The key itself: shown this once, stored only as a hash")


class ApiKeyPage(BaseModel):
    items: list[ApiKeyRead]
    next_cursor: str | None
