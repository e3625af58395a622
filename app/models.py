"""Every table, imported in one place for Alembic and the tests."""

from app.db import Base
from app.engine.models import Outbox
from app.runs.models import Run, RunEvent, StepAttempt, StepRun
from app.tenants.models import ApiKey, Tenant
from app.workflows.models import Workflow, WorkflowVersion

__all__ = [
    "ApiKey",
    "Base",
    "Outbox",
    "Run",
    "RunEvent",
    "StepAttempt",
    "StepRun",
    "Tenant",
    "Workflow",
    "WorkflowVersion",
]
