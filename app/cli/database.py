"""``steward migrate`` and ``steward bootstrap``, and the demo tenant ``steward up`` makes."""

from __future__ import annotations

import argparse
import asyncio
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.cli.common import check_database, load_settings, raise_if_not_migrated, require_urls, session

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

DEMO_TENANT = "demo"


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    migrate = sub.add_parser("migrate", help="upgrade the database schema (needs DATABASE_URL)")
    migrate.set_defaults(handler=cmd_migrate)

    bootstrap = sub.add_parser(
        "bootstrap", help="create a tenant if needed and print a new admin API key (needs DATABASE_URL)"
    )
    bootstrap.add_argument("--tenant", default=DEMO_TENANT, help=f"tenant name (default: {DEMO_TENANT})")
    bootstrap.set_defaults(handler=cmd_bootstrap)


def cmd_migrate(args: argparse.Namespace) -> int:
    database_url, _ = require_urls(load_settings(), redis=False)
    check_database(database_url)
    migrate(database_url)
    print("Database schema is up to date.")
    return 0


def migrate(database_url: str) -> None:
    from app.db import run_migrations

    run_migrations(database_url)


def cmd_bootstrap(args: argparse.Namespace) -> int:
    database_url, _ = require_urls(load_settings(), redis=False)
    check_database(database_url)
    created, key, password = asyncio.run(_bootstrap(database_url, args.tenant))
    print(f"Tenant '{args.tenant}' {'created' if created else 'exists'}.")
    print(f"New admin API key (shown once, store it now): {key}")
    if password:
        print(f"Local sign-in (loopback only, no identity provider configured): admin / {password} (shown once)")
    return 0


async def _local_admin(db: AsyncSession, tenant_id: uuid.UUID) -> str | None:
    """Without an identity provider, the bootstrap admin signs in locally: its new password, if any."""
    if load_settings().oidc_issuer:
        return None
    from app.auth.local import ensure_local_admin
    from app.pg import driver

    return await ensure_local_admin(await driver(db), tenant_id)


async def _bootstrap(database_url: str, tenant: str) -> tuple[bool, str, str | None]:
    from app.tenants.service import bootstrap_tenant

    async with session(database_url) as db:
        try:
            result = await bootstrap_tenant(db, tenant)
        except Exception as exc:
            raise_if_not_migrated(exc)
            raise
        password = await _local_admin(db, result.tenant_id)
        await db.commit()
    return result.tenant_created, result.api_key, password


@dataclass(frozen=True)
class DemoTenant:
    api_key: str | None  # set only on the run that created the tenant
    workflows_loaded: list[str]
    local_password: str | None = None  # the local admin's, set only when first made


async def bootstrap_demo(database_url: str, tenant: str) -> DemoTenant:
    """Create the tenant and its first key once; on later starts keep the keys there are.

    ``bootstrap_tenant`` mints a key on every call: calling it on each ``steward up`` would leave a pile of
    valid admin keys that nobody ever saw.
    """
    from app.tenants.service import bootstrap_tenant, find_tenant
    from app.workflows.service import ensure_example_workflows

    async with session(database_url) as db:
        tenant_id = await find_tenant(db, tenant)
        key = None
        if tenant_id is None:
            result = await bootstrap_tenant(db, tenant)
            tenant_id, key = result.tenant_id, result.api_key
        password = await _local_admin(db, tenant_id)
        loaded = await ensure_example_workflows(db, tenant_id)
        await db.commit()
    return DemoTenant(api_key=key, workflows_loaded=list(loaded), local_password=password)
