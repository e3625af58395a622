"""What the approval endpoints take and return."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.textdiff import DiffLine

Status = Literal["pending", "approved", "rejected", "expired", "cancelled"]


class ApprovalRead(BaseModel):
    id: uuid.UUID
    run_id: uuid.UUID
    step_id: str
    kind: str = Field(description="step (an approval step), tool (a gated tool step) or agent (an agent's call)")
    call_id: str | None
    tool: str | None
    tool_version: int | None
    args: Any = Field(description="The proposed arguments")
    approved_args: Any = Field(default=None, description="The arguments approved, when an approver edited them")
    reason: str | None
    status: Status
    requested_by: str | None
    requested_at: datetime
    expires_at: datetime | None
    on_expiry: str
    flagged: bool = Field(description="It expired under the 'flag' policy and still awaits a decision")
    decided_by: str | None
    decided_at: datetime | None
    comment: str | None


class ApprovalPage(BaseModel):
    items: list[ApprovalRead]
    next_cursor: str | None


class Decision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decision: Literal["approve", "reject"]
    args: dict[str, Any] | None = Field(
        default=None, description="Approve these arguments instead (checked against the tool's schema)"
    )
    comment: str | None = Field(default=None, max_length=2000)


class TurnCall(BaseModel):
    name: str
    this_request: bool = Field(description="The call this approval gates")


class ModelTurn(BaseModel):
    """An agent's last model turn before its gated call: what it said and the calls it asked for."""

    seq: int
    content: str | None
    truncated: bool = Field(description="The content was cut for the inbox; the run's conversation has it all")
    tool_calls: list[TurnCall]
    created_at: datetime


class InboxItem(BaseModel):
    """A pending approval with what an approver needs beside it."""

    approval: ApprovalRead
    workflow: str
    workflow_version: int
    run_cost_usd: str | None = Field(description="What the run has spent so far (settled model and tool costs)")
    last_turn: ModelTurn | None = Field(description="For an agent's call: the model turn that proposed it")
    requested_by_name: str | None
    blocked: str | None = Field(description="Why this caller may not decide it (None: they may)")


class Inbox(BaseModel):
    items: list[InboxItem]
    next_cursor: str | None


class ArgsCheck(BaseModel):
    """Edited arguments checked against the tool version's input schema, and what the edit changed."""

    approval_id: uuid.UUID
    tool: str | None
    tool_version: int | None
    errors: list[dict[str, str]] = Field(description="[{pointer, message}]: pointers into the arguments")
    changed: bool
    diff: list[DiffLine] = Field(description="The proposed arguments against the edited ones, as indented JSON")
