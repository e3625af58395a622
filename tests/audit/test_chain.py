"""The chain under concurrency and rollback, sealing, the append-only guarantees, redaction."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from app.audit.chain import GENESIS, REDACTED, Entry, append, seal_backlog, seal_pending, seal_tenant
from app.audit.verify import verify_chain
from app.pg import Conn
from tests.support.audit import add, add_unsealed, entries, rows
from tests.support.db import connect
from tests.support.tenants import MakeTenant, TenantKey

WRITERS = 20
APPENDS_EACH = 5
SEALERS = 3


class Rollback(Exception):
    pass


async def test_concurrent_writers_and_racing_sealers_make_one_gap_free_chain(
    database_url: str, owner: Conn, tenant: TenantKey
) -> None:
    conns = [await connect(database_url) for _ in range(WRITERS + SEALERS)]
    go = asyncio.Event()
    writing = WRITERS
    passes: list[int | None] = []

    async def writer(conn: Conn, w: int) -> None:
        nonlocal writing
        await go.wait()
        for k in range(APPENDS_EACH):
            async with conn.transaction():
                await append(conn, tenant.tenant_id, [Entry(f"user:{w}", "thing.do", f"thing:{w}:{k}")])
        writing -= 1

    async def sealer(conn: Conn) -> None:
        await go.wait()
        while writing:  # seals while the writers write, racing the other sealers for the head
            passes.append(await seal_tenant(conn, tenant.tenant_id, limit=7))
            await asyncio.sleep(0)

    try:
        tasks = [asyncio.create_task(writer(conn, w)) for w, conn in enumerate(conns[:WRITERS])]
        tasks += [asyncio.create_task(sealer(conn)) for conn in conns[WRITERS:]]
        await asyncio.sleep(0.05)  # every task waiting on the event
        go.set()
        await asyncio.gather(*tasks)
    finally:
        await asyncio.gather(*(conn.close() for conn in conns))
    await seal_backlog(owner, tenant.tenant_id)  # what was committed after the sealers' last pass

    chain = await rows(owner, tenant.tenant_id)
    assert [r["seq"] for r in chain] == list(range(1, WRITERS * APPENDS_EACH + 1))
    assert chain[0]["prev_hash"] == GENESIS
    assert all(b["prev_hash"] == a["hash"] for a, b in zip(chain, chain[1:], strict=False))
    assert {r["target"] for r in chain} == {f"thing:{w}:{k}" for w in range(WRITERS) for k in range(APPENDS_EACH)}
    head = await owner.fetchrow("SELECT seq, hash FROM audit_head WHERE tenant_id = $1", tenant.tenant_id)
    assert (head["seq"], head["hash"]) == (chain[-1]["seq"], chain[-1]["hash"])
    result = await verify_chain(owner, tenant.tenant_id)
    assert result.ok and result.rows == WRITERS * APPENDS_EACH and result.unsealed.rows == 0, result.as_dict()
    assert any(passes), passes  # the racing sealers did seal


async def test_a_second_sealer_skips_a_tenant_being_sealed(database_url: str, owner: Conn, tenant: TenantKey) -> None:
    await add(owner, tenant.tenant_id, entries(2))
    await add_unsealed(owner, tenant.tenant_id, entries(3, start=3))
    first = await connect(database_url)
    try:
        async with first.transaction():  # a sealer in the middle of its pass: it holds the head
            await first.execute("SELECT FROM audit_head WHERE tenant_id = $1 FOR UPDATE", tenant.tenant_id)
            assert await seal_tenant(owner, tenant.tenant_id) is None
            assert await seal_pending(owner) >= 0  # passes over the tenant without waiting
            assert [r["seq"] for r in await rows(owner, tenant.tenant_id)] == [1, 2, None, None, None]
    finally:
        await first.close()
    assert await seal_tenant(owner, tenant.tenant_id) == 3
    assert await seal_tenant(owner, tenant.tenant_id) == 0
    assert (await verify_chain(owner, tenant.tenant_id)).ok


async def test_a_first_head_is_created_by_one_sealer_only(database_url: str, owner: Conn, tenant: TenantKey) -> None:
    await add_unsealed(owner, tenant.tenant_id, entries(4))
    first, watcher = await connect(database_url), await connect(database_url)
    try:
        async with first.transaction():
            assert await seal_tenant(first, tenant.tenant_id, limit=1) == 1  # creates the head and holds it...
            second = asyncio.create_task(seal_tenant(owner, tenant.tenant_id))  # ...this one waits for its commit
            while not await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'",
                owner.get_server_pid()):
                assert not second.done(), second.result()
                await asyncio.sleep(0.01)
        assert await second is None  # then finds the head taken: another sealer had the tenant
    finally:
        await asyncio.gather(first.close(), watcher.close())
    assert await seal_backlog(owner, tenant.tenant_id) == 3
    assert [r["seq"] for r in await rows(owner, tenant.tenant_id)] == [1, 2, 3, 4]
    assert (await verify_chain(owner, tenant.tenant_id)).ok


async def test_a_rolled_back_action_leaves_nothing(owner: Conn, tenant: TenantKey) -> None:
    await add(owner, tenant.tenant_id, entries(2))
    with pytest.raises(RuntimeError):
        async with owner.transaction():
            await append(owner, tenant.tenant_id, entries(3, start=100))
            raise RuntimeError("the action failed after its audit event was written")
    await add_unsealed(owner, tenant.tenant_id, entries(1, start=3))

    assert [(r["seq"], r["target"]) for r in await rows(owner, tenant.tenant_id)] == [
        (1, "thing:1"), (2, "thing:2"), (None, "thing:3")]
    assert (await verify_chain(owner, tenant.tenant_id)).unsealed.rows == 1
    assert await seal_pending(owner) >= 1
    chain = await rows(owner, tenant.tenant_id)
    assert [(r["seq"], r["target"]) for r in chain] == [(1, "thing:1"), (2, "thing:2"), (3, "thing:3")]
    result = await verify_chain(owner, tenant.tenant_id)
    assert result.ok and result.head is not None and result.head.seq == 3 and result.unsealed.rows == 0


async def test_the_application_role_cannot_change_or_remove_events(
    database_url: str, owner: Conn, make_tenant: MakeTenant
) -> None:
    mine, theirs = await make_tenant(), await make_tenant()
    await add(owner, mine.tenant_id, entries(2))
    await add(owner, theirs.tenant_id, entries(2))
    app = await connect(database_url, role="steward_app", **{"steward.tenant_id": str(mine.tenant_id)})
    try:
        assert await app.fetchval("SELECT current_user") == "steward_app"
        # It reads its own tenant's events, and only those.
        assert await app.fetchval("SELECT count(*) FROM audit_event") == 2
        assert await app.fetchval("SELECT count(*) FROM audit_event WHERE tenant_id = $1", theirs.tenant_id) == 0
        for sql in ("UPDATE audit_event SET actor = 'someone else'", "DELETE FROM audit_event",
                    "TRUNCATE audit_event"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
                await app.execute(sql)
        # The retention switch is no key for it: the grant is missing, not just the trigger's consent.
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            async with app.transaction():
                await app.execute("SET LOCAL steward.audit_retention = 'on'")
                await app.execute("DELETE FROM audit_event")
    finally:
        await app.close()
    assert len(await rows(owner, mine.tenant_id)) == 2


async def test_the_owner_is_stopped_by_the_trigger_unless_retention_runs(owner: Conn, tenant: TenantKey) -> None:
    await add(owner, tenant.tenant_id, entries(3))
    for sql, op in (("UPDATE audit_event SET data = '{}' WHERE tenant_id = $1", "UPDATE"),
                    ("DELETE FROM audit_event WHERE tenant_id = $1", "DELETE")):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match=f"append-only \\({op} refused\\)"):
            await owner.execute(sql, tenant.tenant_id)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await owner.execute("TRUNCATE audit_event")
    # The retention job's switch lets a DELETE through (rolled back here), and nothing else.
    with pytest.raises(Rollback):
        async with owner.transaction():
            await owner.execute("SET LOCAL steward.audit_retention = 'on'")
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="UPDATE refused"):
                async with owner.transaction():  # a savepoint, so the DELETE below still runs
                    await owner.execute("UPDATE audit_event SET actor = 'x' WHERE tenant_id = $1", tenant.tenant_id)
            status = await owner.execute("DELETE FROM audit_event WHERE tenant_id = $1 AND seq = 1", tenant.tenant_id)
            assert status == "DELETE 1"
            raise Rollback
    assert [r["seq"] for r in await rows(owner, tenant.tenant_id)] == [1, 2, 3]


async def test_secret_looking_keys_are_redacted_at_any_depth(owner: Conn, tenant: TenantKey) -> None:
    data = {
        "password": "hunter2",
        "headers": {"Authorization": "Bearer abc", "X-Auth-Token": "t", "accept": "json"},
        "calls": [{"client_secret": "s", "max_tokens": 100, "tokens_in": 12}],
        "session_cookie": "c",
        "note": "the word token in a value stays",
    }
    await add(owner, tenant.tenant_id, [Entry("user:alice", "provider.update", "provider:x", data=data)])
    (row,) = await rows(owner, tenant.tenant_id)
    assert row["data"] == {
        "password": REDACTED,
        "headers": {"Authorization": REDACTED, "X-Auth-Token": REDACTED, "accept": "json"},
        "calls": [{"client_secret": REDACTED, "max_tokens": 100, "tokens_in": 12}],
        "session_cookie": REDACTED,
        "note": "the word token in a value stays",
    }
    assert "hunter2" not in str(await owner.fetchval("SELECT data::text FROM audit_event WHERE id = $1", row["id"]))
    assert (await verify_chain(owner, tenant.tenant_id)).ok


async def test_hyphenated_api_key_headers_are_redacted(owner: Conn, tenant: TenantKey) -> None:
    await add(owner, tenant.tenant_id, [Entry("user:alice", "tool.update", "tool:x",
                                              data={"headers": {"X-Api-Key": "k"}})])
    (row,) = await rows(owner, tenant.tenant_id)
    assert row["data"] == {"headers": {"X-Api-Key": REDACTED}}


async def test_large_and_negative_zero_floats_still_verify(owner: Conn, tenant: TenantKey) -> None:
    await add(owner, tenant.tenant_id, [Entry("user:alice", "budget.set", "budget:x",
                                              data={"limit": 1e20, "delta": -0.0})])
    assert (await verify_chain(owner, tenant.tenant_id)).ok


async def test_the_trigger_lets_through_exactly_the_sealing_update(owner: Conn, tenant: TenantKey) -> None:
    await add(owner, tenant.tenant_id, entries(1))
    await add_unsealed(owner, tenant.tenant_id, entries(2, start=2))
    sealed, pending, other = await rows(owner, tenant.tenant_id)
    seal = "UPDATE audit_event SET seq = 2, prev_hash = $2, hash = $3"
    refused = [
        (f"{seal}, actor = 'user:mallory' WHERE id = $1", pending["id"]),  # sealing and changing a column
        (f"{seal}, data = '{{}}' WHERE id = $1", pending["id"]),
        ("UPDATE audit_event SET seq = 2 WHERE id = $1", pending["id"]),  # half sealed
        ("UPDATE audit_event SET actor = 'user:mallory' WHERE id = $1", pending["id"]),  # unsealed, edited
        ("UPDATE audit_event SET seq = NULL, prev_hash = NULL, hash = NULL WHERE id = $1", sealed["id"]),  # unsealed
        (f"{seal} WHERE id = $1", sealed["id"]),  # sealed again
    ]
    for sql, row_id in refused:
        with pytest.raises((asyncpg.InsufficientPrivilegeError, asyncpg.CheckViolationError)):
            args = [row_id] if "$2" not in sql else [row_id, sealed["hash"], "e" * 64]
            await owner.execute(sql, *args)
    # Retention's switch deletes sealed rows only.
    with pytest.raises(Rollback):
        async with owner.transaction():
            await owner.execute("SET LOCAL steward.audit_retention = 'on'")
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="DELETE refused"):
                async with owner.transaction():
                    await owner.execute("DELETE FROM audit_event WHERE id = $1", pending["id"])
            assert await owner.execute("DELETE FROM audit_event WHERE id = $1", sealed["id"]) == "DELETE 1"
            raise Rollback
    assert [dict(r) for r in await rows(owner, tenant.tenant_id)] == [dict(sealed), dict(pending), dict(other)]
    # The sealing update itself goes through (what the sealer writes).
    assert await owner.execute(f"{seal} WHERE id = $1", pending["id"], sealed["hash"], "e" * 64) == "UPDATE 1"


async def test_rows_are_sealed_as_they_read_back(owner: Conn, tenant: TenantKey) -> None:
    """The sealer hashes what the database holds, as verify and an export's reader will see it."""
    await add_unsealed(owner, tenant.tenant_id, [
        Entry("user:alice", "budget.set", "budget:x", data={"limit": 1e20, "delta": -0.0, "nan": float("nan")}),
        Entry("user:alice", "thing.do", None, data={"é": "ünïcode", "nested": [{"b": 1, "a": [None, True]}]}),
    ])
    assert await seal_pending(owner) >= 2
    result = await verify_chain(owner, tenant.tenant_id)
    assert result.ok and result.rows == 2, result.as_dict()
