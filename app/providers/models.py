from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, DateTime, ForeignKey, String, UniqueConstraint, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base


class Provider(Base):
    """An OpenAI-compatible chat-completions endpoint and the price of its models."""

    __tablename__ = "provider"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name"),
        CheckConstraint("max_tokens_param IN ('max_tokens', 'max_completion_tokens')", name="max_tokens_param"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenant.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    base_url: Mapped[str] = mapped_column(String(2048))
    api_key_secret: Mapped[str | None] = mapped_column(String(128))
    # {"<model>": {"input_per_mtok": "3.00", "output_per_mtok": "15.00"}} (decimal strings)
    models: Mapped[dict[str, Any]] = mapped_column(JSONB)
    # The request parameter that caps an answer's tokens (app.llm.client.MaxTokensParam).
    max_tokens_param: Mapped[str] = mapped_column(String(32), server_default="max_tokens")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
