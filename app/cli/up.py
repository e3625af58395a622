"""``steward up``: embedded servers when ``DATABASE_URL`` / ``REDIS_URL`` are unset, migrations, the demo
tenant, then the API and one worker as child processes, supervised until Ctrl-C."""

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
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from app.cli.common import CliError, check_database, check_redis, load_settings
from app.cli.database import DEMO_TENANT, DemoTenant, bootstrap_demo, migrate
from app.cli.serve import API_SHUTDOWN_TIMEOUT_S
from app.config import Settings

# `steward up` gives its children their own shutdown time plus this margin after SIGTERM, then SIGKILLs.
CHILD_GRACE_MARGIN_S = 5.0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    up = sub.add_parser(
        "up",
        help="run everything locally (embedded servers when DATABASE_URL / REDIS_URL are unset)",
        description="Start embedded PostgreSQL and Redis if DATABASE_URL / REDIS_URL are unset, migrate, "
        f"bootstrap the '{DEMO_TENANT}' tenant, then run the API and one worker until Ctrl-C.",
    )
    up.set_defaults(handler=cmd_up)


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

    settings = load_settings()
    # A terminal: text lines, for `steward up` and the processes it starts, unless the format is set.
    text = {} if os.environ.get("STEWARD_LOG_FORMAT") else {"STEWARD_LOG_FORMAT": "text"}
    configure_logging(settings.log_level, "text" if text else settings.log_format)
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

        migrate(database_url)
        demo = asyncio.run(bootstrap_demo(database_url, DEMO_TENANT))
        _print_banner(
            settings, database_url if "PostgreSQL" in embedded else None, demo, data_dir if embedded else None
        )

        env = {**os.environ, **text, "DATABASE_URL": database_url, "REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"}
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
