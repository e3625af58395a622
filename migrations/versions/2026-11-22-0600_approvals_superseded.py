"""Approvals of a retried run are superseded rather than reused; approvals indexed by run; active runs.

Revision ID: 5c1d2e7a9b40
Revises: 819ffbb8870a
Create Date: 2026-11-22 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5c1d2e7a9b40"
down_revision: str | None = "819ffbb8870a"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("approval", sa.Column("superseded_at", sa.DateTime(timezone=True), nullable=True))
    op.drop_constraint("uq_approval_step_run_id_call_id", "approval", type_="unique")
    op.create_index("uq_approval_current_call", "approval", ["step_run_id", "call_id"], unique=True,
                    postgresql_where=sa.text("superseded_at IS NULL"))
    op.create_index("ix_approval_tenant_run", "approval", ["tenant_id", "run_id"])
    op.create_index("ix_run_active", "run", ["id"],
                    postgresql_where=sa.text("status IN ('queued', 'running', 'waiting')"))


def downgrade() -> None:
    op.drop_index("ix_run_active", table_name="run")
    op.drop_index("ix_approval_tenant_run", table_name="approval")
    op.execute("DELETE FROM approval WHERE superseded_at IS NOT NULL")
    op.drop_index("uq_approval_current_call", table_name="approval")
    op.create_unique_constraint("uq_approval_step_run_id_call_id", "approval", ["step_run_id", "call_id"])
    op.drop_column("approval", "superseded_at")
