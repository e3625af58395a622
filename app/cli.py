"""The ``steward`` command: ``up``, ``api``, ``worker``, ``migrate``, ``bootstrap``, ``audit``.

``steward up`` is the one-command local run: embedded servers when ``DATABASE_URL`` / ``REDIS_URL`` are
unset, migrations, a ``demo`` tenant with the example workflows, then the API and one worker as child
processes until Ctrl-C. The other commands are what a deployment runs, one process each.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, NoReturn
from urllib.parse import urlsplit, urlunsplit

from app.config import Settings, get_settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

DEMO_TENANT = "demo"
# `steward up` gives its children their own shutdown time plus this margin after SIGTERM, then SIGKILLs.
CHILD_GRACE_MARGIN_S = 5.0
# uvicorn waits for open connections (long polls last up to a minute) unless told otherwise; stay under
# the grace period of `steward up` and of a default Kubernetes pod (30 s).
API_SHUTDOWN_TIMEOUT_S = 8
CONNECT_TIMEOUT_S = 10.0
EXIT_USAGE = 2


class CliError(Exception):
    """A failure to report as one line on stderr, without a traceback."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# --- entry point ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> NoReturn:
    parser = _parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        code = handler(args)
    except CliError as exc:
        print(f"steward {args.command}: {exc}", file=sys.stderr)
        code = exc.code
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="steward",
        description="Steward: a durable, supervised runtime for AI-agent workflows.",
        epilog="Configuration comes from the environment (DATABASE_URL, REDIS_URL, STEWARD_*); see docs/operations.md.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser(
        "up",
        help="run everything locally (embedded servers when DATABASE_URL / REDIS_URL are unset)",
        description="Start embedded PostgreSQL and Redis if DATABASE_URL / REDIS_URL are unset, migrate, "
        f"bootstrap the '{DEMO_TENANT}' tenant, then run the API and one worker until Ctrl-C.",
    )
    up.set_defaults(handler=cmd_up)

    api = sub.add_parser("api", help="serve the HTTP API (needs DATABASE_URL and REDIS_URL)")
    api.add_argument("--host", help="interface to listen on (default: STEWARD_HOST or 127.0.0.1)")
    api.add_argument("--port", type=int, help="port to listen on (default: PORT / STEWARD_PORT or 8000)")
    api.set_defaults(handler=cmd_api)

    worker = sub.add_parser("worker", help="run a worker process (needs DATABASE_URL and REDIS_URL)")
    worker.add_argument(
        "--concurrency", type=_positive_int, help="steps run at once (default: STEWARD_WORKER_CONCURRENCY)"
    )
    worker.set_defaults(handler=cmd_worker)

    migrate = sub.add_parser("migrate", help="upgrade the database schema (needs DATABASE_URL)")
    migrate.set_defaults(handler=cmd_migrate)

    bootstrap = sub.add_parser(
        "bootstrap", help="create a tenant if needed and print a new admin API key (needs DATABASE_URL)"
    )
    bootstrap.add_argument("--tenant", default=DEMO_TENANT, help=f"tenant name (default: {DEMO_TENANT})")
    bootstrap.set_defaults(handler=cmd_bootstrap)

    from app.audit.cli import add_audit_parser

    add_audit_parser(sub)
    return parser


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


# --- settings and pre-flight checks -----------------------------------------------------------------


def _settings() -> Settings:
    from pydantic import ValidationError

    try:
        return get_settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise CliError(f"invalid setting {field}: {first['msg']}", EXIT_USAGE) from None


def _require_urls(settings: Settings, *, redis: bool) -> tuple[str, str | None]:
    missing = [
        name
        for name, value in (("DATABASE_URL", settings.database_url), ("REDIS_URL", settings.redis_url))
        if not value and (redis or name == "DATABASE_URL")
    ]
    if missing:
        one = len(missing) == 1
        what = "is not set: set it to your server" if one else "are not set: set them to your servers"
        raise CliError(
            f"{' and '.join(missing)} {what}, or use `steward up` to run everything with embedded servers",
            EXIT_USAGE,
        )
    assert settings.database_url is not None
    return settings.database_url, settings.redis_url


def _safe_url(url: str) -> str:
    """The URL without its password, fit for an error message."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<unparsable URL>"


def _reason(exc: BaseException) -> str:
    """A one-line description of a connection failure, digging through SQLAlchemy's wrapping."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT_S:g} s"
    orig = getattr(exc, "orig", None)
    if orig is not None:
        exc = orig.__cause__ or orig
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0]}" if text else exc.__class__.__name__


def check_database(url: str) -> None:
    """Fail with one line, not a traceback, when the database is unreachable or the URL is wrong."""
    from app.db import async_url

    try:
        async_url(url)
    except ValueError as exc:
        raise CliError(f"DATABASE_URL: {exc}", EXIT_USAGE) from None
    try:
        asyncio.run(_ping_database(url))
    except Exception as exc:
        raise CliError(f"cannot connect to the database at {_safe_url(url)} ({_reason(exc)})") from None


async def _ping_database(url: str) -> None:
    from sqlalchemy import text

    from app.db import make_engine

    engine = make_engine(url, pool_size=1, max_overflow=0)
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S), engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    finally:
        await engine.dispose()


def check_redis(url: str) -> None:
    try:
        asyncio.run(_ping_redis(url))
    except Exception as exc:
        raise CliError(f"cannot connect to Redis at {_safe_url(url)} ({_reason(exc)})") from None


async def _ping_redis(url: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S)
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await client.ping()
    finally:
        await client.aclose()


# --- steward migrate / bootstrap --------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    database_url, _ = _require_urls(_settings(), redis=False)
    check_database(database_url)
    _migrate(database_url)
    print("Database schema is up to date.")
    return 0


def _migrate(database_url: str) -> None:
    from app.db import run_migrations

    run_migrations(database_url)


def cmd_bootstrap(args: argparse.Namespace) -> int:
    database_url, _ = _require_urls(_settings(), redis=False)
    check_database(database_url)
    created, key, password = asyncio.run(_bootstrap(database_url, args.tenant))
    print(f"Tenant '{args.tenant}' {'created' if created else 'exists'}.")
    print(f"New admin API key (shown once, store it now): {key}")
    if password:
        print(f"Local sign-in (loopback only, no identity provider configured): admin / {password} (shown once)")
    return 0


async def _local_admin(db: AsyncSession, tenant_id: uuid.UUID) -> str | None:
    """Without an identity provider, the bootstrap admin signs in locally: its new password, if any."""
    if _settings().oidc_issuer:
        return None
    from app.auth.local import ensure_local_admin
    from app.pg import driver

    return await ensure_local_admin(await driver(db), tenant_id)


async def _bootstrap(database_url: str, tenant: str) -> tuple[bool, str, str | None]:
    from app.tenants.service import bootstrap_tenant

    async with _session(database_url) as db:
        try:
            result = await bootstrap_tenant(db, tenant)
        except Exception as exc:
            _raise_if_not_migrated(exc)
            raise
        password = await _local_admin(db, result.tenant_id)
        await db.commit()
    return result.tenant_created, result.api_key, password


@dataclass(frozen=True)
class DemoTenant:
    api_key: str | None  # set only on the run that created the tenant
    workflows_loaded: list[str]
    local_password: str | None = None  # the local admin's, set only when first made


async def _bootstrap_demo(database_url: str, tenant: str) -> DemoTenant:
    """Create the tenant and its first key once; on later starts keep the keys there are.

    ``bootstrap_tenant`` mints a key on every call: calling it on each ``steward up`` would leave a pile of
    valid admin keys that nobody ever saw.
    """
    from sqlalchemy import select

    from app.tenants.models import Tenant
    from app.tenants.service import bootstrap_tenant
    from app.workflows.service import ensure_example_workflows

    async with _session(database_url) as db:
        tenant_id = (await db.execute(select(Tenant.id).where(Tenant.name == tenant))).scalar_one_or_none()
        key = None
        if tenant_id is None:
            result = await bootstrap_tenant(db, tenant)
            tenant_id, key = result.tenant_id, result.api_key
        password = await _local_admin(db, tenant_id)
        loaded = await ensure_example_workflows(db, tenant_id)
        await db.commit()
    return DemoTenant(api_key=key, workflows_loaded=list(loaded), local_password=password)


@contextlib.asynccontextmanager
async def _session(database_url: str) -> AsyncIterator[AsyncSession]:
    from app.db import make_engine, make_sessionmaker

    engine = make_engine(database_url, pool_size=1, max_overflow=0)
    try:
        async with make_sessionmaker(engine)() as db:
            yield db
    finally:
        await engine.dispose()


def _raise_if_not_migrated(exc: BaseException) -> None:
    if "does not exist" in str(exc) and "relation" in str(exc):
        raise CliError("the database has no Steward tables yet: run `steward migrate` first") from None


# --- steward api / worker ---------------------------------------------------------------------------


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    settings = _settings()
    database_url, redis_url = _require_urls(settings, redis=True)
    assert redis_url is not None
    check_database(database_url)
    try:
        check_redis(redis_url)
    except CliError as exc:
        # The API works without Redis for a while: runs are committed with their outbox rows and the
        # relay sends the jobs once Redis answers; /readyz reports it down meanwhile.
        print(f"steward api: warning: {exc}; starting anyway (/readyz will say so)", file=sys.stderr)
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
        log_config=log_config(),
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _settings()
    database_url, redis_url = _require_urls(settings, redis=True)
    assert redis_url is not None
    check_database(database_url)
    try:
        check_redis(redis_url)
    except CliError as exc:
        # A worker waits for Redis as it would through an outage, rather than exit and be restarted.
        print(f"steward worker: warning: {exc}; starting anyway", file=sys.stderr)
    from app.logs import configure as configure_logging

    configure_logging()
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


# --- steward up -------------------------------------------------------------------------------------


class _Stop:
    """SIGINT/SIGTERM bookkeeping for `steward up`.

    Until the children run, a signal raises KeyboardInterrupt so the ``with`` blocks stop the embedded
    servers; afterwards it only sets a flag that the supervision loop acts on. A second signal during
    shutdown skips the grace period.
    """

    def __init__(self) -> None:
        self.supervising = False
        self.count = 0
        self.signal_name = ""

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        self.signal_name = signal.Signals(signum).name
        if not self.supervising:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def cmd_up(args: argparse.Namespace) -> int:
    from app.logs import configure as configure_logging

    configure_logging()
    settings = _settings()
    stop = _Stop()
    with stop.installed(), contextlib.ExitStack() as stack:
        database_url, redis_url = settings.database_url, settings.redis_url
        data_dir = Path(settings.data_dir).expanduser().resolve()
        embedded = [name for name, url in (("PostgreSQL", database_url), ("Redis", redis_url)) if not url]
        if embedded:
            from app.embedded import EmbeddedServerError, embedded_services

            print(f"Starting embedded {' and '.join(embedded)} (data in {data_dir}) ...", flush=True)
            started = time.monotonic()
            try:
                services = stack.enter_context(
                    embedded_services(data_dir, database_url=database_url, redis_url=redis_url)
                )
            except EmbeddedServerError as exc:
                raise CliError(str(exc)) from None
            database_url, redis_url = services.database_url, services.redis_url
            print(f"Embedded servers ready in {time.monotonic() - started:.1f} s.", flush=True)
        assert database_url is not None and redis_url is not None
        check_database(database_url)
        check_redis(redis_url)

        _migrate(database_url)
        demo = asyncio.run(_bootstrap_demo(database_url, DEMO_TENANT))
        _print_banner(
            settings, database_url if "PostgreSQL" in embedded else None, demo, data_dir if embedded else None
        )

        env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"}
        host, port = settings.host, settings.port
        stop.supervising = True
        children: dict[str, subprocess.Popen[bytes]] = {}
        try:
            children["api"] = _spawn(["api", "--host", host, "--port", str(port)], env)
            children["worker"] = _spawn(["worker"], env)
            failure = _supervise(children, stop, _browser_host(host), port)
        finally:
            grace = max(API_SHUTDOWN_TIMEOUT_S, settings.worker_shutdown_grace_s) + CHILD_GRACE_MARGIN_S
            _terminate(children, stop, grace)
        if failure:
            raise CliError(f"{failure}; stopped everything")
        print(f"Stopped ({stop.signal_name}).", flush=True)
    return 0


def _browser_host(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def _print_banner(
    settings: Settings, embedded_database_url: str | None, demo: DemoTenant, data_dir: Path | None
) -> None:
    base = f"http://{_browser_host(settings.host)}:{settings.port}"
    lines = [
        "",
        f"  API:        {base}/api/v1   (OpenAPI: {base}/docs)",
        f"  Tenant:     {DEMO_TENANT}",
    ]
    if demo.api_key is not None:
        lines.append(f"  Admin API key (shown once, store it now): {demo.api_key}")
    else:
        # The embedded database has no URL outside this process, so spell it out; an external one is
        # already in the user's environment (and may hold a password: never echo it).
        prefix = f"DATABASE_URL='{embedded_database_url}' " if embedded_database_url else ""
        lines += [
            "  Admin API key: shown on the first start only. To mint a new one while this runs:",
            f"    {prefix}steward bootstrap --tenant {DEMO_TENANT}",
        ]
    if demo.local_password is not None:
        lines.append(f"  Sign in:    {base}/auth/login as admin / {demo.local_password} (shown once; "
                     "loopback only)")
    elif not settings.oidc_issuer:
        lines.append(f"  Sign in:    {base}/auth/login as admin (password shown on the first start only)")
    if demo.workflows_loaded:
        lines.append(f"  Example workflows loaded: {', '.join(demo.workflows_loaded)}")
    if data_dir is not None:
        lines.append(f"  Data:       {data_dir} (embedded PostgreSQL and Redis)")
    lines.append("")
    print("\n".join(lines), flush=True)


def _spawn(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", *command],
        env=env,
        # Own session: a Ctrl-C in the terminal reaches only us, and we stop the children in order.
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if `steward up` dies without cleaning up (kill -9)."""
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _supervise(children: dict[str, subprocess.Popen[bytes]], stop: _Stop, host: str, port: int) -> str | None:
    """Wait for a stop signal or a child's death; return why a child died, or None on a requested stop."""
    announced = False
    deadline = time.monotonic() + 60
    while not stop.count:
        # Probe before polling, so "ready" is never printed after a child was seen dead.
        listening = not announced and _listening(host, port)
        for name, proc in children.items():
            code = proc.poll()
            if code is not None:
                return f"the {name} process {_describe_exit(code)}"
        if listening:
            print(f"Steward is ready at http://{host}:{port}/ (Ctrl-C to stop).", flush=True)
            announced = True
        elif not announced and time.monotonic() > deadline:
            print(f"The API is not answering on {host}:{port} yet; still waiting.", flush=True)
            deadline = float("inf")
        # A signal interrupts this sleep and its handler runs at once; the loop then sees the count.
        time.sleep(0.2)
    return None


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited unexpectedly with code {code}"


def _terminate(children: dict[str, subprocess.Popen[bytes]], stop: _Stop, grace_s: float) -> None:
    """SIGTERM every live child, SIGKILL what is left after the grace period (or at a second Ctrl-C)."""
    alive = [proc for proc in children.values() if proc.poll() is None]
    if alive:
        print("Stopping the API and the worker ...", flush=True)
    for proc in alive:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    signals_seen = stop.count
    deadline = time.monotonic() + grace_s
    while any(proc.poll() is None for proc in alive):
        if time.monotonic() > deadline or stop.count > signals_seen:
            for proc in alive:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            for proc in alive:
                proc.wait()
            break
        time.sleep(0.05)


if __name__ == "__main__":
    main()
