"""``steward audit verify`` and ``steward audit export``, run as the real command against the test database."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from app.audit.chain import format_at
from app.audit.export import COLUMNS
from app.pg import Conn
from tests.support.audit import add, add_unsealed, entries, reverify_lines, rows, tamper
from tests.support.env import ROOT
from tests.support.tenants import MakeTenant, TenantKey


async def steward(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": database_url}
    env.pop("STEWARD_DATABASE_URL", None)
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "app.cli", "audit", *args], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=120,
    )


async def test_verify_one_intact_tenant(database_url: str, owner: Conn, tenant: TenantKey) -> None:
    await add(owner, tenant.tenant_id, entries(4))
    head = (await rows(owner, tenant.tenant_id))[-1]["hash"]
    done = await steward(database_url, "verify", "--tenant", tenant.name)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{tenant.name}: ok, 4 rows, seq 1..4, head 4 {head}\n"


async def test_verify_every_tenant_reports_each_broken_chain(
    database_url: str, owner: Conn, make_tenant: MakeTenant
) -> None:
    good, bad = await make_tenant(), await make_tenant()
    await add(owner, good.tenant_id, entries(3))
    await add(owner, bad.tenant_id, entries(3))
    second = (await rows(owner, bad.tenant_id))[1]
    await tamper(owner, "UPDATE audit_event SET outcome = 'denied' WHERE id = $1", second["id"])

    one = await steward(database_url, "verify", "--tenant", bad.name)
    assert one.returncode == 1
    assert one.stdout.startswith(f"{bad.name}: BROKEN at seq 2 (id {second['id']}): hash_mismatch: row 2")

    every = await steward(database_url, "verify")
    assert every.returncode == 1, every.stderr
    lines = every.stdout.splitlines()
    assert f"{good.name}: ok, 3 rows, seq 1..3, head 3 " in "\n".join(lines)
    assert any(line.startswith(f"{bad.name}: BROKEN at seq 2 ") for line in lines)
    assert lines[-1].startswith(f"{len(lines) - 1} chains verified, ")
    assert not lines[-1].endswith(" 0 broken.")


async def test_verify_unknown_tenant_is_a_usage_error(database_url: str) -> None:
    done = await steward(database_url, "verify", "--tenant", "no-such-tenant")
    assert done.returncode == 2
    assert done.stderr.strip() == "steward audit: no tenant named 'no-such-tenant'"


async def test_export_to_a_file_matches_the_api(
    database_url: str, owner: Conn, make_tenant: MakeTenant, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    key = await make_tenant(roles=("auditor",))
    await add(owner, key.tenant_id, entries(5, ip="192.0.2.7"))
    out = tmp_path / "audit.jsonl"
    done = await steward(database_url, "export", "--tenant", key.name, "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stderr == f"Wrote 5 events to {out}.\n"
    api = await client.get("/api/v1/audit/export", headers=key.headers)
    assert out.read_text() == api.text
    assert [line["seq"] for line in reverify_lines(out.read_text())] == [1, 2, 3, 4, 5]
    assert os.listdir(tmp_path) == ["audit.jsonl"]  # no temporary file left behind


async def test_export_csv_to_stdout_with_filters(database_url: str, owner: Conn, tenant: TenantKey) -> None:
    base = datetime(2026, 5, 1, tzinfo=UTC)
    await add(owner, tenant.tenant_id, entries(5, at=[base + timedelta(hours=i) for i in range(5)]))
    done = await steward(database_url, "export", "--tenant", tenant.name, "--format", "csv",
                         "--since", "2026-05-01T01:00:00", "--until", format_at(base + timedelta(hours=4)),
                         "--target", "thing:3")
    assert done.returncode == 0, done.stderr
    table = list(csv.reader(io.StringIO(done.stdout, newline="")))
    assert table[0] == list(COLUMNS) and [r[2] for r in table[1:]] == ["3"]
    everything = await steward(database_url, "export", "--tenant", tenant.name, "--since", "2026-05-01T01:00:00Z")
    assert [line["seq"] for line in reverify_lines(everything.stdout)] == [2, 3, 4, 5]


async def test_export_argument_errors(database_url: str, tenant: TenantKey, tmp_path: Path) -> None:
    reversed_range = await steward(database_url, "export", "--tenant", tenant.name, "--since", "2026-02-01",
                                   "--until", "2026-01-01")
    assert reversed_range.returncode == 2 and "`since` is after `until`" in reversed_range.stderr
    bad_time = await steward(database_url, "export", "--tenant", tenant.name, "--since", "last week")
    assert bad_time.returncode == 2 and "not an ISO 8601 time" in bad_time.stderr
    out = tmp_path / "x.jsonl"
    unknown = await steward(database_url, "export", "--tenant", "no-such-tenant", "--output", str(out))
    assert unknown.returncode == 2 and "no tenant named 'no-such-tenant'" in unknown.stderr
    assert os.listdir(tmp_path) == []  # neither the output nor its temporary file


async def test_no_database_url_is_a_usage_error() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "STEWARD_DATABASE_URL")}
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "app.cli", "audit", "verify"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2 and "DATABASE_URL" in done.stderr


async def test_seal_then_verify_reports_what_was_unsealed(database_url: str, owner: Conn, tenant: TenantKey) -> None:
    await add(owner, tenant.tenant_id, entries(2))
    await add_unsealed(owner, tenant.tenant_id, entries(2, start=3))
    before = await steward(database_url, "verify", "--tenant", tenant.name)
    assert before.returncode == 0, before.stderr
    assert before.stdout.startswith(f"{tenant.name}: ok, 2 rows, seq 1..2, head 2 ")
    assert "; 2 unsealed (oldest " in before.stdout

    sealed = await steward(database_url, "seal")
    assert sealed.returncode == 0, sealed.stderr
    assert sealed.stdout.startswith("Sealed ") and int(sealed.stdout.split()[1]) >= 2
    head = (await rows(owner, tenant.tenant_id))[-1]["hash"]
    after = await steward(database_url, "verify", "--tenant", tenant.name)
    assert after.stdout == f"{tenant.name}: ok, 4 rows, seq 1..4, head 4 {head}\n"
