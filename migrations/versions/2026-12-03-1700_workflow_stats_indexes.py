"""Workflow reliability figures stay fast at a million runs: the window's runs are read from the
workflow's index alone (it carries status and finished_at), and agent steps and tool/model call events
have small partial indexes by tenant and time.

Revision ID: 5c2d9a7e3f10
Revises: 4b8e1f0c2d77
Create Date: 2026-12-03 17:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5c2d9a7e3f10"
down_revision: str | None = "4b8e1f0c2d77"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CALLS = "type IN ('tool_called', 'tool_call_failed', 'model_called', 'model_call_failed')"
WORKFLOW_COLUMNS = ["tenant_id", "workflow_name", sa.text("created_at DESC"), sa.text("id DESC")]


def upgrade() -> None:
    op.drop_index("ix_run_tenant_workflow_created", table_name="run")
    op.create_index("ix_run_tenant_workflow_created", "run", WORKFLOW_COLUMNS,
                    postgresql_include=["status", "finished_at"])
    op.create_index("ix_step_run_agent", "step_run", ["tenant_id", "created_at"],
                    postgresql_where=sa.text("kind = 'agent'"))
    op.create_index("ix_run_event_calls", "run_event", ["tenant_id", "created_at"], postgresql_where=sa.text(CALLS))


def downgrade() -> None:
    op.drop_index("ix_run_event_calls", table_name="run_event")
    op.drop_index("ix_step_run_agent", table_name="step_run")
    op.drop_index("ix_run_tenant_workflow_created", table_name="run")
    op.create_index("ix_run_tenant_workflow_created", "run", WORKFLOW_COLUMNS)
