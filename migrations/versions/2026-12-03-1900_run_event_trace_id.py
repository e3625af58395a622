"""Run events keep the trace id of the span they were written in (with tracing on), so the API and the
dashboard can link an event to its trace.

Revision ID: 7e4f1c9a5b32
Revises: 6d3e0b8f4a21
Create Date: 2026-12-03 19:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "7e4f1c9a5b32"
down_revision: str | None = "6d3e0b8f4a21"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("run_event", sa.Column("trace_id", sa.String(32), nullable=True))


def downgrade() -> None:
    op.drop_column("run_event", "trace_id")
