"""Audit rows are sealed after commit: written unsealed in the action's transaction, chained by a sealer.

- ``audit_event.seq``, ``prev_hash``, ``hash`` may be NULL (an unsealed row), all three or none of them;
  a partial index finds each tenant's unsealed rows in ``id`` order (the sealing order).
- The append-only trigger lets through exactly the sealing UPDATE (those three columns from NULL to
  values, every other column unchanged), and retention's DELETE only for sealed rows.

Revision ID: 9e2b7c4d1f58
Revises: 7e4f1c9a5b32
Create Date: 2026-12-03 20:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "9e2b7c4d1f58"
down_revision: str | None = "7e4f1c9a5b32"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SEALED = "{seq,prev_hash,hash}"


def upgrade() -> None:
    for column in ("seq", "prev_hash", "hash"):
        op.alter_column("audit_event", column, nullable=True)
    # NOT VALID, then validated: the scan of existing rows does not block writers.
    op.execute("ALTER TABLE audit_event ADD CONSTRAINT ck_audit_event_sealed CHECK "
               "((seq IS NULL) = (prev_hash IS NULL) AND (seq IS NULL) = (hash IS NULL)) NOT VALID")
    op.execute("ALTER TABLE audit_event VALIDATE CONSTRAINT ck_audit_event_sealed")
    op.create_index("ix_audit_event_unsealed", "audit_event", ["tenant_id", "id"],
                    postgresql_where=sa.text("seq IS NULL"))
    op.execute(f"""
        CREATE OR REPLACE FUNCTION steward_audit_guard() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'DELETE' THEN
                IF OLD.seq IS NOT NULL AND current_setting('steward.audit_retention', true) = 'on' THEN
                    RETURN OLD;
                END IF;
            ELSIF TG_OP = 'UPDATE' THEN
                -- Sealing: the chain's columns go from NULL to values, nothing else changes.
                IF OLD.seq IS NULL AND OLD.prev_hash IS NULL AND OLD.hash IS NULL
                   AND NEW.seq IS NOT NULL AND NEW.prev_hash IS NOT NULL AND NEW.hash IS NOT NULL THEN
                    IF to_jsonb(NEW) - '{SEALED}'::text[] = to_jsonb(OLD) - '{SEALED}'::text[] THEN
                        RETURN NEW;
                    END IF;
                END IF;
            END IF;
            RAISE EXCEPTION 'audit_event is append-only (% refused)', TG_OP USING ERRCODE = 'insufficient_privilege';
        END $$
    """)


def downgrade() -> None:
    op.execute("""
        DO $$ BEGIN
            IF EXISTS (SELECT FROM audit_event WHERE seq IS NULL) THEN
                RAISE EXCEPTION 'audit_event has unsealed rows: run `steward audit seal` first';
            END IF;
        END $$
    """)
    op.execute("""
        CREATE OR REPLACE FUNCTION steward_audit_guard() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'DELETE' AND current_setting('steward.audit_retention', true) = 'on' THEN
                RETURN OLD;
            END IF;
            RAISE EXCEPTION 'audit_event is append-only (% refused)', TG_OP USING ERRCODE = 'insufficient_privilege';
        END $$
    """)
    op.drop_index("ix_audit_event_unsealed", table_name="audit_event")
    op.execute("ALTER TABLE audit_event DROP CONSTRAINT ck_audit_event_sealed")
    for column in ("seq", "prev_hash", "hash"):
        op.alter_column("audit_event", column, nullable=False)
