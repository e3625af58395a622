"""arq workers: one arq ``Worker`` per priority queue in one process, sharing the engine runtime.

Each queue has its own job slots, so a backlog of low-priority runs never takes the slots a
high-priority run needs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from typing import Any

import httpx
from arq import cron, func
from prometheus_client import start_http_server

import app.models  # noqa: F401  (every table, so foreign keys resolve in a worker-only process)
from app import tracing
from app.audit.sealer import seal_loop
from app.config import Settings
from app.engine.unit_of_work import QUEUES
from app.metrics import exposed_registry
from app.redis import connect, redis_settings
from app.runtime import Runtime
from app.tools.breaker import Breaker, breaker_prefix
from workers.jobs import fire_wait_timeout, reconcile, run_step
from workers.wakeup import WakeableWorker, listen

log = logging.getLogger(__name__)


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def build_workers(
    runtime: Runtime, *, concurrency: int, worker_id: str, http: httpx.AsyncClient
) -> list[WakeableWorker]:
    settings = runtime.settings
    # Breaker state lives in Redis, shared with every other worker process (the key prefix keeps tests apart).
    breaker = Breaker(runtime.redis, prefix=breaker_prefix(settings.queue_prefix))
    ctx: dict[str, Any] = {"runtime": runtime, "worker_id": worker_id, "http": http, "breaker": breaker}
    every = max(1, int(settings.reconcile_interval_s))
    workers = []
    for priority in QUEUES:
        workers.append(
            WakeableWorker(
                functions=[
                    func(run_step, name="run_step"),
                    func(fire_wait_timeout, name="fire_wait_timeout"),
                ],
                queue_name=f"{settings.queue_prefix}:{priority}",
                redis_settings=redis_settings(settings.redis_url or ""),
                # Our client (socket timeouts, connects on first use): arq's own would hang on a silent
                # network and is created by a ping that fails while Redis is away.
                redis_pool=connect(settings.redis_url or ""),
                max_jobs=concurrency,
                poll_delay=settings.worker_poll_delay_s,
                job_timeout=settings.arq_job_timeout_s,
                keep_result=0,
                allow_abort_jobs=True,
                retry_jobs=False,
                handle_signals=False,
                ctx=dict(ctx),
                # The reconciler runs on one queue's worker only; arq's cron uniqueness keeps one
                # instance at a time across processes.
                cron_jobs=[
                    cron(
                        reconcile,
                        name="reconcile",
                        second=set(range(0, 60, every)),
                        run_at_startup=True,
                        unique=True,
                        timeout=300,
                    )
                ]
                if priority == "normal"
                else None,
                health_check_interval=60,
            )
        )
    return workers


async def run_worker(settings: Settings, *, concurrency: int | None = None) -> None:
    """Run the workers until cancelled; then let running steps finish for a grace period."""
    runtime = await Runtime.start(settings, role="worker")
    worker_id = new_worker_id()
    metrics = None
    if settings.worker_metrics_port is not None:
        metrics, _ = start_http_server(settings.worker_metrics_port, addr=settings.host, registry=exposed_registry())
        log.info("worker metrics on http://%s:%d/metrics", settings.host, settings.worker_metrics_port)
    async with httpx.AsyncClient(follow_redirects=False) as http:
        if tracing.enabled():  # tool and model calls: client spans, and traceparent sent along
            from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

            HTTPXClientInstrumentor().instrument_client(http)
        workers = build_workers(
            runtime, concurrency=concurrency or settings.worker_concurrency, worker_id=worker_id, http=http
        )
        tasks = [asyncio.create_task(w.async_run()) for w in workers]
        by_queue = {w.queue_name: w for w in workers}
        tasks.append(asyncio.create_task(listen(runtime.redis, settings.queue_prefix, by_queue)))
        # Audit rows are written unsealed by the actions' transactions and chained here (app/audit/sealer.py).
        tasks.append(asyncio.create_task(seal_loop(runtime), name="audit-sealer"))
        log.info("worker %s started on %s", worker_id, ", ".join(w.queue_name for w in workers))
        try:
            await asyncio.gather(*tasks)
        finally:
            await _shutdown(workers, tasks, settings.worker_shutdown_grace_s)
            await runtime.stop()
            if metrics is not None:
                metrics.shutdown()
                metrics.server_close()


async def _shutdown(workers: list[WakeableWorker], tasks: list[asyncio.Task[None]], grace_s: float) -> None:
    for w in workers:
        w.allow_pick_jobs = False
    running = [t for w in workers for t in w.tasks.values() if not t.done()]
    if running:
        log.info("waiting up to %ss for %d running jobs", grace_s, len(running))
        await asyncio.wait(running, timeout=grace_s)
    for w in workers:
        await w.close()  # cancels what is still running: those steps record an interrupted attempt
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
