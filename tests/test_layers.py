"""The layering of docs/architecture.md, checked: a broken rule fails CI instead of drifting in.

Imports are read from the source (``ast``), so the check covers imports inside functions too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = {"app.pg", "app.db", "app.config", "app.clock", "app.canonical", "app.pagination", "app.errors",
        "app.outage", "app.http", "app.logs", "app.redis", "app.context", "app.json_schema", "app.input_guard"}
# Who may import the engine: the domains that drive runs, the workers, the one path every tool call takes
# (it runs inside a claimed step: attempts, checkpoints, gates), the routes' unit-of-work dependency, and
# the composition roots (the app, the CLI, the process resources, the table registry).
ENGINE_USERS = ("app.engine", "app.runs", "app.approvals", "workers", "app.tools.calls", "app.request_work",
                "app.main", "app.cli", "app.runtime", "app.models")
SQL_CALLS = {"execute", "fetch", "fetchrow", "fetchval", "executemany", "scalar", "scalars", "copy_records_to_table"}


def modules() -> Iterator[tuple[str, ast.Module]]:
    for package in ("app", "workers"):
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            yield name, ast.parse(path.read_text(), str(path))


def imports(tree: ast.Module) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def within(name: str, packages: tuple[str, ...] | set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


MODULES = dict(modules())


def test_only_runs_approvals_and_workers_import_the_engine() -> None:
    offenders = {name: sorted(i for i in imports(tree) if within(i, ("app.engine",)))
                 for name, tree in MODULES.items() if not within(name, ENGINE_USERS)}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_engine_does_not_import_the_domains_that_call_it() -> None:
    offenders = {name: sorted(i for i in imports(tree) if within(i, ("app.runs", "app.approvals", "workers")))
                 for name, tree in MODULES.items() if within(name, ("app.engine",))}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_core_imports_no_domain() -> None:
    def domain(module: str) -> bool:
        return (module.startswith("app.") and not within(module, CORE)) or within(module, ("workers",))

    offenders = {name: sorted(i for i in imports(tree) if domain(i)) for name, tree in MODULES.items() if name in CORE}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_nothing_imports_the_tests() -> None:
    assert [name for name, tree in MODULES.items() if any(within(i, ("tests",)) for i in imports(tree))] == []


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.endswith(".routes") or within(n, ("app.dashboard",))))
def test_routes_hold_no_sql(name: str) -> None:
    tree = MODULES[name]
    calls = sorted({node.func.attr for node in ast.walk(tree)
                    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in SQL_CALLS})
    statements = [node.value[:40] for node in ast.walk(tree) if isinstance(node, ast.Constant)
                  and isinstance(node.value, str)
                  and node.value.lstrip().startswith(("SELECT ", "INSERT ", "UPDATE ", "DELETE ", "WITH "))]
    assert (calls, statements) == ([], []), f"{name}: SQL belongs in the domain's service"


def test_tests_import_helpers_from_support_not_from_conftest_files() -> None:
    offenders = []
    for package in ("tests", "bench"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if "node_modules" in path.parts:
                continue
            found = imports(ast.parse(path.read_text(), str(path)))
            offenders += [f"{path.relative_to(ROOT)}: {i}" for i in sorted(found) if "conftest" in i.split(".")]
    assert offenders == []
