"""The ``steward`` command: ``up``, ``api``, ``worker``, ``migrate``, ``bootstrap``, ``audit``.

``steward up`` is the one-command local run: embedded servers when ``DATABASE_URL`` / ``REDIS_URL`` are
unset, migrations, a ``demo`` tenant with the example workflows, then the API and one worker as child
processes until Ctrl-C. The other commands are what a deployment runs, one process each.

One module per group of subcommands; each adds its parsers and handlers. Handlers keep their heavy
imports inside, so ``steward --help`` stays quick. ``python -m app.cli`` runs ``__main__.py``, which
imports this package like any other caller: one copy of every module (and of :class:`CliError`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

from app.cli import audit, database, serve, up
from app.cli.common import CliError

__all__ = ["CliError", "main"]


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
    up.add_parser(sub)
    serve.add_parsers(sub)
    database.add_parsers(sub)
    audit.add_parser(sub)
    return parser
