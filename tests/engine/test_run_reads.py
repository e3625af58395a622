"""The run document built in one query, and what starting and reading a run cost in statements."""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import event

from app.pg import Conn
from tests.support.runs import create_workflow, name, start_run
from tests.support.tenants import TenantKey

pytestmark = pytest.mark.xdist_group("engine")


def _ts(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


async def _expected(owner: Conn, run_id: str, order: list[str]) -> dict[str, Any]:
    """The document as the API built it from four queries and Python before it was one query."""
    rid = uuid.UUID(run_id)
    run = await owner.fetchrow("SELECT * FROM run WHERE id = $1", rid)
    assert run is not None
    attempts: dict[uuid.UUID, list[dict[str, Any]]] = {}
    for a in await owner.fetch("SELECT * FROM step_attempt WHERE run_id = $1 ORDER BY n", rid):
        attempts.setdefault(a["step_run_id"], []).append({
            "n": a["n"], "status": a["status"], "queued_at": _ts(a["queued_at"]), "not_before": _ts(a["not_before"]),
            "started_at": _ts(a["started_at"]), "finished_at": _ts(a["finished_at"]),
            "error": {"class": a["error_class"], "message": a["error_message"]} if a["error_class"] else None,
            "worker": a["worker"],
        })
    top: dict[str, dict[str, Any]] = {}
    for s in await owner.fetch("SELECT * FROM step_run WHERE run_id = $1 ORDER BY map_index NULLS FIRST", rid):
        common = {"status": s["status"], "output": s["output"], "error": s["error"],
                  "started_at": _ts(s["started_at"]), "finished_at": _ts(s["finished_at"]),
                  "attempts": attempts.get(s["id"], [])}
        if s["map_index"] is None:
            top[s["step_id"]] = {"id": s["step_id"], "kind": s["kind"], "input": s["input"], **common,
                                 "items": [] if s["kind"] == "map" else None}
        else:
            top[s["step_id"]]["items"].append({"index": s["map_index"], **common})
    for step in top.values():
        if step["kind"] == "map" and not step["items"]:
            step["items"] = None  # not expanded yet
    events = await owner.fetch("SELECT * FROM run_event WHERE run_id = $1 ORDER BY id", rid)
    return {
        "id": run_id, "workflow": run["workflow_name"], "workflow_version": run["workflow_version"],
        "status": run["status"], "status_reason": run["status_reason"], "priority": run["priority"],
        "created_at": _ts(run["created_at"]), "started_at": _ts(run["started_at"]),
        "finished_at": _ts(run["finished_at"]), "input": run["input"], "output": run["output"],
        "error": run["error"], "trace_id": None,
        "steps": [top[sid] for sid in order],
        "events": [{"id": e["id"], "type": e["type"], "step_id": e["step_id"], "map_index": e["map_index"],
                    "data": e["data"], "created_at": _ts(e["created_at"]), "trace_id": e["trace_id"]}
                   for e in events[:200]],
        "events_truncated": len(events) > 200,
    }


async def test_the_run_document_is_what_its_rows_say(
    client: httpx.AsyncClient, tenant: TenantKey, owner: Conn
) -> None:
    wf = name()
    await create_workflow(client, tenant.headers, wf, [
        {"id": "a", "tool": "echo", "args": {"x": 1.5, "s": "é\u2028"}},
        {"id": "m", "map": {"items": [1, {"k": [True, None]}, "three"], "tool": "echo"}},
        {"id": "w", "wait": {"signal": "go"}},
        {"id": "b", "needs": ["a"], "tool": "echo"},
        {"id": "e", "needs": ["a"], "map": {"items": "${{ steps.a.output.list }}", "tool": "echo"}},
    ])
    run = await start_run(client, tenant.headers, wf, {"deep": {"n": 2**60, "f": 0.1}})
    rid = uuid.UUID(run["id"])
    # Timestamps of every kind: a whole second (no fraction, as Python prints it), one with trailing zeros,
    # an attempt error, and an output.
    await owner.execute(
        "UPDATE step_run SET started_at = $2, finished_at = $3, output = '{\"o\": [1, \"x\"]}', "
        "error = '{\"message\": \"m\"}' WHERE run_id = $1 AND step_id = 'a'",
        rid, datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC), datetime(2030, 1, 2, 3, 4, 5, 120000, tzinfo=UTC))
    await owner.execute(
        "UPDATE step_attempt SET error_class = 'Boom', error_message = 'bad \"news\"', worker = 'w1', "
        "not_before = $2 WHERE run_id = $1 AND n = 1",
        rid, datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC))
    got = (await client.get(f"/api/v1/runs/{rid}", headers=tenant.headers)).json()
    expected = await _expected(owner, str(rid), ["a", "m", "w", "b", "e"])
    for step_got, step_expected in zip(got["steps"], expected["steps"], strict=True):
        assert step_got == step_expected
    assert got == expected
    step = {s["id"]: s for s in got["steps"]}
    assert step["a"]["started_at"] == "2030-01-02T03:04:05Z"
    assert step["a"]["finished_at"] == "2030-01-02T03:04:05.120000Z"
    assert [item["index"] for item in step["m"]["items"]] == [0, 1, 2]
    assert step["e"]["items"] is None and step["b"]["items"] is None  # a map not expanded yet; not a map


async def test_events_past_the_inline_limit_are_truncated(
    client: httpx.AsyncClient, tenant: TenantKey, owner: Conn
) -> None:
    wf = name()
    await create_workflow(client, tenant.headers, wf, [{"id": "w", "wait": {"signal": "go"}}])
    run = await start_run(client, tenant.headers, wf)
    rid = uuid.UUID(run["id"])
    await owner.execute(
        "INSERT INTO run_event (tenant_id, run_id, type, data) "
        "SELECT tenant_id, id, 'note', jsonb_build_object('i', i) FROM run, generate_series(1, 250) AS i "
        "WHERE id = $1", rid)
    got = (await client.get(f"/api/v1/runs/{rid}", headers=tenant.headers)).json()
    assert got["events_truncated"] is True and len(got["events"]) == 200
    assert got == await _expected(owner, str(rid), ["w"])


@contextmanager
def statements(app: FastAPI) -> Iterator[list[str]]:
    """Every statement the app's request sessions send meanwhile: those SQLAlchemy runs, and those run on
    the asyncpg connection directly (BEGIN and COMMIT among them)."""
    seen: list[str] = []
    engine = app.state.runtime.engine.sync_engine
    logged: list[Any] = []

    def log(query: Any) -> None:
        seen.append(query.query)

    def on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        conn = dbapi_connection.driver_connection
        if conn not in logged:
            conn.add_query_logger(log)
            logged.append(conn)

    def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    event.listen(engine, "checkout", on_checkout)
    event.listen(engine, "before_cursor_execute", on_execute)
    try:
        yield seen
    finally:
        event.remove(engine, "checkout", on_checkout)
        event.remove(engine, "before_cursor_execute", on_execute)
        for conn in logged:
            conn.remove_query_logger(log)


async def test_starting_and_reading_a_run_take_few_statements(
    app: FastAPI, client: httpx.AsyncClient, tenant: TenantKey
) -> None:
    wf = name()
    steps = [{"id": f"s{i}", "tool": "echo", **({"needs": [f"s{i - 1}"]} if i else {})} for i in range(10)]
    await create_workflow(client, tenant.headers, wf, steps)
    await start_run(client, tenant.headers, wf)  # the key's last use and the definition are recorded once
    with statements(app) as seen:
        run = await start_run(client, tenant.headers, wf)
    # BEGIN, the key, the version with the limits, the run with its steps, its usage, the first dispatch,
    # the engine's flush, the read back, the audit chain (head and rows), COMMIT.
    assert len(seen) <= 12, seen
    assert not any("SAVEPOINT" in s for s in seen), seen
    with statements(app) as seen:
        r = await client.get(f"/api/v1/runs/{run['id']}", headers=tenant.headers)
    assert r.status_code == 200
    assert len(seen) <= 4, seen  # BEGIN, the key, the run, ROLLBACK
    await client.post(f"/api/v1/runs/{run['id']}/cancel", headers=tenant.headers)
    with statements(app) as seen:
        r = await client.get(f"/api/v1/runs/{run['id']}", params={"wait": 5}, headers=tenant.headers)
    assert r.json()["status"] == "cancelled"
    assert len(seen) <= 5, seen  # and its status first


def test_the_runs_routes_have_no_dependency_run_in_a_thread(app: FastAPI) -> None:
    """FastAPI runs a plain ``def`` dependency through its thread pool: a thread hand-off per request."""
    from fastapi.routing import APIRoute, iter_route_contexts

    def calls(dependant: Any) -> Iterator[Any]:
        for sub in dependant.dependencies:
            yield sub.call
            yield from calls(sub)

    routes = [(c.path, c.original_route) for c in iter_route_contexts(app.routes)
              if isinstance(c.original_route, APIRoute) and c.path.startswith("/api/v1/runs")]
    assert len(routes) > 5
    for path, route in routes:
        for call in calls(route.dependant):
            target = call if inspect.isfunction(call) else type(call).__call__
            assert inspect.iscoroutinefunction(target) or inspect.isasyncgenfunction(target), (path, call)
