"""Trace context crosses the queue durably: a run keeps the W3C traceparent of the request that started it,
and each step attempt the one of whatever queued it, so a worker's spans continue those traces.

Revision ID: 6d3e0b8f4a21
Revises: 5c2d9a7e3f10
Create Date: 2026-12-03 18:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "6d3e0b8f4a21"
down_revision: str | None = "5c2d9a7e3f10"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("run", sa.Column("trace_context", sa.String(64), nullable=True))
    op.add_column("step_attempt", sa.Column("trace_context", sa.String(64), nullable=True))


def downgrade() -> None:
    op.drop_column("step_attempt", "trace_context")
    op.drop_column("run", "trace_context")
