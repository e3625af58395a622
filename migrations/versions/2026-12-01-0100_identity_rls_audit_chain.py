"""Identity (users, memberships, web sessions), row-level security, and the hash-chained audit log.

- ``app_user``, ``membership`` (per-tenant roles), ``web_session`` (server-side dashboard sessions).
- ``api_key`` gains ``last_used_at``, ``created_by``.
- ``audit_event`` gains ``seq``, ``prev_hash``, ``hash`` (a SHA-256 chain per tenant, see
  app/audit/chain.py), ``ip`` and ``user_agent``; ``audit_head`` holds each tenant's chain head. Rows
  written before this revision are chained here. A trigger refuses UPDATE and TRUNCATE, and DELETE
  unless the retention job says so (``steward.audit_retention = on``).
- The application role (``STEWARD_DB_APP_ROLE``, default ``steward_app``): created when missing
  (NOLOGIN), granted to the migrating user so the API can ``SET ROLE`` to it, and given DML on every
  table except UPDATE/DELETE on ``audit_event`` and anything on ``web_session``/``alembic_version``.
- Row-level security on every tenant-owned table, keyed on the transaction-local setting
  ``steward.tenant_id``. The table owner (the migrating user, which the engine's workers use) is not
  subject to it; the application role is.

Revision ID: 7a3f9c2e4d10
Revises: 5c1d2e7a9b40
Create Date: 2026-12-01 01:00:00
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID

revision: str = "7a3f9c2e4d10"
down_revision: str | None = "5c1d2e7a9b40"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Every table with a tenant_id column. New tenant-owned tables must be added to RLS in their migration.
TENANT_TABLES = (
    "api_key", "audit_event", "audit_head", "secret", "provider", "tool", "tool_version", "workflow",
    "workflow_version", "run", "step_run", "step_attempt", "run_event", "outbox", "approval", "budget",
    "budget_window", "run_usage", "budget_reservation", "agent_checkpoint", "membership",
)
TENANT = "NULLIF(current_setting('steward.tenant_id', true), '')::uuid"


def app_role() -> str:
    role = context.config.attributes.get("app_role") or os.environ.get("STEWARD_DB_APP_ROLE", "steward_app")
    if not role.replace("_", "").isalnum():
        raise ValueError(f"STEWARD_DB_APP_ROLE must be a plain identifier, not {role!r}")
    return str(role)


def upgrade() -> None:
    ts = sa.DateTime(timezone=True)
    op.create_table(
        "app_user",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        sa.Column("issuer", sa.String(255), nullable=False),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("email", sa.String(320)),
        sa.Column("name", sa.String(255)),
        # Local sign-in only (no identity provider configured): scrypt hash of the bootstrap password.
        sa.Column("password_hash", sa.String(255)),
        sa.Column("created_at", ts, server_default=sa.func.now(), nullable=False),
        sa.Column("last_login_at", ts),
        sa.UniqueConstraint("issuer", "subject", name="uq_app_user_issuer_subject"),
    )
    op.create_table(
        "membership",
        sa.Column("tenant_id", UUID(as_uuid=True), sa.ForeignKey("tenant.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("user_id", UUID(as_uuid=True), sa.ForeignKey("app_user.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("roles", ARRAY(sa.Text), nullable=False),
        sa.Column("created_by", sa.String(255)),
        sa.Column("created_at", ts, server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", ts, server_default=sa.func.now(), nullable=False),
    )
    op.create_index("ix_membership_user_id", "membership", ["user_id"])
    op.create_table(
        "web_session",
        # SHA-256 of the cookie's random token: a leaked table does not give away live sessions.
        sa.Column("id_hash", sa.String(64), primary_key=True),
        sa.Column("user_id", UUID(as_uuid=True), sa.ForeignKey("app_user.id", ondelete="CASCADE"), nullable=False),
        sa.Column("tenant_id", UUID(as_uuid=True), sa.ForeignKey("tenant.id", ondelete="SET NULL")),
        sa.Column("csrf_token", sa.String(64), nullable=False),
        # Claims kept from sign-in: groups (for role mapping), name, email; id_token for end-session.
        sa.Column("claims", JSONB, server_default="{}", nullable=False),
        sa.Column("id_token", sa.Text),
        sa.Column("ip", sa.String(64)),
        sa.Column("user_agent", sa.String(512)),
        sa.Column("created_at", ts, server_default=sa.func.now(), nullable=False),
        sa.Column("last_seen_at", ts, server_default=sa.func.now(), nullable=False),
        sa.Column("expires_at", ts, nullable=False),
    )
    op.create_index("ix_web_session_user_id", "web_session", ["user_id"])
    op.create_index("ix_web_session_expires_at", "web_session", ["expires_at"])
    # Sign-in purges sessions past either timeout: both columns indexed, so it never scans the table.
    op.create_index("ix_web_session_last_seen_at", "web_session", ["last_seen_at"])

    op.add_column("api_key", sa.Column("last_used_at", ts))
    op.add_column("api_key", sa.Column("created_by", sa.String(255)))

    op.add_column("audit_event", sa.Column("seq", sa.BigInteger))
    op.add_column("audit_event", sa.Column("prev_hash", sa.String(64)))
    op.add_column("audit_event", sa.Column("hash", sa.String(64)))
    op.add_column("audit_event", sa.Column("ip", sa.String(64)))
    op.add_column("audit_event", sa.Column("user_agent", sa.String(512)))
    op.create_table(
        "audit_head",
        sa.Column("tenant_id", UUID(as_uuid=True), sa.ForeignKey("tenant.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    _chain_existing_rows()
    for column in ("seq", "prev_hash", "hash"):
        op.alter_column("audit_event", column, nullable=False)
    op.create_index("uq_audit_event_tenant_seq", "audit_event", ["tenant_id", "seq"], unique=True)
    op.create_index("ix_audit_event_tenant_at", "audit_event", ["tenant_id", "at"])
    # Every reader goes by (tenant, seq) or (tenant, at) now: one index less to write per event.
    op.drop_index("ix_audit_event_tenant_id_id", table_name="audit_event")
    op.execute("""
        CREATE FUNCTION steward_audit_guard() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'DELETE' AND current_setting('steward.audit_retention', true) = 'on' THEN
                RETURN OLD;
            END IF;
            RAISE EXCEPTION 'audit_event is append-only (% refused)', TG_OP USING ERRCODE = 'insufficient_privilege';
        END $$
    """)
    op.execute("CREATE TRIGGER audit_event_append_only BEFORE UPDATE OR DELETE ON audit_event "
               "FOR EACH ROW EXECUTE FUNCTION steward_audit_guard()")
    op.execute("CREATE TRIGGER audit_event_no_truncate BEFORE TRUNCATE ON audit_event "
               "FOR EACH STATEMENT EXECUTE FUNCTION steward_audit_guard()")

    role = app_role()
    op.execute(f"""
        DO $$ BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN
                CREATE ROLE {role} NOLOGIN NOSUPERUSER NOBYPASSRLS;
            END IF;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;  -- created concurrently: fine
        END $$
    """)
    op.execute(f"""
        DO $$ BEGIN
            IF NOT pg_has_role(current_user, '{role}', 'MEMBER') THEN
                EXECUTE format('GRANT %I TO %I', '{role}', current_user);
            END IF;
        END $$
    """)
    op.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}")
    op.execute(f"REVOKE ALL ON alembic_version, web_session FROM {role}")
    op.execute(f"REVOKE UPDATE, DELETE, TRUNCATE ON audit_event FROM {role}")
    op.execute(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}")

    # API-key sign-in happens before the tenant is known: this owner-run function finds the key by its
    # hash and, when the key is usable, scopes the rest of the transaction to its tenant.
    op.execute("""
        CREATE FUNCTION steward_api_key_auth(p_hash text)
        RETURNS TABLE (id uuid, tenant_id uuid, roles text[], revoked_at timestamptz, expires_at timestamptz)
        LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
            SELECT k.id, k.tenant_id, k.roles, k.revoked_at, k.expires_at FROM api_key k
            WHERE k.key_hash = p_hash
              AND CASE WHEN k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now())
                       THEN set_config('steward.tenant_id', k.tenant_id::text, true) IS NOT NULL
                       ELSE true END
        $$
    """)
    op.execute("REVOKE ALL ON FUNCTION steward_api_key_auth(text) FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION steward_api_key_auth(text) TO {role}")

    for table in TENANT_TABLES:
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(f"CREATE POLICY tenant_isolation ON {table} USING (tenant_id = {TENANT}) "
                   f"WITH CHECK (tenant_id = {TENANT})")
    op.execute("ALTER TABLE tenant ENABLE ROW LEVEL SECURITY")
    op.execute(f"CREATE POLICY tenant_isolation ON tenant USING (id = {TENANT}) WITH CHECK (id = {TENANT})")
    # A user is visible to a tenant's principals only while a member of it (membership is itself
    # filtered by tenant).
    op.execute("ALTER TABLE app_user ENABLE ROW LEVEL SECURITY")
    op.execute("CREATE POLICY tenant_members ON app_user USING "
               "(EXISTS (SELECT 1 FROM membership m WHERE m.user_id = app_user.id))")


def _chain_existing_rows() -> None:
    """Give rows written before the chain existed their place in it, in id order per tenant."""
    from app.audit.chain import GENESIS, ChainRow, row_hash

    bind = op.get_bind()
    heads: dict[object, tuple[int, str]] = {}
    rows = bind.execute(sa.text(
        "SELECT id, tenant_id, at, actor, action, target, outcome, data FROM audit_event ORDER BY tenant_id, id"
    )).mappings()
    for row in rows:
        seq, prev = heads.get(row["tenant_id"], (0, GENESIS))
        chained = ChainRow(tenant_id=row["tenant_id"], seq=seq + 1, at=row["at"], actor=row["actor"], ip=None,
                           user_agent=None, action=row["action"], target=row["target"], outcome=row["outcome"],
                           data=row["data"], prev_hash=prev)
        digest = row_hash(chained)
        bind.execute(sa.text("UPDATE audit_event SET seq = :seq, prev_hash = :prev, hash = :hash WHERE id = :id"),
                     {"seq": seq + 1, "prev": prev, "hash": digest, "id": row["id"]})
        heads[row["tenant_id"]] = (seq + 1, digest)
    for tenant_id, (seq, digest) in heads.items():
        bind.execute(sa.text("INSERT INTO audit_head (tenant_id, seq, hash) VALUES (:t, :s, :h)"),
                     {"t": tenant_id, "s": seq, "h": digest})


def downgrade() -> None:
    role = app_role()
    op.execute("DROP FUNCTION steward_api_key_auth(text)")
    op.execute("DROP POLICY tenant_members ON app_user")
    op.execute("ALTER TABLE app_user DISABLE ROW LEVEL SECURITY")
    op.execute("DROP POLICY tenant_isolation ON tenant")
    op.execute("ALTER TABLE tenant DISABLE ROW LEVEL SECURITY")
    for table in TENANT_TABLES:
        if table in ("membership", "audit_head"):
            continue
        op.execute(f"DROP POLICY tenant_isolation ON {table}")
        op.execute(f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY")
    op.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}")
    op.execute(f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {role}")
    op.execute(f"REVOKE USAGE ON SCHEMA public FROM {role}")
    op.execute("DROP TRIGGER audit_event_no_truncate ON audit_event")
    op.execute("DROP TRIGGER audit_event_append_only ON audit_event")
    op.execute("DROP FUNCTION steward_audit_guard()")
    op.create_index("ix_audit_event_tenant_id_id", "audit_event", ["tenant_id", "id"])
    op.drop_index("ix_audit_event_tenant_at", table_name="audit_event")
    op.drop_index("uq_audit_event_tenant_seq", table_name="audit_event")
    op.drop_table("audit_head")
    for column in ("user_agent", "ip", "hash", "prev_hash", "seq"):
        op.drop_column("audit_event", column)
    op.drop_column("api_key", "created_by")
    op.drop_column("api_key", "last_used_at")
    op.drop_table("web_session")
    op.drop_table("membership")
    op.drop_table("app_user")
