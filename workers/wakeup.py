"""Workers that wake when work arrives instead of polling Redis every few milliseconds, and that ride
out Redis outages.

The outbox relay publishes ``<queue>|<due ms>`` on the ``<queue_prefix>:wake`` channel with every
batch it enqueues (and ``abort`` when it asks for jobs to be aborted). A worker waits for that, or
for a timer set to a deferred job's due time, and polls its queue then; a slow idle poll
(``worker_poll_delay_s``) remains as the safety net for a missed message.

While Redis is away the worker keeps its running steps going (they need Postgres only), polls again
with backoff up to :data:`RECONNECT_MAX_S`, and once Redis answers picks up where it was: jobs lost
with Redis are sent again from the outbox by the reconciler. arq itself would leave a job whose start
or finish it could not write to Redis marked "in progress" (for arq's job timeout: days), so no worker
would take it again; such jobs are remembered and released when Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import weakref
from typing import Any

from arq import Worker
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix
from redis.exceptions import RedisError

from app.engine.outbox import wake_channel
from app.outage import REDIS, Backoff, is_redis_outage

log = logging.getLogger(__name__)

# The longest a worker waits between two attempts to reach Redis again.
RECONNECT_MAX_S = 2.0
# The wake-up listener reads with this timeout, so an idle connection is never mistaken for a dead one.
LISTEN_TIMEOUT_S = 10.0


class WakeableWorker(Worker):
    """An arq ``Worker`` whose poll loop sleeps until woken and survives Redis outages (see module docstring)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.wake = asyncio.Event()
        # Jobs whose "in progress" mark may be left in Redis by a start or finish that failed there.
        self.orphans: set[str] = set()
        self._finishing: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()

    def wake_at(self, due_ms: float) -> None:
        delay = due_ms / 1000 - time.time()
        if delay <= 0:
            self.wake.set()
        else:
            asyncio.get_running_loop().call_later(delay, self.wake.set)

    async def main(self) -> None:
        # arq's main() polls on a fixed period and ends at the first Redis error; this is the same
        # start-up with a wake-driven loop that waits an outage out.
        assert self._pool is not None, "build the worker with redis_pool"
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)
        backoff = Backoff(first=self.poll_delay_s, cap=RECONNECT_MAX_S)
        while True:
            self.wake.clear()
            try:
                await self._poll_iteration()
                if self.orphans:
                    await self._release_orphans()
            except Exception as exc:
                if not is_redis_outage(exc):
                    raise
                REDIS.down(exc)
                await backoff.sleep()
                continue
            REDIS.up()
            backoff.reset()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=self.poll_delay_s)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        for job_id_b in job_ids:
            job_id = job_id_b.decode()
            counter, task = self.job_counter, self.tasks.get(job_id)
            try:
                await super().start_jobs([job_id_b])
            except BaseException:
                if self.job_counter > counter and self.tasks.get(job_id) is task:
                    # arq took a job slot, then failed to mark the job started: give the slot back.
                    self.job_counter -= 1
                    self.sem.release()
                    self.orphans.add(job_id)
                raise

    async def run_job(self, job_id: str, score: int) -> None:
        try:
            await super().run_job(job_id, score)
        except Exception as exc:
            if not is_redis_outage(exc):
                raise
            # Its start or finish did not reach Redis (the step's own state is in Postgres either way).
            REDIS.down(exc)
            self.orphans.add(job_id)

    async def _release_orphans(self) -> None:
        """Clear the "in progress" marks arq could not clear: those jobs run again (a job whose step has
        run already finds nothing to do), or are sent again by the reconciler if Redis lost them."""
        orphans, self.orphans = self.orphans, set()
        try:
            await self.pool.delete(*(in_progress_key_prefix + job_id for job_id in orphans))
        except BaseException:
            self.orphans |= orphans
            raise
        self.wake.set()

    async def finish_job(self, *args: Any) -> None:
        # arq shields this from the job's cancellation: close() must wait for it before closing the
        # pool, or its commands fail on a closed connection in a task nobody awaits.
        self._finishing.add(asyncio.current_task())  # type: ignore[arg-type]
        await super().finish_job(*args)

    async def finish_failed_job(self, *args: Any) -> None:
        self._finishing.add(asyncio.current_task())  # type: ignore[arg-type]
        await super().finish_failed_job(*args)

    async def close(self) -> None:
        """arq's close, waiting for the jobs' last writes, and through a Redis outage."""
        self.handle_sig(signal.SIGUSR1)  # cancels the jobs still running (handle_signals is off)
        if self._pool is None:
            return
        # Until none is left: a poll under way when the jobs were cancelled may still start one, and a
        # job's last writes run in a task of their own (arq shields them), registered when it starts.
        while True:
            await asyncio.sleep(0)  # let tasks scheduled meanwhile start and register
            pending = [t for t in (*self.tasks.values(), *self._finishing) if not t.done()]
            if not pending:
                break
            await asyncio.gather(*pending, return_exceptions=True)
        try:
            await self.pool.delete(self.health_check_key)
        except Exception as exc:
            if not is_redis_outage(exc):
                raise
            REDIS.down(exc)  # the health key expires by itself
        await self.pool.aclose()
        self._pool = None

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        # A freed slot may take a job that waited for one.
        self.wake.set()


async def listen(redis: ArqRedis, queue_prefix: str, workers: dict[str, WakeableWorker]) -> None:
    """Route wake-up messages to the workers of their queue; reconnects while Redis is away."""
    channel = wake_channel(queue_prefix)
    backoff = Backoff(first=0.5, cap=RECONNECT_MAX_S)
    while True:
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            backoff.reset()
            for w in workers.values():
                w.wake.set()  # anything published while we were not listening
            while True:
                # A read timeout of our own: an idle channel returns None here, where the client's
                # socket timeout would raise (and the listener reconnect every few seconds).
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=LISTEN_TIMEOUT_S)
                if message is not None and message.get("type") == "message":
                    _route(message, workers)
        except (RedisError, OSError) as exc:
            # Wake-ups are a shortcut (the idle poll is the safety net): no Redis error may end the listener.
            if is_redis_outage(exc):
                REDIS.down(exc)
            else:
                log.warning("wake-up listener: %s; subscribing again", exc)
            await backoff.sleep()
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]


def _route(message: dict[str, Any], workers: dict[str, WakeableWorker]) -> None:
    data = message.get("data")
    text = data.decode() if isinstance(data, bytes) else str(data)
    if text == "abort":
        for w in workers.values():
            w.wake.set()
        return
    queue, _, due = text.partition("|")
    worker = workers.get(queue)
    if worker is not None:
        worker.wake_at(float(due or 0))
