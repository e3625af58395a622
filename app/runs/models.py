"""Runs, step runs, attempts and the run event trace.

Status columns are written only by ``app.engine.state_machine``; every such write bumps ``version``.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ARRAY,
    BigInteger,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base

TS = DateTime(timezone=True)


class Run(Base):
    __tablename__ = "run"
    __table_args__ = (
        # Keyset pagination of the run list, newest first, optionally by status or workflow.
        Index("ix_run_tenant_created", "tenant_id", text("created_at DESC"), text("id DESC")),
        # The reconciler's search for runs past their timeout_s looks at active runs only.
        Index("ix_run_active", "id", postgresql_where=text("status IN ('queued', 'running', 'waiting')")),
        Index(
            "ix_run_tenant_status_created", "tenant_id", "status", text("created_at DESC"), text("id DESC")
        ),
        # It carries status and finished_at: a workflow's reliability figures read a window from it alone.
        Index(
            "ix_run_tenant_workflow_created",
            "tenant_id",
            "workflow_name",
            text("created_at DESC"),
            text("id DESC"),
            postgresql_include=["status", "finished_at"],
        ),
        # The list's filter by why the engine paused or failed a run: few runs have a reason.
        Index(
            "ix_run_tenant_reason_created", "tenant_id", "status_reason", text("created_at DESC"), text("id DESC"),
            postgresql_where=text("status_reason IS NOT NULL"),
        ),
        Index(
            "uq_run_tenant_idempotency_key",
            "tenant_id",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenant.id", ondelete="CASCADE"))
    workflow_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workflow.id", ondelete="CASCADE"))
    workflow_version_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workflow_version.id"))
    workflow_name: Mapped[str] = mapped_column(String(128))
    workflow_version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    priority: Mapped[str] = mapped_column(String(8))
    input: Mapped[Any] = mapped_column(JSONB)
    output: Mapped[Any | None] = mapped_column(JSONB)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    created_by: Mapped[str | None] = mapped_column(String(255))
    # The starter's roles when the run began: tools with required_roles check them.
    principal_roles: Mapped[list[str]] = mapped_column(ARRAY(Text), server_default="{}")
    # Why the run is paused or failed by a guardrail (e.g. "budget_exhausted"); cleared on resume.
    status_reason: Mapped[str | None] = mapped_column(String(64))
    # W3C traceparent of the request that started the run (when tracing is on): its trace is the run's first.
    trace_context: Mapped[str | None] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(TS, server_default=func.clock_timestamp())
    started_at: Mapped[datetime | None] = mapped_column(TS)
    finished_at: Mapped[datetime | None] = mapped_column(TS)
    updated_at: Mapped[datetime] = mapped_column(TS, server_default=func.clock_timestamp())


class StepRun(Base):
    """One row per step of a run, plus one per item of a ``map`` step (``map_index`` set)."""

    __tablename__ = "step_run"
    __table_args__ = (
        UniqueConstraint("run_id", "step_id", "map_index", postgresql_nulls_not_distinct=True),
        # The reconciler's scans: expired leases and due wait timeouts.
        Index("ix_step_run_lease", "lease_expires_at", postgresql_where=text("status = 'running'")),
        # A workflow's agent success rate: the tenant's agent steps of a window.
        Index("ix_step_run_agent", "tenant_id", "created_at", postgresql_where=text("kind = 'agent'")),
        Index("ix_step_run_wait_deadline", "wait_deadline", postgresql_where=text("status = 'waiting'")),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenant.id", ondelete="CASCADE"))
    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"))
    step_id: Mapped[str] = mapped_column(String(64))
    map_index: Mapped[int | None] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(8))
    status: Mapped[str] = mapped_column(String(16))
    version: Mapped[int] = mapped_column(Integer, default=1)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    current_attempt_id: Mapped[uuid.UUID | None] = mapped_column()
    input: Mapped[Any | None] = mapped_column(JSONB)
    output: Mapped[Any | None] = mapped_column(JSONB)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(TS)
    wait_deadline: Mapped[datetime | None] = mapped_column(TS)
    created_at: Mapped[datetime] = mapped_column(TS, server_default=func.clock_timestamp())
    started_at: Mapped[datetime | None] = mapped_column(TS)
    finished_at: Mapped[datetime | None] = mapped_column(TS)


class StepAttempt(Base):
    """One execution attempt of a step; its id is the arq job id that carries it."""

    __tablename__ = "step_attempt"
    __table_args__ = (
        UniqueConstraint("step_run_id", "n"),
        Index("ix_step_attempt_run_id", "run_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenant.id", ondelete="CASCADE"))
    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"))
    step_run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("step_run.id", ondelete="CASCADE"))
    n: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    # The arq job executing this attempt: the attempt's own id, or the job of the worker that
    # continued the run inline. Cancel aborts this job.
    job_id: Mapped[str | None] = mapped_column(String(64))
    worker: Mapped[str | None] = mapped_column(String(128))
    not_before: Mapped[datetime | None] = mapped_column(TS)
    queued_at: Mapped[datetime] = mapped_column(TS, server_default=func.clock_timestamp())
    started_at: Mapped[datetime | None] = mapped_column(TS)
    finished_at: Mapped[datetime | None] = mapped_column(TS)
    error_class: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    # W3C traceparent of what queued the attempt (a request, or the attempt before it in the worker).
    trace_context: Mapped[str | None] = mapped_column(String(64))


class RunEvent(Base):
    """Append-only trace of a run."""

    __tablename__ = "run_event"
    __table_args__ = (
        Index("ix_run_event_run_id_id", "run_id", "id"),
        # A workflow's dependency health: the tenant's tool and model call events of a window.
        Index("ix_run_event_calls", "tenant_id", "created_at", postgresql_where=text(
            "type IN ('tool_called', 'tool_call_failed', 'model_called', 'model_call_failed')")),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenant.id", ondelete="CASCADE"))
    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"))
    step_id: Mapped[str | None] = mapped_column(String(64))
    map_index: Mapped[int | None] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(48))
    data: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    created_at: Mapped[datetime] = mapped_column(TS, server_default=func.clock_timestamp())
    # The trace of the span the event was written in (when tracing is on).
    trace_id: Mapped[str | None] = mapped_column(String(32))


class AgentCheckpoint(Base):
    """One completed model turn or tool call of an agent step, written as it completes.

    A worker that resumes an agent step replays these instead of calling the model or the tool again.
    """

    __tablename__ = "agent_checkpoint"

    step_run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("step_run.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenant.id", ondelete="CASCADE"))
    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(8))  # model | tool
    call_id: Mapped[str | None] = mapped_column(String(128))
    data: Mapped[dict[str, Any]] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(TS, server_default=func.clock_timestamp())
