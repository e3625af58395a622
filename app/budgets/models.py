from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import BigInteger, Boolean, DateTime, ForeignKey, Index, Integer, Numeric, String, func, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base

TS = DateTime(timezone=True)
USD = Numeric(18, 8)


class Budget(Base):
    """A tenant's cost caps, what happens when one is hit, and its run limit defaults and maximums."""

    __tablename__ = "budget"

    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenant.id", ondelete="CASCADE"), primary_key=True)
    hourly_usd: Mapped[Decimal | None] = mapped_column(USD)
    daily_usd: Mapped[Decimal | None] = mapped_column(USD)
    on_exhausted: Mapped[str] = mapped_column(String(8), default="pause")  # pause | fail
    run_defaults: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    run_maximums: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    updated_at: Mapped[datetime] = mapped_column(TS, server_default=func.now())
    updated_by: Mapped[str | None] = mapped_column(String(255))


class BudgetWindow(Base):
    """Spend and outstanding reservations of one tenant in one clock hour or day (UTC)."""

    __tablename__ = "budget_window"

    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenant.id", ondelete="CASCADE"), primary_key=True)
    period: Mapped[str] = mapped_column(String(4), primary_key=True)  # hour | day
    start: Mapped[datetime] = mapped_column(TS, primary_key=True)
    spent_usd: Mapped[Decimal] = mapped_column(USD, default=0)
    reserved_usd: Mapped[Decimal] = mapped_column(USD, default=0)


class RunUsage(Base):
    """A run's limits (effective: tenant defaults, then workflow, then run) and what it has used."""

    __tablename__ = "run_usage"

    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenant.id", ondelete="CASCADE"))
    workflow_name: Mapped[str] = mapped_column(String(128))
    limits: Mapped[dict[str, Any]] = mapped_column(JSONB)
    # What max_steps limits: agents' model turns and the tool calls they chose (not tool steps, map items).
    tool_calls: Mapped[int] = mapped_column(Integer, default=0)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    reserved_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_usd: Mapped[Decimal] = mapped_column(USD, default=0)
    reserved_usd: Mapped[Decimal] = mapped_column(USD, default=0)
    created_at: Mapped[datetime] = mapped_column(TS, server_default=func.clock_timestamp())


class Reservation(Base):
    """Cost (and tokens) held for one model or tool call until it is settled to what it really cost."""

    __tablename__ = "budget_reservation"
    __table_args__ = (
        Index("ix_budget_reservation_held", "created_at", postgresql_where=text("status = 'held'")),
        Index("ix_budget_reservation_unwindowed", "tenant_id", "day_start", "hour_start",
              postgresql_where=text("NOT windowed")),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenant.id", ondelete="CASCADE"))
    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"))
    step_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(8))  # model | tool
    amount_usd: Mapped[Decimal] = mapped_column(USD)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    hour_start: Mapped[datetime] = mapped_column(TS)
    day_start: Mapped[datetime] = mapped_column(TS)
    status: Mapped[str] = mapped_column(String(8))  # held | settled
    # Whether its amounts are in the tenant's windows: false for a tenant without caps until the
    # reconciler folds its settled cost in (app/budgets/service.py).
    windowed: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    actual_usd: Mapped[Decimal | None] = mapped_column(USD)
    actual_tokens: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(TS, server_default=func.clock_timestamp())
    settled_at: Mapped[datetime | None] = mapped_column(TS)
