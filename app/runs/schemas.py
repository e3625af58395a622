from __future__ import annotations

import math
import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.db import INT32_MAX
from app.workflows.steps import MAX_LIMITS

Priority = Literal["high", "normal", "low"]


def json_value(value: Any) -> Any:
    """Reject what Python's JSON parser lets through but JSON (and Postgres JSONB) does not: NaN, Infinity."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError("NaN and Infinity are not valid JSON numbers")
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return value


class RunLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_steps: int | None = Field(
        default=None, ge=1, le=MAX_LIMITS["max_steps"],
        description="Agent steps: the model turns of agent steps and the tool calls they choose (default 25). "
        "Tool steps and map items, which the workflow's definition bounds, do not count",
    )
    max_tokens: int | None = Field(
        default=None, ge=1, le=MAX_LIMITS["max_tokens"], description="Model tokens (default 100,000)"
    )
    max_cost_usd: float | None = Field(default=None, gt=0, le=MAX_LIMITS["max_cost_usd"])
    timeout_s: float | None = Field(
        default=None, gt=0, le=MAX_LIMITS["timeout_s"], description="Seconds (at most about 31 years)"
    )

    def given(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class RunCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workflow: str = Field(min_length=1, max_length=128)
    version: int | None = Field(default=None, ge=1, le=INT32_MAX, description="Default: the latest")
    input: Any = Field(default_factory=dict)
    priority: Priority = "normal"
    limits: RunLimits | None = Field(
        default=None, description="Tighter or looser limits for this run, within the tenant's maximums"
    )

    _finite = field_validator("input")(json_value)



class SignalBody(BaseModel):
    """Any JSON value; it becomes the waiting step's output."""

    model_config = ConfigDict(extra="forbid")

    payload: Any = None

    _finite = field_validator("payload")(json_value)


class AttemptRead(BaseModel):
    n: int
    status: str
    queued_at: datetime
    not_before: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    error: dict[str, Any] | None
    worker: str | None


class ItemRead(BaseModel):
    index: int
    status: str
    output: Any
    error: dict[str, Any] | None
    started_at: datetime | None
    finished_at: datetime | None
    attempts: list[AttemptRead]


class StepRead(BaseModel):
    id: str
    kind: str
    status: str
    input: Any
    output: Any
    error: dict[str, Any] | None
    started_at: datetime | None
    finished_at: datetime | None
    attempts: list[AttemptRead]
    items: list[ItemRead] | None = None


class EventRead(BaseModel):
    id: int
    type: str
    step_id: str | None
    map_index: int | None
    data: dict[str, Any]
    created_at: datetime
    trace_id: str | None = Field(default=None, description="The trace of the span the event was written in (with "
                                 "tracing on): the request or the step attempt that wrote it")


class RunSummary(BaseModel):
    id: uuid.UUID
    workflow: str
    workflow_version: int
    status: str
    status_reason: str | None = Field(
        default=None, description="Why the engine paused or failed the run: budget_exhausted, run_timeout"
    )
    priority: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class RunRead(RunSummary):
    input: Any
    output: Any
    error: dict[str, Any] | None
    trace_id: str | None = Field(default=None, description="The trace of the request that started the run (with "
                                 "tracing on): its worker spans continue it; later ones link to it")
    steps: list[StepRead]
    events: list[EventRead]
    events_truncated: bool


class RunUsageSummary(BaseModel):
    """What a run has used, against the limits in force (absent limits are not set)."""

    tokens: int
    cost_usd: str = Field(description="USD, as a decimal string")
    agent_steps: int = Field(description="agents' model turns and chosen tool calls (what max_steps limits)")
    limits: dict[str, Any]


class RunListItem(RunSummary):
    usage: RunUsageSummary | None = Field(description="null for a run without a usage record, and for callers "
                                                      "without budgets:read")
    pending_approvals: int = Field(description="the run's approval requests waiting for a decision")


class RunPage(BaseModel):
    items: list[RunListItem]
    next_cursor: str | None


class BulkOutcome(BaseModel):
    """One run's answer to a bulk action: ``done``, ``not_allowed`` (the run's status rules it out),
    ``not_found`` (no such run in this tenant) or ``conflict`` (it changed meanwhile: try again)."""

    run_id: uuid.UUID
    outcome: str
    status: str | None = Field(default=None, description="the run's status after the action, or why not")
    detail: str | None = None


class EventPage(BaseModel):
    items: list[EventRead]
    next_cursor: int | None


class ConversationEntry(BaseModel):
    seq: int
    kind: str = Field(description="model (a model turn), tool (a tool result), note (a correction the agent "
                                  "sent), reset (a retried run started the conversation afresh)")
    call_id: str | None
    data: dict[str, Any]
    created_at: datetime


class ConversationPage(BaseModel):
    items: list[ConversationEntry]
    next_cursor: int | None
