from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, CheckConstraint, DateTime, ForeignKey, Identity, Index, String, func, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base


class AuditEvent(Base):
    """Append-only, hash-chained record of who did what (see app/audit/chain.py and the migrations' trigger):
    written unsealed in the action's transaction, sealed (chained) by a sealer after commit."""

    __tablename__ = "audit_event"
    __table_args__ = (
        Index("uq_audit_event_tenant_seq", "tenant_id", "seq", unique=True),
        Index("ix_audit_event_tenant_at", "tenant_id", "at"),
        Index("ix_audit_event_unsealed", "tenant_id", "id", postgresql_where=text("seq IS NULL")),
        CheckConstraint("(seq IS NULL) = (prev_hash IS NULL) AND (seq IS NULL) = (hash IS NULL)",
                        name="ck_audit_event_sealed"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenant.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.clock_timestamp())
    actor: Mapped[str] = mapped_column(String(255))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str | None] = mapped_column(String(255))
    outcome: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    ip: Mapped[str | None] = mapped_column(String(64))
    user_agent: Mapped[str | None] = mapped_column(String(512))
    # Position in the tenant's chain, the previous row's hash and this row's (SHA-256, hex); NULL until sealed.
    seq: Mapped[int | None] = mapped_column(BigInteger)
    prev_hash: Mapped[str | None] = mapped_column(String(64))
    hash: Mapped[str | None] = mapped_column(String(64))


class AuditHead(Base):
    """The last sealed row of each tenant's chain; a sealer holds its row lock while it chains."""

    __tablename__ = "audit_head"

    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenant.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))
