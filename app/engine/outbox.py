"""Outbox relay: hands committed jobs to arq, retrying while Redis is unreachable.

Jobs go in with ``SET NX`` on arq's own job key, so a job already queued (or re-sent by the
reconciler) is never enqueued twice; a Lua script sends a whole batch in one round trip.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Iterable
from datetime import datetime
from typing import Any, cast

from arq.connections import ArqRedis
from arq.constants import abort_jobs_ss, job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from redis.exceptions import RedisError

from app.engine.unit_of_work import Job
from app.outage import REDIS

log = logging.getLogger(__name__)

FUNCTIONS = {"step": "run_step", "wait_timeout": "fire_wait_timeout"}
# arq's own default: a job not started within a day of its due time is dropped (the reconciler re-sends).
EXPIRES_EXTRA_MS = 86_400_000

# KEYS: job key prefix, result key prefix, wake-up channel. ARGV: (id, queue, score, ttl, payload)*.
# Publishes the earliest due time per queue so idle workers wake at once (workers/wakeup.py).
_ENQUEUE_MANY = """
local sent, due = 0, {}
for i = 1, #ARGV, 5 do
  local id, queue, score, ttl, payload = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  if redis.call('EXISTS', KEYS[2] .. id) == 0 and redis.call('SET', KEYS[1] .. id, payload, 'NX', 'PX', ttl) then
    redis.call('ZADD', queue, score, id)
    sent = sent + 1
    if due[queue] == nil or tonumber(score) < due[queue] then due[queue] = tonumber(score) end
  end
end
for queue, score in pairs(due) do
  redis.call('PUBLISH', KEYS[3], queue .. '|' .. string.format('%d', score))
end
return sent
"""


def _score_ms(not_before: datetime | None, now_ms: int) -> int:
    return max(now_ms, int(not_before.timestamp() * 1000)) if not_before is not None else now_ms


def wake_channel(queue_prefix: str) -> str:
    """The pub/sub channel workers of ``<queue_prefix>:<priority>`` queues listen on (workers/wakeup.py)."""
    return f"{queue_prefix}:wake"


def wake_channel_of(queue: str) -> str:
    return wake_channel(queue.rsplit(":", 1)[0])


async def enqueue_many(redis: ArqRedis, jobs: Iterable[Job]) -> int:
    """Enqueue jobs into their arq queues; returns how many were new."""
    jobs = list(jobs)
    now_ms = int(time.time() * 1000)
    argv: list[Any] = []
    for job in jobs:
        arg = job.job_id if job.kind == "step" else job.job_id.split(":")[1]
        score = _score_ms(job.not_before, now_ms)
        payload = serialize_job(FUNCTIONS[job.kind], (arg,), {}, None, now_ms)
        argv += [job.job_id, job.queue, score, score - now_ms + EXPIRES_EXTRA_MS, payload]
    if not argv:
        return 0
    channel = wake_channel_of(jobs[0].queue)
    sent = redis.eval(_ENQUEUE_MANY, 3, job_key_prefix, result_key_prefix, channel, *argv)
    return int(await cast(Awaitable[Any], sent))


async def dequeue_jobs(redis: ArqRedis, jobs: Iterable[tuple[str, str]]) -> None:
    """Drop queued jobs whose attempts another job took over (they would only find nothing to do)."""
    async with redis.pipeline(transaction=False) as pipe:
        for queue, job_id in jobs:
            pipe.zrem(queue, job_id)
            # Not deleted: a worker may be starting it this instant (and would log it as expired).
            pipe.pexpire(job_key_prefix + job_id, 60_000)
        await pipe.execute()


async def abort_jobs(redis: ArqRedis, job_ids: Iterable[str], channel: str) -> None:
    """Ask the workers running these jobs to cancel them (arq's abort set), and wake them to look."""
    now_ms = int(time.time() * 1000)
    mapping = {job_id: now_ms for job_id in job_ids}
    if mapping:
        await redis.zadd(abort_jobs_ss, mapping)
        await redis.publish(channel, "abort")


class Relay:
    """Sends jobs after commit; what cannot be sent now is retried in the background.

    Losing this process loses nothing: the rows stay in the outbox until a worker claims the job,
    and the reconciler re-sends rows that waited too long. While Redis is away the jobs waiting here
    are kept once each (by job id), however often the reconciler hands them in again.
    """

    def __init__(self, redis: ArqRedis, retry_s: float, queue_prefix: str) -> None:
        self.redis = redis
        self.wake_channel = wake_channel(queue_prefix)
        self.retry_s = retry_s
        self._pending: dict[str, Job] = {}
        self._aborts: list[str] = []
        self._wake = asyncio.Event()
        self._in_flight = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="outbox-relay")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def drop(self, jobs: list[tuple[str, str]]) -> None:
        """Best effort: a job left behind finds its attempt taken and does nothing."""
        try:
            await dequeue_jobs(self.redis, jobs)
        except (RedisError, OSError) as exc:
            REDIS.down(exc)

    async def send(self, jobs: list[Job], aborts: list[str] | None = None) -> None:
        try:
            if jobs:
                await enqueue_many(self.redis, jobs)
            if aborts:
                await abort_jobs(self.redis, aborts, self.wake_channel)
        except (RedisError, OSError) as exc:
            REDIS.down(exc)
            self._pending.update((job.job_id, job) for job in jobs)
            self._aborts.extend(aborts or [])
            self._wake.set()
        else:
            REDIS.up()

    @property
    def backlog(self) -> int:
        """Jobs not yet handed to Redis (waiting, or being retried right now)."""
        return len(self._pending) + self._in_flight

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending or self._aborts:
                jobs, self._pending = self._pending, {}
                aborts, self._aborts = self._aborts, []
                self._in_flight = len(jobs)
                try:
                    await enqueue_many(self.redis, jobs.values())
                    await abort_jobs(self.redis, aborts, self.wake_channel)
                except (RedisError, OSError) as exc:
                    REDIS.down(exc)
                    self._pending = {**jobs, **self._pending}
                    self._aborts = aborts + self._aborts
                    await asyncio.sleep(self.retry_s)
                else:
                    REDIS.up()
                finally:
                    self._in_flight = 0
