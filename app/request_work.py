"""The unit of engine work of a write request: flushed, committed and relayed before the response goes out.

Routes that move runs (start, operator actions, signals, approval decisions) take :data:`Work`: a
:class:`UnitOfWork` on the request session's connection. When the handler returns, the dependency
writes what the work collected, commits, and hands the jobs to the relay, in that order: jobs are
sent only once their rows are committed, so a worker never finds a job before its attempt. It runs
with ``scope="function"``, i.e. before the response is sent, so a failed commit answers as a
problem+json error instead of a 2xx for a write that was lost. A handler that raises commits nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request

from app.db import Db
from app.engine.unit_of_work import UnitOfWork
from app.pg import driver
from app.runtime import AppRuntime

# Set in the request's scope by a route class that turns an error into a response itself (the dashboard's
# pages): the error then never reaches this dependency, which would otherwise commit what the handler
# wrote before it failed.
ANSWERED_WITH_ERROR = "steward.answered_with_error"


async def request_work(request: Request, db: Db, runtime: AppRuntime) -> AsyncIterator[UnitOfWork]:
    """A unit of work in the request's transaction; flushed, committed and relayed after the handler
    (nothing is committed when the handler failed: the session rolls back as it closes)."""
    work = UnitOfWork(await driver(db))
    yield work
    if request.scope.get(ANSWERED_WITH_ERROR):
        return
    await work.flush()
    await db.commit()
    await runtime.after_commit(work)


# scope="function": the code after ``yield`` runs before the response is sent (FastAPI >= 0.121). Routes
# list it after the caller's Ctx: the caller is authenticated, and the session scoped to its tenant,
# before the work begins.
Work = Annotated[UnitOfWork, Depends(request_work, scope="function")]
