"""``steward api`` and ``steward worker``: what a deployment runs, one process each."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from functools import partial

from app.cli.common import CliError, check_database, check_redis, load_settings, positive_int, require_urls
from app.config import Settings

# uvicorn waits for open connections (long polls last up to a minute) unless told otherwise; stay under
# the grace period of `steward up` and of a default Kubernetes pod (30 s).
API_SHUTDOWN_TIMEOUT_S = 8


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    api = sub.add_parser("api", help="serve the HTTP API (needs DATABASE_URL and REDIS_URL)")
    api.add_argument("--host", help="interface to listen on (default: STEWARD_HOST or 127.0.0.1)")
    api.add_argument("--port", type=int, help="port to listen on (default: PORT / STEWARD_PORT or 8000)")
    api.set_defaults(handler=cmd_api)

    worker = sub.add_parser("worker", help="run a worker process (needs DATABASE_URL and REDIS_URL)")
    worker.add_argument(
        "--concurrency", type=positive_int, help="steps run at once (default: STEWARD_WORKER_CONCURRENCY)"
    )
    worker.set_defaults(handler=cmd_worker)


def _preflight(command: str, without_redis: str) -> Settings:
    """Settings, with the database checked (required) and Redis checked (a warning: both processes ride
    out a Redis outage)."""
    settings = load_settings()
    database_url, redis_url = require_urls(settings, redis=True)
    assert redis_url is not None
    check_database(database_url)
    try:
        check_redis(redis_url)
    except CliError as exc:
        print(f"{command}: warning: {exc}; {without_redis}", file=sys.stderr)
    return settings


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    # The API works without Redis for a while: runs are committed with their outbox rows and the relay
    # sends the jobs once Redis answers; /readyz reports it down meanwhile.
    settings = _preflight("steward api", "starting anyway (/readyz will say so)")
    host = args.host if args.host is not None else settings.host
    port = args.port if args.port is not None else settings.port
    settings = settings.model_copy(update={"host": host, "port": port})

    import app.models  # noqa: F401  # see _serve_worker: complete the mapper registry up front
    from app.logs import config as log_config
    from app.main import create_app

    uvicorn.run(
        partial(create_app, settings),
        factory=True,
        host=host,
        port=port,
        timeout_graceful_shutdown=API_SHUTDOWN_TIMEOUT_S,
        log_config=log_config(settings.log_level, settings.log_format),
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    # A worker waits for Redis as it would through an outage, rather than exit and be restarted.
    settings = _preflight("steward worker", "starting anyway")
    from app.logs import configure as configure_logging

    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(_serve_worker(settings, args.concurrency))
    return 0


async def _serve_worker(settings: Settings, concurrency: int | None) -> None:
    """Run the worker until SIGTERM/SIGINT, which cancel it so in-flight work is released cleanly."""
    # Every mapped class must be imported before the first flush, or SQLAlchemy cannot resolve foreign
    # keys to tables no worker module happens to import (e.g. run_event.tenant_id -> tenant).
    import app.models  # noqa: F401
    from workers.main import run_worker

    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(run_worker(settings, concurrency=concurrency))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        # Our own signal handler cancelled the task; anything else cancelling us would re-raise below.
        if not task.cancelled():
            raise
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
