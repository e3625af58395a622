"""Providers name the request parameter that caps an answer: max_tokens, or max_completion_tokens
(OpenAI's reasoning models refuse max_tokens).

Revision ID: 7a0da582fb54
Revises: 7a3f9c2e4d10
Create Date: 2026-12-03 14:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "7a0da582fb54"
down_revision: str | None = "7a3f9c2e4d10"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("provider", sa.Column("max_tokens_param", sa.String(32), nullable=False,
                                        server_default="max_tokens"))
    op.create_check_constraint("max_tokens_param", "provider",
                               "max_tokens_param IN ('max_tokens', 'max_completion_tokens')")


def downgrade() -> None:
    op.drop_constraint(op.f("ck_provider_max_tokens_param"), "provider", type_="check")
    op.drop_column("provider", "max_tokens_param")
