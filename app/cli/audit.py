"""``steward audit verify``, ``steward audit export`` and ``steward audit seal``: the audit log from the
command line.

All connect as the tables' owner through ``DATABASE_URL`` (no row-level security; every query filters on
the tenant). ``verify`` exits 1 when any chain is broken (or the database cannot be reached), printing the
first broken link of each; 2 on a usage error such as an unknown tenant. ``export`` writes the API's
bytes (app/audit/export.py) to a file, renamed into place only once complete, or to stdout. ``seal`` chains
every committed unsealed row now, as the workers' sealer does (app/audit/sealer.py): with no worker running,
or before a downgrade.

Imported when the ``steward`` parser is built: keep the heavy imports inside the commands.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from app.cli.common import (
    EXIT_USAGE,
    CliError,
    check_database,
    load_settings,
    raise_if_not_migrated,
    require_urls,
)

if TYPE_CHECKING:
    from app.audit.export import ExportFormat, Filters
    from app.audit.verify import Verification
    from app.pg import Conn

EXIT_BROKEN = 1


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``audit verify`` and ``audit export`` to the ``steward`` parser's subcommands."""
    audit = sub.add_parser("audit", help="verify or export the audit log (needs DATABASE_URL)",
                           description="Verify tenants' hash-chained audit logs, or export one.")
    actions = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")

    verify = actions.add_parser(
        "verify", help="recompute and check audit hash chains (exit 1 when one is broken)",
        description="Check every tenant's chain (or one): each hash, each link, the sequence and the head. "
                    "Prints one line per tenant and the first broken link of a broken chain; exit status 1 "
                    "when a chain is broken.",
    )
    verify.add_argument("--tenant", metavar="NAME", help="only this tenant (default: every tenant)")
    verify.set_defaults(handler=verify_command)

    export = actions.add_parser(
        "export", help="export a tenant's audit log as JSONL or CSV",
        description="Write a tenant's audit events in chain order, as GET /api/v1/audit/export does.",
    )
    export.add_argument("--tenant", metavar="NAME", required=True, help="tenant name")
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl", help="default: jsonl")
    export.add_argument("--since", type=_timestamp, help="events at or after this ISO 8601 time (UTC if no offset)")
    export.add_argument("--until", type=_timestamp, help="events before this ISO 8601 time")
    export.add_argument("--actor", help="only events by this actor")
    export.add_argument("--action", help="only events with this action")
    export.add_argument("--target", help="only events on this target")
    export.add_argument("--output", "-o", type=Path, metavar="FILE", help="write here (default: stdout)")
    export.set_defaults(handler=export_command)

    seal = actions.add_parser(
        "seal", help="seal (hash-chain) every committed unsealed audit row now",
        description="Chain every tenant's committed unsealed audit rows, as the workers' sealer does "
                    "continuously; prints the rows sealed.",
    )
    seal.set_defaults(handler=seal_command)


def _timestamp(value: str) -> datetime:
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {value!r}") from None


def _database_url() -> str:
    database_url, _ = require_urls(load_settings(), redis=False)
    check_database(database_url)
    return database_url


@contextlib.asynccontextmanager
async def _connect(database_url: str) -> AsyncIterator[Conn]:
    import asyncpg

    from app.pg import asyncpg_dsn, setup_connection

    conn = await asyncpg.connect(asyncpg_dsn(database_url), server_settings={"application_name": "steward-cli"})
    try:
        await setup_connection(conn)
        yield conn
    finally:
        await conn.close()


async def _tenants(conn: Conn, name: str | None) -> list[tuple[uuid.UUID, str]]:
    try:
        if name is None:
            rows = await conn.fetch("SELECT id, name FROM tenant ORDER BY name")
        else:
            rows = await conn.fetch("SELECT id, name FROM tenant WHERE name = $1", name)
    except Exception as exc:
        raise_if_not_migrated(exc)
        raise
    if name is not None and not rows:
        raise CliError(f"no tenant named {name!r}", EXIT_USAGE)
    return [(r["id"], r["name"]) for r in rows]


# --- verify -----------------------------------------------------------------------------------------


def verify_command(args: argparse.Namespace) -> int:
    results = asyncio.run(_verify(_database_url(), args.tenant))
    broken = 0
    for name, result in results:
        print(describe(name, result), flush=True)
        broken += not result.ok
    if len(results) != 1:
        print(f"{len(results)} chains verified, {broken} broken.")
    return EXIT_BROKEN if broken else 0


async def _verify(database_url: str, tenant: str | None) -> list[tuple[str, Verification]]:
    from app.audit.verify import verify_chain

    async with _connect(database_url) as conn:
        return [(name, await verify_chain(conn, tenant_id)) for tenant_id, name in await _tenants(conn, tenant)]


def describe(name: str, result: Verification) -> str:
    """One line for a tenant's verification: the span checked and the head, or the first broken link."""
    if result.broken is not None:
        b = result.broken
        where = f"seq {b.seq}" + (f" (id {b.id})" if b.id is not None else "")
        return f"{name}: BROKEN at {where}: {b.reason}: {b.detail}"
    if not result.rows:
        return f"{name}: ok, no sealed events{_unsealed(result)}" if result.unsealed.rows else f"{name}: ok, no events"
    span = f"{result.rows} rows, seq {result.first_seq}..{result.last_seq}"
    if result.anchored_at_seq is not None:
        span += f" (anchored at {result.anchored_at_seq}: older rows removed by retention)"
    head = f"head {result.head.seq} {result.head.hash}" if result.head is not None else "no head"
    return f"{name}: ok, {span}, {head}{_unsealed(result)}"


def _unsealed(result: Verification) -> str:
    pending = result.unsealed
    if not pending.rows:
        return ""
    return f"; {pending.rows} unsealed (oldest {pending.oldest_age_s or 0:.1f} s old)"


# --- seal -------------------------------------------------------------------------------------------


def seal_command(args: argparse.Namespace) -> int:
    sealed = asyncio.run(_seal(_database_url()))
    print(f"Sealed {sealed} audit events.")
    return 0


async def _seal(database_url: str) -> int:
    from app.audit.chain import seal_pending

    async with _connect(database_url) as conn:
        try:
            return await seal_pending(conn)
        except Exception as exc:
            raise_if_not_migrated(exc)
            raise


# --- export -----------------------------------------------------------------------------------------


def export_command(args: argparse.Namespace) -> int:
    from app.audit.export import make_filters
    from app.errors import Invalid

    try:
        filters = make_filters(args.since, args.until, args.actor, args.action, args.target)
    except Invalid as exc:
        raise CliError(exc.detail, EXIT_USAGE) from None
    database_url = _database_url()
    if args.output is None:
        rows = asyncio.run(_export(database_url, args.tenant, args.format, filters, sys.stdout.buffer))
        sys.stdout.buffer.flush()
    else:
        rows = _export_to_file(database_url, args, filters)
        print(f"Wrote {rows} events to {args.output}.", file=sys.stderr)
    return 0


def _export_to_file(database_url: str, args: argparse.Namespace, filters: Filters) -> int:
    """Export into a temporary file next to ``--output``, renamed over it only once complete."""
    output: Path = args.output
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".part", dir=output.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            rows = asyncio.run(_export(database_url, args.tenant, args.format, filters, out))
        os.replace(tmp, output)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return rows


async def _export(database_url: str, tenant: str, fmt: ExportFormat, filters: Filters, out: BinaryIO) -> int:
    from app.audit.export import open_export

    async with _connect(database_url) as conn:
        ((tenant_id, _),) = await _tenants(conn, tenant)
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            export = await open_export(conn, tenant_id, filters, fmt)
            async for chunk in export.chunks():
                out.write(chunk)
    return export.rows
