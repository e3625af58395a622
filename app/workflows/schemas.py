"""Request and response bodies of the workflow API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

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
