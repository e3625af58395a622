"""Where the tests run: the repository's root, and this process's pytest-xdist worker."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def worker_id() -> str:
    """pytest-xdist's worker id ("gw0", "gw1", ...), or "master" when not distributed."""
    return os.environ.get("PYTEST_XDIST_WORKER", "master")


def worker_index(worker: str) -> int:
    return int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
