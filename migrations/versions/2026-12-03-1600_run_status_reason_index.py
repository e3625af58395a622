"""The runs list filters by status_reason (budget_exhausted, run_timeout): an index per tenant, newest first,
of the few runs that have one, so that filter stays a short index scan at a million runs.

Revision ID: 4b8e1f0c2d77
Revises: 7a0da582fb54
Create Date: 2026-12-03 16:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "4b8e1f0c2d77"
down_revision: str | None = "7a0da582fb54"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_run_tenant_reason_created", "run",
                    ["tenant_id", "status_reason", sa.text("created_at DESC"), sa.text("id DESC")],
                    postgresql_where=sa.text("status_reason IS NOT NULL"))


def downgrade() -> None:
    op.drop_index("ix_run_tenant_reason_created", table_name="run")
