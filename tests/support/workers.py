"""Engine settings for tests, and ``steward worker`` as a real subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

from app.config import Settings
from tests.support.env import ROOT

# Fast engine settings for tests: short backoffs, a reconciler every second, short leases.
FAST = {
    "retry_backoff_base_s": 0.05,
    "retry_backoff_max_s": 1.0,
    "reconcile_interval_s": 1.0,
    "outbox_stale_s": 1.0,
    "lease_s": 2.0,
    "worker_shutdown_grace_s": 2.0,
}


class WorkerProcess:
    """``steward worker`` as a real subprocess, so a test can SIGKILL it."""

    def __init__(self, settings: Settings, **overrides: Any) -> None:
        env = {
            **os.environ,
            "DATABASE_URL": settings.database_url or "",
            "REDIS_URL": settings.redis_url or "",
            "STEWARD_QUEUE_PREFIX": settings.queue_prefix,
            "STEWARD_HTTP_ALLOW_PRIVATE_NETWORKS": "true",
            "STEWARD_SECRET_KEYS": settings.secret_keys or "",
        }
        for key, value in {**FAST, **overrides}.items():
            env[f"STEWARD_{key.upper()}"] = str(value)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker", "--concurrency", "5"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc.stderr:
            self.proc.stderr.close()
