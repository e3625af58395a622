"""The reconciler: repairs what crashes and lost messages leave behind, from Postgres alone.

- running steps whose lease expired (their worker died) fail that attempt as transient and retry;
- waiting steps past their deadline fail (the deferred arq job normally fires first);
- outbox rows not claimed in time (Redis flushed or down, a relay process died) are sent again.
Each pass handles a bounded batch; every row is re-checked under its run's lock before anything is
written, so reconcilers running in several worker processes never act on a row twice.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select
from sqlalchemy.orm import InstrumentedAttribute

from app.engine.advance import now
from app.engine.attempts import expire_lease, fire_wait_timeout
from app.engine.models import Outbox
from app.engine.runtime import Runtime
from app.engine.state_machine import RunStatus
from app.engine.tx import Job
from app.engine.unit import in_tx
from app.runs.models import Run, StepRun

log = logging.getLogger(__name__)
BATCH = 200


@dataclass
class Report:
    leases_expired: int = 0
    waits_timed_out: int = 0
    jobs_resent: int = 0


async def reconcile_once(runtime: Runtime) -> Report:
    report = Report()
    settings = runtime.settings
    for step_run_id in await _due(runtime, StepRun.lease_expires_at, "running"):
        report.leases_expired += await in_tx(runtime, expire_lease, settings, step_run_id)
    for step_run_id in await _due(runtime, StepRun.wait_deadline, "waiting"):
        report.waits_timed_out += await in_tx(runtime, fire_wait_timeout, settings, step_run_id)
    report.jobs_resent = await resend_stale_outbox(runtime)
    if report.leases_expired or report.waits_timed_out:
        log.info("reconciler: %s", report)
    return report


async def _due(runtime: Runtime, column: InstrumentedAttribute[datetime | None], status: str) -> list[uuid.UUID]:
    async with runtime.sessionmaker() as db:
        rows = await db.execute(select(StepRun.id).where(StepRun.status == status, column < now()).limit(BATCH))
        return list(rows.scalars())


async def resend_stale_outbox(runtime: Runtime) -> int:
    """Send again the jobs whose rows outlived ``outbox_stale_s`` (not for paused runs: they wait)."""
    stale = now() - timedelta(seconds=runtime.settings.outbox_stale_s)
    async with runtime.sessionmaker() as db:
        rows = (
            await db.execute(
                select(Outbox.kind, Outbox.job_id, Outbox.queue, Outbox.not_before)
                .join(Run, Run.id == Outbox.run_id)
                .where(
                    Outbox.created_at < stale,
                    or_(Outbox.not_before.is_(None), Outbox.not_before < stale),
                    Run.status != RunStatus.PAUSED.value,
                )
                .order_by(Outbox.id)
                .limit(BATCH * 5)
            )
        ).all()
    if rows:
        await runtime.relay.send([Job(kind, job_id, queue, not_before) for kind, job_id, queue, not_before in rows])
    return len(rows)
