"""Workers that wake when work arrives instead of polling Redis every few milliseconds.

The outbox relay publishes ``<queue>|<due ms>`` on the ``<queue_prefix>:wake`` channel with every
batch it enqueues (and ``abort`` when it asks for jobs to be aborted). A worker waits for that, or
for a timer set to a deferred job's due time, and polls its queue then; a slow idle poll
(``worker_poll_delay_s``) remains as the safety net for a missed message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from arq import Worker
from arq.connections import ArqRedis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


def wake_channel(queue_prefix: str) -> str:
    return f"{queue_prefix}:wake"


class WakeableWorker(Worker):
    """An arq ``Worker`` whose poll loop sleeps until woken (see module docstring)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.wake = asyncio.Event()

    def wake_at(self, due_ms: float) -> None:
        delay = due_ms / 1000 - time.time()
        if delay <= 0:
            self.wake.set()
        else:
            asyncio.get_running_loop().call_later(delay, self.wake.set)

    async def main(self) -> None:
        # arq's main() polls on a fixed period; this is the same start-up with a wake-driven loop.
        if self._pool is None:
            from arq.connections import create_pool

            self._pool = await create_pool(
                self.redis_settings, job_deserializer=self.job_deserializer, job_serializer=self.job_serializer,
                default_queue_name=self.queue_name, expires_extra_ms=self.expires_extra_ms,
            )
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)
        while True:
            self.wake.clear()
            await self._poll_iteration()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=self.poll_delay_s)

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        # A freed slot may take a job that waited for one.
        self.wake.set()


async def listen(redis: ArqRedis, queue_prefix: str, workers: dict[str, WakeableWorker]) -> None:
    """Route wake-up messages to the workers of their queue; reconnects while Redis is away."""
    channel = wake_channel(queue_prefix)
    while True:
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            for w in workers.values():
                w.wake.set()  # anything published while we were not listening
            async for message in pubsub.listen():
                data = message.get("data")
                text = data.decode() if isinstance(data, bytes) else str(data)
                if text == "abort":
                    for w in workers.values():
                        w.wake.set()
                    continue
                queue, _, due = text.partition("|")
                worker = workers.get(queue)
                if worker is not None:
                    worker.wake_at(float(due or 0))
        except (RedisError, OSError) as exc:
            log.warning("wake-up listener: %s; reconnecting", exc)
            await asyncio.sleep(1)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
