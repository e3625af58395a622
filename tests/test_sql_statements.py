"""Every SQL statement of the application, prepared against the migrated schema.

A renamed column, a dropped table or a typo in a statement fails here instead of at runtime in the one
code path that runs it. The statements are found, not listed: every string constant and f-string under
``app/`` and ``workers/`` that starts like a statement (``SELECT``, ``INSERT INTO``, ``UPDATE``,
``DELETE FROM``, ``WITH x AS (``), wherever it lives. Then:

- plain strings are prepared as they are (SQLAlchemy ``text()`` strings with ``:name`` parameters are
  first compiled for asyncpg, as SQLAlchemy does);
- an f-string's pieces are evaluated in its module (module constants such as column lists), or, for a
  function's local variable, take each of the values in ``REPRESENTATIVE``;
- statements put together by a builder function are marked in ``BUILT`` and prepared from the builder's
  output for a representative set of arguments (``test_built_statements_prepare``).

``PREPARE`` parses, resolves names and infers parameter types without running anything.
"""

from __future__ import annotations

import ast
import importlib
import itertools
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg

from app.engine import state_machine, unit_of_work
from app.pg import Conn, versioned_update
from tests.support.db import connect
from tests.support.env import ROOT

PACKAGES = ("app", "workers")
# Uppercase keywords only: the code writes SQL that way, and messages such as "Update the tool" stay out.
STATEMENT = re.compile(
    r"\s*(SELECT\s|INSERT\s+INTO\s|UPDATE\s+[\w{}]+\s|DELETE\s+FROM\s|WITH\s+(RECURSIVE\s+)?\w+\s+AS\s+(NOT\s+)?(MATERIALIZED\s+)?\()"
)
FORMAT_FIELD = re.compile(r"(?<!\{)\{\w+\}(?!\})")
NAMED_PARAMETER = re.compile(r"(?<![:\w]):[A-Za-z_]\w*")
# A function's local variables in f-strings: the values they take.
REPRESENTATIVE: dict[str, tuple[Any, ...]] = {
    "period": ("hour", "day"),  # budgets: a window's period
    "column": ("lease_expires_at", "wait_deadline"),  # the reconciler's due-time columns
}
# Statements a builder function puts together (a distinctive piece of their template -> the builder).
BUILT = {
    "WHERE id = ${} AND version = ${} RETURNING version": "app.pg.versioned_update",
    "FROM jsonb_to_recordset(${}::jsonb) AS v(id uuid, version int{})": "app.engine.state_machine.bulk_moves_sql",
    "{moves}": "app.engine.unit_of_work._flush_sql",
}
# Columns the engine's versioned writes set (state_machine.transition_run / transition_step callers).
RUN_COLUMNS = ("error", "finished_at", "output", "started_at", "status_reason", "updated_at")
STEP_COLUMNS = ("attempts", "current_attempt_id", "error", "finished_at", "input", "lease_expires_at",
                "lease_owner", "output", "started_at", "wait_deadline")


@dataclass(frozen=True)
class Statement:
    where: str  # path:line
    sql: str


@dataclass(frozen=True)
class Found:
    where: str
    module: str
    node: ast.Constant | ast.JoinedStr


def _template(node: ast.JoinedStr) -> str:
    return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)


def scan() -> list[Found]:
    """Every statement-like string constant and f-string in the application's packages."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT)
            module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
            tree = ast.parse(path.read_text(), filename=str(path))
            inside_fstrings = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in inside_fstrings:
                    text_ = node.value
                elif isinstance(node, ast.JoinedStr):
                    text_ = _template(node)
                else:
                    continue
                if STATEMENT.match(text_):
                    found.append(Found(f"{relative}:{node.lineno}", module, node))
    return found


def _built_by(found: Found) -> str | None:
    text_ = found.node.value if isinstance(found.node, ast.Constant) else _template(found.node)
    return next((builder for piece, builder in BUILT.items() if piece in text_), None)


def _renderings(found: Found) -> Iterator[str]:
    """The statement's text: as written, or each combination of its f-string pieces' values."""
    node = found.node
    if isinstance(node, ast.Constant):
        assert isinstance(node.value, str)
        assert not FORMAT_FIELD.search(node.value), f"{found.where}: a str.format template: add its builder to BUILT"
        yield node.value
        return
    namespace = vars(importlib.import_module(found.module))
    choices: list[tuple[Any, ...]] = []
    for piece in node.values:
        if isinstance(piece, ast.Constant):
            choices.append((piece.value,))
            continue
        assert isinstance(piece, ast.FormattedValue) and piece.format_spec is None and piece.conversion == -1, (
            f"{found.where}: a formatted piece this test cannot render")
        source = ast.unparse(piece.value)
        try:
            choices.append((eval(source, namespace),))  # the application's own module constants
        except NameError:
            assert source in REPRESENTATIVE, (
                f"{found.where}: {{{source}}} is a local value: add representative values to REPRESENTATIVE")
            choices.append(REPRESENTATIVE[source])
    for combination in itertools.product(*choices):
        yield "".join(str(part) for part in combination)


def _as_asyncpg(sql: str) -> str:
    """SQLAlchemy ``text()`` statements (``:name`` parameters) as asyncpg receives them (``$n``)."""
    if "$1" in sql or not NAMED_PARAMETER.search(sql):
        return sql
    return str(text(sql).compile(dialect=PGDialect_asyncpg()))


def statements() -> list[Statement]:
    out = []
    for found in scan():
        if _built_by(found) is None:
            renderings = list(dict.fromkeys(_renderings(found)))
            for i, sql in enumerate(renderings):
                where = found.where if len(renderings) == 1 else f"{found.where}#{i}"
                out.append(Statement(where, _as_asyncpg(sql)))
    return out


def built() -> list[Statement]:
    """The builders' statements for the arguments the engine passes them."""
    cases = [
        ("versioned_update(run)", versioned_update("run", ())),
        ("versioned_update(run, columns)", versioned_update("run", RUN_COLUMNS)),
        ("versioned_update(step_run)", versioned_update("step_run", ())),
        ("versioned_update(step_run, columns)", versioned_update("step_run", STEP_COLUMNS)),
        ("bulk_moves_sql()", state_machine.bulk_moves_sql(1, 2, ())),
        ("bulk_moves_sql(columns)", state_machine.bulk_moves_sql(1, 2, STEP_COLUMNS)),
        ("flush", unit_of_work._flush_sql(None)),
        ("flush(moves)", unit_of_work._flush_sql(("finished_at", "lease_expires_at", "lease_owner"))),
        ("flush(moves, columns)", unit_of_work._flush_sql(STEP_COLUMNS)),
    ]
    return [Statement(where, sql) for where, sql in cases]


STATEMENTS = statements()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def conn(database_url: str) -> AsyncIterator[Conn]:
    connection = await connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()


async def prepares(conn: Conn, statement: Statement) -> None:
    try:
        await conn.prepare(statement.sql)
    except asyncpg.PostgresError as exc:
        pytest.fail(f"{statement.where}: {type(exc).__name__}: {exc}\n{statement.sql}")


def test_the_scan_finds_the_application_statements() -> None:
    found = scan()
    assert len(STATEMENTS) > 100, len(STATEMENTS)
    # Each marker in BUILT still names a statement in the code (else the builder moved or went).
    for builder in BUILT.values():
        assert any(_built_by(f) == builder for f in found), f"no statement is built by {builder} any more"
    # And the scan sees every package, including the workers and the engine's hot path.
    places = {s.where.split(":")[0] for s in STATEMENTS}
    assert any(p.startswith("workers/") for p in places) and "app/engine/state_machine.py" in places


@pytest.mark.parametrize("statement", STATEMENTS, ids=[s.where for s in STATEMENTS])
async def test_statement_prepares(conn: Conn, statement: Statement) -> None:
    await prepares(conn, statement)


@pytest.mark.parametrize("statement", built(), ids=[s.where for s in built()])
async def test_built_statements_prepare(conn: Conn, statement: Statement) -> None:
    await prepares(conn, statement)
