"""Crashes and lost messages: killed workers, racing claims, a flushed Redis, an API restart."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from app.engine.advance import Claimer
from app.engine.attempts import claim_attempt
from app.engine.transaction import in_tx
from app.runs.models import StepAttempt, StepRun
from app.runtime import Runtime
from tests.support.runs import create_workflow, name, start_run, step, wait_for, wait_run
from tests.support.tenants import TenantKey
from tests.support.workers import FAST, WorkerProcess
from workers.main import run_worker

pytestmark = pytest.mark.xdist_group("engine")


async def test_kill_9_mid_step_the_run_still_completes_and_attempts_tell_the_truth(
    client: httpx.AsyncClient,
    tenant: TenantKey,
    settings: Settings,
    worker_process: Callable[..., WorkerProcess],
) -> None:
    wf = name()
    await create_workflow(
        client,
        tenant.headers,
        wf,
        [
            {"id": "before", "tool": "echo"},
            {
                "id": "slow",
                "needs": ["before"],
                "tool": "sleep",
                "args": {"seconds": 2},
                "timeout_s": 30,
                "retry": {"max_attempts": 3, "backoff_base_s": 0.01},
            },
            {"id": "after", "needs": ["slow"], "tool": "echo", "args": {"v": "${{ steps.slow.output }}"}},
        ],
    )
    doomed = worker_process(lease_s=1.5)
    run = await start_run(client, tenant.headers, wf)
    running = await wait_for(
        client, tenant.headers, run["id"], lambda r: step(r, "slow")["status"] == "running", timeout=30
    )
    dead_worker = step(running, "slow")["attempts"][0]["worker"]
    doomed.kill()
    # A healthy worker takes over once the dead one's lease runs out.
    survivor = asyncio.create_task(run_worker(settings.model_copy(update={**FAST, "lease_s": 1.5})))
    try:
        done = await wait_run(client, tenant.headers, run["id"], timeout=30)
    finally:
        survivor.cancel()
        await asyncio.gather(survivor, return_exceptions=True)
    assert done["status"] == "succeeded", done["error"]
    attempts = step(done, "slow")["attempts"]
    assert [(a["n"], a["status"]) for a in attempts] == [(1, "failed"), (2, "succeeded")]
    assert attempts[0]["error"]["class"] == "worker_lost"
    assert attempts[0]["worker"] == dead_worker
    assert attempts[1]["worker"] != dead_worker
    assert step(done, "before")["attempts"][0]["status"] == "succeeded"
    assert len(step(done, "before")["attempts"]) == 1
    assert step(done, "after")["output"] == {"v": {"slept": 2}}


async def test_terminated_worker_hands_back_its_step_at_once(
    client: httpx.AsyncClient,
    tenant: TenantKey,
    settings: Settings,
    worker_process: Callable[..., WorkerProcess],
) -> None:
    """SIGTERM: the worker waits out its grace period, then records the step as interrupted, so the
    step is retried at once instead of after its (here: 60 s) lease."""
    wf = name()
    await create_workflow(
        client,
        tenant.headers,
        wf,
        [
            {
                "id": "slow",
                "tool": "sleep",
                "args": {"seconds": 3},
                "retry": {"max_attempts": 3, "backoff_base_s": 0.01},
            },
        ],
    )
    leaving = worker_process(worker_shutdown_grace_s=0.2, lease_s=60)
    run = await start_run(client, tenant.headers, wf)
    await wait_for(
        client, tenant.headers, run["id"], lambda r: step(r, "slow")["status"] == "running", timeout=30
    )
    leaving.proc.terminate()
    assert leaving.proc.wait(timeout=15) == 0
    survivor = asyncio.create_task(run_worker(settings.model_copy(update=FAST)))
    try:
        done = await wait_run(client, tenant.headers, run["id"], timeout=20)
    finally:
        survivor.cancel()
        await asyncio.gather(survivor, return_exceptions=True)
    assert done["status"] == "succeeded"
    attempts = step(done, "slow")["attempts"]
    assert [(a["status"], (a["error"] or {}).get("class")) for a in attempts] == [
        ("failed", "interrupted"),
        ("succeeded", None),
    ]


async def test_two_workers_racing_for_one_step_only_one_runs_it(
    client: httpx.AsyncClient, tenant: TenantKey, app: FastAPI, settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    wf = name()
    await create_workflow(client, tenant.headers, wf, [{"id": "a", "tool": "echo"}])
    run = await start_run(client, tenant.headers, wf)
    runtime: Runtime = app.state.runtime
    async with sessionmaker() as db:
        attempt_id = (
            await db.execute(
                select(StepAttempt.id)
                .join(StepRun, StepRun.id == StepAttempt.step_run_id)
                .where(StepRun.run_id == uuid.UUID(run["id"]))
            )
        ).scalar_one()

    async def claim(worker_id: str) -> Any:
        claimer = Claimer(worker_id=worker_id, job_id=str(attempt_id))
        return await in_tx(runtime, claim_attempt, settings, attempt_id, claimer)

    results = await asyncio.gather(*(claim(f"racer-{i}") for i in range(8)))
    winners = [r[0] for r in results if r]
    assert len(winners) == 1
    async with sessionmaker() as db:
        attempt = (await db.execute(select(StepAttempt).where(StepAttempt.id == attempt_id))).scalar_one()
        count = (
            await db.execute(
                select(func.count())
                .select_from(StepAttempt)
                .where(StepAttempt.run_id == uuid.UUID(run["id"]))
            )
        ).scalar_one()
    assert attempt.status == "running" and attempt.worker == winners[0].worker_id
    assert count == 1


async def test_duplicate_job_delivery_runs_the_step_once(
    client: httpx.AsyncClient, tenant: TenantKey, app: FastAPI, worker: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    """arq may deliver a job twice (re-sent by the reconciler, or after a worker restart)."""
    from app.engine.outbox import enqueue_many
    from app.engine.unit_of_work import Job

    wf = name()
    await create_workflow(
        client, tenant.headers, wf, [{"id": "a", "tool": "sleep", "args": {"seconds": 1.5}}]
    )
    run = await start_run(client, tenant.headers, wf)
    attempt = step(run, "a")
    runtime: Runtime = app.state.runtime
    async with sessionmaker() as db:
        attempt_id = (
            await db.execute(select(StepRun.current_attempt_id).where(StepRun.run_id == uuid.UUID(run["id"])))
        ).scalar_one()
    queue = f"{worker.queue_prefix}:normal"
    # The same job id again while it is queued or running is dropped by arq's job key ...
    assert await enqueue_many(runtime.redis, [Job("step", str(attempt_id), queue)]) == 0
    done = await wait_run(client, tenant.headers, run["id"])
    # ... and delivered again after it ran, the claim refuses it.
    await enqueue_many(runtime.redis, [Job("step", str(attempt_id), queue)])
    await asyncio.sleep(0.5)
    final = (await client.get(f"/api/v1/runs/{run['id']}", headers=tenant.headers)).json()
    assert done["status"] == final["status"] == "succeeded"
    assert len(step(final, "a")["attempts"]) == 1
    assert [e["type"] for e in final["events"]].count("step_started") == 1
    assert attempt["status"] == "queued"


async def test_redis_flushed_mid_run_the_run_still_completes(
    client: httpx.AsyncClient, tenant: TenantKey, app: FastAPI, worker: Settings
) -> None:
    wf = name()
    await create_workflow(
        client,
        tenant.headers,
        wf,
        [
            {"id": "a", "tool": "echo"},
            # Fails once, so its retry sits in Redis as a deferred job when Redis is wiped.
            {
                "id": "b",
                "needs": ["a"],
                "tool": "fail",
                "args": {"times": 1},
                "retry": {"max_attempts": 3, "backoff_base_s": 1.5, "jitter": False},
            },
            {
                "id": "m",
                "needs": ["b"],
                "map": {"items": [1, 2, 3, 4], "tool": "echo", "args": {"v": "${{ item }}"}},
            },
        ],
    )
    run = await start_run(client, tenant.headers, wf)
    await wait_for(
        client,
        tenant.headers,
        run["id"],
        lambda r: step(r, "b")["status"] == "queued" and len(step(r, "b")["attempts"]) == 2,
    )
    await app.state.runtime.redis.flushdb()
    done = await wait_run(client, tenant.headers, run["id"], timeout=30)
    assert done["status"] == "succeeded", done["error"]
    assert [a["status"] for a in step(done, "b")["attempts"]] == ["failed", "succeeded"]
    assert step(done, "m")["output"] == [{"v": 1}, {"v": 2}, {"v": 3}, {"v": 4}]


async def test_api_restart_mid_run(tenant: TenantKey, settings: Settings, worker: Settings) -> None:
    """A run started through one API process is signalled and awaited through a new one."""
    from app.main import create_app

    async def api() -> tuple[FastAPI, Any]:
        application = create_app(settings)
        lifespan = application.router.lifespan_context(application)
        await lifespan.__aenter__()
        return application, lifespan

    first, first_lifespan = await api()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=first), base_url="http://a") as c1:
        wf = name()
        await create_workflow(
            c1,
            tenant.headers,
            wf,
            [
                {"id": "a", "tool": "echo"},
                {"id": "w", "needs": ["a"], "wait": {"signal": "go"}},
                {"id": "z", "needs": ["w"], "tool": "echo", "args": {"got": "${{ steps.w.output }}"}},
            ],
        )
        run = await start_run(c1, tenant.headers, wf)
        await wait_for(c1, tenant.headers, run["id"], lambda r: r["status"] == "waiting")
    await first_lifespan.__aexit__(None, None, None)

    second, second_lifespan = await api()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=second), base_url="http://b") as c2:
            poll = asyncio.create_task(wait_run(c2, tenant.headers, run["id"], timeout=20))
            await asyncio.sleep(0.2)
            r = await c2.post(
                f"/api/v1/runs/{run['id']}/signals/go", json={"payload": "yes"}, headers=tenant.headers
            )
            assert r.status_code == 200
            done = await poll
    finally:
        await second_lifespan.__aexit__(None, None, None)
    assert done["status"] == "succeeded"
    assert done["output"] == {"z": {"got": "yes"}}


async def test_a_failure_recorded_with_a_success_starts_nothing_new(
    client: httpx.AsyncClient, tenant: TenantKey, app: FastAPI, settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    """Two roots finish in one batch: one succeeds (its dependent is now ready), one fails for good.
    The run fails, and the dependent must not start."""
    from app.clock import now
    from app.engine.attempts import Outcome, record_outcomes

    wf = name()
    await create_workflow(client, tenant.headers, wf, [
        {"id": "ok", "tool": "echo"},
        {"id": "bad", "tool": "fail", "args": {"transient": False}},
        {"id": "next", "needs": ["ok"], "tool": "echo"},
    ])
    run = await start_run(client, tenant.headers, wf)
    runtime: Runtime = app.state.runtime
    async with sessionmaker() as db:
        attempt_id = (await db.execute(
            select(StepRun.current_attempt_id).where(StepRun.run_id == uuid.UUID(run["id"]), StepRun.step_id == "ok")
        )).scalar_one()
    claimer = Claimer(worker_id="test-worker", job_id="job", capacity=10)
    claimed = await in_tx(runtime, claim_attempt, settings, attempt_id, claimer)
    assert sorted(c.step_id for c in claimed) == ["bad", "ok"]
    t = now()
    outcomes = {"ok": Outcome(True, t, t, output={}),
                "bad": Outcome(False, t, t, error_class="fail", message="no", transient=False)}
    started = await in_tx(runtime, record_outcomes, settings, [(c, outcomes[c.step_id]) for c in claimed], claimer)
    assert started == []
    done = (await client.get(f"/api/v1/runs/{run['id']}", headers=tenant.headers)).json()
    assert done["status"] == "failed"
    assert step(done, "next")["status"] == "pending" and step(done, "next")["attempts"] == []


async def test_output_that_is_not_json_fails_the_step(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings
) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = b'{"value": NaN}'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        wf = name()
        port = server.sockets[0].getsockname()[1]
        await create_workflow(client, tenant.headers, wf, [
            {"id": "call", "tool": "http", "args": {"url": f"http://127.0.0.1:{port}/"}}])
        done = await wait_run(client, tenant.headers, (await start_run(client, tenant.headers, wf))["id"])
    finally:
        server.close()
    assert done["status"] == "failed"
    assert step(done, "call")["error"]["class"] == "output_invalid"
