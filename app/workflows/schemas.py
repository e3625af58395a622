"""Request and response bodies of the workflow API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"

WorkflowName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]


class WorkflowCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "greet",
                    "description": "Say hello",
                    "definition": {
                        "steps": [{"id": "hello", "tool": "echo", "args": {"text": "hi ${{ input.who }}"}}]
                    },
                }
            ]
        },
    )

    name: WorkflowName
    definition: dict[str, Any] = Field(
        description="The workflow: `steps`, and optionally `input_schema` (JSON Schema) and `limits`."
    )
    description: str | None = Field(default=None, max_length=2000)


class WorkflowVersionRead(BaseModel):
    id: uuid.UUID = Field(description="The id of this version")
    name: str
    version: int
    created_at: datetime
    definition: dict[str, Any]
    description: str | None = None


class WorkflowVersionSummary(BaseModel):
    id: uuid.UUID
    name: str
    version: int
    created_at: datetime
    definition_hash: str


class WorkflowSummary(BaseModel):
    name: str
    latest_version: int
    created_at: datetime
    updated_at: datetime


class WorkflowPage(BaseModel):
    items: list[WorkflowSummary]
    next_cursor: str | None = Field(description="Pass as `cursor` to get the next page; null on the last")


class WorkflowVersionPage(BaseModel):
    items: list[WorkflowVersionSummary]
    next_cursor: str | None


class RunCounts(BaseModel):
    total: int
    by_status: dict[str, int] = Field(description="Runs of the window by their status now")


class Durations(BaseModel):
    p50: float | None
    p95: float | None
    p99: float | None


class Dependency(BaseModel):
    kind: Literal["tool", "provider"]
    name: str
    calls: int
    success_rate: float | None


class Objective(BaseModel):
    success_rate: float
    window: str
    finished: int
    failed: int
    allowed_failures: float = Field(description="Failures the objective allows over its window, at this volume")
    error_budget_left: float | None = Field(
        description="1 - failed / allowed_failures: 1 untouched, 0 spent, below 0 overspent; null with no finished run"
    )


class WorkflowStats(BaseModel):
    """Reliability figures of the runs created in the window (docs/api.md, "Workflow reliability")."""

    workflow: str
    window: str
    since: datetime
    until: datetime
    runs: RunCounts
    completion_rate: float | None = Field(description="Finished runs over all runs of the window")
    success_rate: float | None = Field(description="Succeeded over finished runs")
    agent_success_rate: float | None = Field(description="Agent steps that succeeded without intervention")
    agent_steps: int = Field(description="Agent steps that finished")
    duration_s: Durations = Field(description="Of finished runs, from creation to the end")
    cost_per_run_usd: str | None
    mtbf_s: float | None = Field(description="Mean time between failed runs")
    mttr_s: float | None = Field(description="Mean time from a failure to the next success")
    dependencies: list[Dependency]
    objective: Objective | None = Field(description="With `slo` in the latest definition")
