"""Budget reservations of tenants without caps stay off the tenant's hour and day windows: ``windowed``
says whether a reservation's amounts are in ``budget_window`` yet; the reconciler folds the settled
ones in, in batches. A partial index finds the ones not yet folded, for readers and capped reservations.

Revision ID: 8a41c7e2b9d5
Revises: 9e2b7c4d1f58
Create Date: 2026-12-03 21:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "8a41c7e2b9d5"
down_revision: str | None = "9e2b7c4d1f58"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("budget_reservation",
                  sa.Column("windowed", sa.Boolean(), nullable=False, server_default=sa.text("true")))
    op.create_index("ix_budget_reservation_unwindowed", "budget_reservation", ["tenant_id", "day_start", "hour_start"],
                    postgresql_where=sa.text("NOT windowed"))


def downgrade() -> None:
    # Without the flag every reservation is taken to be in the windows: put the ones not yet there in.
    op.execute(
        "INSERT INTO budget_window (tenant_id, period, start, spent_usd, reserved_usd) "
        "SELECT tenant_id, p.period, CASE p.period WHEN 'hour' THEN hour_start ELSE day_start END, "
        "coalesce(sum(actual_usd) FILTER (WHERE status = 'settled'), 0), "
        "coalesce(sum(amount_usd) FILTER (WHERE status = 'held'), 0) "
        "FROM budget_reservation CROSS JOIN (VALUES ('hour'), ('day')) AS p (period) WHERE NOT windowed "
        "GROUP BY 1, 2, 3 ON CONFLICT (tenant_id, period, start) DO UPDATE SET "
        "spent_usd = budget_window.spent_usd + excluded.spent_usd, "
        "reserved_usd = budget_window.reserved_usd + excluded.reserved_usd"
    )
    op.drop_index("ix_budget_reservation_unwindowed", table_name="budget_reservation")
    op.drop_column("budget_reservation", "windowed")
