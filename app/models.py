"""Every table, imported in one place for Alembic and the tests."""

from app.approvals.models import Approval
from app.audit.models import AuditEvent, AuditHead
from app.auth.models import Membership, User, WebSession
from app.budgets.models import Budget, BudgetWindow, Reservation, RunUsage
from app.db import Base
from app.engine.models import Outbox
from app.providers.models import Provider
from app.runs.models import AgentCheckpoint, Run, RunEvent, StepAttempt, StepRun
from app.tenants.models import ApiKey, Tenant
from app.tools.models import Tool, ToolVersion
from app.vault.models import Secret
from app.workflows.models import Workflow, WorkflowVersion

__all__ = [
    "AgentCheckpoint",
    "ApiKey",
    "Approval",
    "AuditEvent",
    "AuditHead",
    "Base",
    "Budget",
    "BudgetWindow",
    "Membership",
    "Outbox",
    "Provider",
    "Reservation",
    "Run",
    "RunEvent",
    "RunUsage",
    "Secret",
    "StepAttempt",
    "StepRun",
    "Tenant",
    "Tool",
    "ToolVersion",
    "User",
    "WebSession",
    "Workflow",
    "WorkflowVersion",
]
