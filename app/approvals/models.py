from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, ForeignKey, Index, Integer, String, Text, func, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base

TS = DateTime(timezone=True)


class Approval(Base):
    """A pending or decided human decision on one exact action (a gated tool call or an approval step).

    ``action_hash`` binds the decision to the tool, its version and the arguments approved; the
    executor recomputes it and refuses to run anything else under this approval.
    """

    __tablename__ = "approval"
    __table_args__ = (
        # One current request per gated call: a re-delivered job finds the existing request; a retried
        # run supersedes the decided ones, so its calls ask again.
        Index("uq_approval_current_call", "step_run_id", "call_id", unique=True,
              postgresql_where=text("superseded_at IS NULL")),
        Index("ix_approval_tenant_run", "tenant_id", "run_id"),
        Index("ix_approval_tenant_status", "tenant_id", "status", text("requested_at DESC"), text("id DESC")),
        Index("ix_approval_expires", "expires_at", postgresql_where=text("status = 'pending'")),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenant.id", ondelete="CASCADE"))
    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"))
    step_run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("step_run.id", ondelete="CASCADE"))
    step_id: Mapped[str] = mapped_column(String(64))
    # "step" (an approval step), "tool" (a gated tool step) or "agent" (a tool call made by an agent).
    kind: Mapped[str] = mapped_column(String(8))
    # Empty for a step's own gate; the model's tool-call id for an agent's call.
    call_id: Mapped[str] = mapped_column(String(128), default="")
    tool: Mapped[str | None] = mapped_column(String(64))
    tool_version: Mapped[int | None] = mapped_column(Integer)
    args: Mapped[Any | None] = mapped_column(JSONB)
    action_hash: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))  # pending | approved | rejected | expired
    version: Mapped[int] = mapped_column(Integer, default=1)
    requested_by: Mapped[str | None] = mapped_column(String(255))  # who started the run
    requested_at: Mapped[datetime] = mapped_column(TS, server_default=func.clock_timestamp())
    expires_at: Mapped[datetime | None] = mapped_column(TS)
    on_expiry: Mapped[str] = mapped_column(String(8), default="reject")  # reject | flag
    flagged_at: Mapped[datetime | None] = mapped_column(TS)
    decided_by: Mapped[str | None] = mapped_column(String(255))
    decided_at: Mapped[datetime | None] = mapped_column(TS)
    comment: Mapped[str | None] = mapped_column(Text)
    # Set when an approver edited the arguments: what was approved (action_hash is then over these).
    approved_args: Mapped[Any | None] = mapped_column(JSONB)
    # Set when the run was retried after the decision: the decision no longer applies to new calls.
    superseded_at: Mapped[datetime | None] = mapped_column(TS)
