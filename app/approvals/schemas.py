"""What the approval endpoints take and return."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

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
