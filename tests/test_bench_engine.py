"""bench/engine.py's connection count: pg_stat_activity rows attributed to the process that holds them."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import time

import asyncpg

from app.pg import asyncpg_dsn
from bench.engine import ConnCounter

HOLD = """
import asyncio, sys, asyncpg
async def main():
    conn = await asyncpg.connect(sys.argv[1], server_settings={"application_name": sys.argv[2]})
    sys.stdin.read()  # until the test closes our stdin
    await conn.close()
asyncio.run(main())
"""


async def test_connections_are_counted_per_process_and_application(database_url: str) -> None:
    dsn = asyncpg_dsn(database_url)
    mine, childs = f"bench-mine-{secrets.token_hex(3)}", f"bench-child-{secrets.token_hex(3)}"
    own = await asyncpg.connect(dsn, server_settings={"application_name": mine})
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", HOLD, dsn, childs, stdin=subprocess.PIPE)
    counter = await ConnCounter.connect(database_url, {"bench": os.getpid(), "child": child.pid})
    try:
        deadline = time.monotonic() + 30  # hang guard: the child's connection shows up well before
        while childs not in counter.last.get("child", {}):
            assert child.returncode is None and time.monotonic() < deadline, counter.last
            await asyncio.sleep(0.05)
            await counter.sample()
        # The bench process is the child's parent: its connections are its own, not its children's. (The
        # test process may hold other connections to this database, from fixtures of earlier tests.)
        assert counter.last["bench"].get(mine) == 1 and childs not in counter.last["bench"], counter.last
        assert counter.last["child"] == {childs: 1}, counter.last
        assert counter.peak["child"] == 1 and counter.peak_by_application["bench"][mine] == 1
    finally:
        assert child.stdin is not None
        child.stdin.close()
        await asyncio.wait_for(child.wait(), timeout=30)
        await counter.close()
        await own.close()
