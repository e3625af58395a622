"""Runs end to end through the API, executed by a real arq worker on real Postgres and Redis."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.runs.schemas import RunRead
from tests.support.runs import create_workflow, name, start_run, step, wait_for, wait_run
from tests.support.tenants import TenantKey

pytestmark = pytest.mark.xdist_group("engine")


async def test_dag_with_fan_out_fan_in_and_a_map_of_50(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings
) -> None:
    wf = name()
    await create_workflow(
        client,
        tenant.headers,
        wf,
        [
            {"id": "start", "tool": "echo", "args": {"n": "${{ input.n }}"}},
            {"id": "left", "needs": ["start"], "tool": "echo", "args": {"side": "left"}},
            {"id": "right", "needs": ["start"], "tool": "echo", "args": {"side": "right"}},
            {
                "id": "each",
                "needs": ["start"],
                "map": {
                    "items": "${{ input.items }}",
                    "tool": "echo",
                    "args": {"sq": "${{ item * item }}", "i": "${{ index }}"},
                    "concurrency": 7,
                },
            },
            {
                "id": "join",
                "needs": ["left", "right", "each"],
                "tool": "echo",
                "args": {
                    "sides": ["${{ steps.left.output.side }}", "${{ steps.right.output.side }}"],
                    "count": "${{ size(steps.each.output) }}",
                },
            },
        ],
        # 54 tool calls under the default limits: max_steps counts agents' steps, not the workflow's own.
    )
    run = await start_run(client, tenant.headers, wf, {"n": 50, "items": list(range(50))})
    done = await wait_run(client, tenant.headers, run["id"])
    assert done["status"] == "succeeded", done["error"]
    # The run document is built without the response model: it must still match it exactly.
    assert RunRead.model_validate(done).model_dump(mode="json", by_alias=True).keys() == done.keys()
    assert done["output"] == {"join": {"sides": ["left", "right"], "count": 50}}
    each = step(done, "each")
    assert each["output"] == [{"sq": i * i, "i": i} for i in range(50)]
    assert [item["index"] for item in each["items"]] == list(range(50))
    assert all(item["status"] == "succeeded" and len(item["attempts"]) == 1 for item in each["items"])
    join, left = step(done, "join"), step(done, "left")
    assert join["started_at"] >= left["finished_at"]
    assert done["started_at"] and done["finished_at"] >= done["started_at"]


async def test_map_respects_its_concurrency(client: httpx.AsyncClient, tenant: TenantKey, worker: Settings) -> None:
    wf = name()
    await create_workflow(
        client,
        tenant.headers,
        wf,
        [
            {
                "id": "m",
                "map": {
                    "items": [0.15] * 6,
                    "tool": "sleep",
                    "args": {"seconds": "${{ item }}"},
                    "concurrency": 2,
                },
            },
        ],
    )
    done = await wait_run(client, tenant.headers, (await start_run(client, tenant.headers, wf))["id"])
    assert done["status"] == "succeeded"
    spans = [(i["attempts"][0]["started_at"], i["attempts"][0]["finished_at"]) for i in step(done, "m")["items"]]
    for t, _ in spans:
        overlapping = sum(1 for s, f in spans if s <= t < f)
        assert overlapping <= 2


async def test_when_false_skips_the_branch_and_what_needs_it(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings
) -> None:
    wf = name()
    await create_workflow(
        client,
        tenant.headers,
        wf,
        [
            {"id": "a", "tool": "echo"},
            {"id": "b", "needs": ["a"], "when": "${{ input.enabled }}", "tool": "echo"},
            {"id": "b2", "needs": ["b"], "tool": "echo"},
            {
                "id": "c",
                "needs": ["a"],
                "when": "${{ !input.enabled }}",
                "tool": "echo",
                "args": {"ran": True},
            },
        ],
    )
    done = await wait_run(
        client, tenant.headers, (await start_run(client, tenant.headers, wf, {"enabled": False}))["id"]
    )
    assert done["status"] == "succeeded"
    assert [step(done, s)["status"] for s in ("a", "b", "b2", "c")] == [
        "succeeded",
        "skipped",
        "skipped",
        "succeeded",
    ]
    assert step(done, "b")["attempts"] == []
    assert done["output"] == {"c": {"ran": True}}


async def test_transient_failures_retry_with_backoff_then_succeed(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings
) -> None:
    wf = name()
    await create_workflow(
        client,
        tenant.headers,
        wf,
        [
            {
                "id": "flaky",
                "tool": "fail",
                "args": {"times": 2},
                "retry": {"max_attempts": 4, "backoff_base_s": 0.1, "backoff_max_s": 1, "jitter": False},
            },
        ],
    )
    done = await wait_run(client, tenant.headers, (await start_run(client, tenant.headers, wf))["id"])
    assert done["status"] == "succeeded"
    attempts = step(done, "flaky")["attempts"]
    assert [(a["n"], a["status"]) for a in attempts] == [(1, "failed"), (2, "failed"), (3, "succeeded")]
    assert attempts[0]["error"]["class"] == "fail"
    # Backoff without jitter: 0.1 s then 0.2 s between attempts.
    assert _gap(attempts[0], attempts[1]) >= 0.09
    assert _gap(attempts[1], attempts[2]) >= 0.19
    assert any(e["type"] == "step_retrying" for e in done["events"])


def _gap(earlier: dict[str, Any], later: dict[str, Any]) -> float:
    from datetime import datetime

    return (
        datetime.fromisoformat(later["started_at"]) - datetime.fromisoformat(earlier["finished_at"])
    ).total_seconds()


async def test_retries_run_out_and_the_run_fails(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings
) -> None:
    wf = name()
    await create_workflow(
        client,
        tenant.headers,
        wf,
        [
            {"id": "never", "tool": "fail", "retry": {"max_attempts": 2, "backoff_base_s": 0.01}},
            {"id": "after", "needs": ["never"], "tool": "echo"},
        ],
    )
    done = await wait_run(client, tenant.headers, (await start_run(client, tenant.headers, wf))["id"])
    assert done["status"] == "failed"
    assert len(step(done, "never")["attempts"]) == 2
    assert step(done, "after")["status"] == "pending"
    assert done["error"]["step"] == "never"


async def test_permanent_failure_is_not_retried(client: httpx.AsyncClient, tenant: TenantKey, worker: Settings) -> None:
    wf = name()
    await create_workflow(
        client,
        tenant.headers,
        wf,
        [
            {
                "id": "bad",
                "tool": "fail",
                "args": {"transient": False, "message": "no such customer"},
                "retry": {"max_attempts": 5},
            },
        ],
    )
    done = await wait_run(client, tenant.headers, (await start_run(client, tenant.headers, wf))["id"])
    assert done["status"] == "failed"
    assert [a["status"] for a in step(done, "bad")["attempts"]] == ["failed"]
    assert done["error"]["message"] == "no such customer"
    assert step(done, "bad")["error"]["class"] == "fail"


async def test_step_timeout_is_a_transient_failure(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings
) -> None:
    wf = name()
    await create_workflow(
        client,
        tenant.headers,
        wf,
        [
            {
                "id": "slow",
                "tool": "sleep",
                "args": {"seconds": 30},
                "timeout_s": 0.3,
                "retry": {"max_attempts": 2, "backoff_base_s": 0.01},
            },
        ],
    )
    done = await wait_run(client, tenant.headers, (await start_run(client, tenant.headers, wf))["id"])
    assert done["status"] == "failed"
    attempts = step(done, "slow")["attempts"]
    assert [a["error"]["class"] for a in attempts] == ["timeout", "timeout"]
    assert done["error"]["class"] == "timeout"


async def test_pause_lets_the_running_step_finish_and_dispatches_nothing_until_resume(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings
) -> None:
    wf = name()
    await create_workflow(
        client,
        tenant.headers,
        wf,
        [
            {"id": "a", "tool": "sleep", "args": {"seconds": 0.5}},
            {"id": "b", "needs": ["a"], "tool": "echo"},
        ],
    )
    run = await start_run(client, tenant.headers, wf)
    await wait_for(client, tenant.headers, run["id"], lambda r: step(r, "a")["status"] == "running")
    r = await client.post(f"/api/v1/runs/{run['id']}/pause", headers=tenant.headers)
    assert r.status_code == 200 and r.json()["status"] == "paused"
    paused = await wait_for(client, tenant.headers, run["id"], lambda r: step(r, "a")["status"] == "succeeded")
    await asyncio.sleep(0.3)
    paused = (await client.get(f"/api/v1/runs/{run['id']}", headers=tenant.headers)).json()
    assert paused["status"] == "paused"
    assert step(paused, "b")["status"] == "pending"
    r = await client.post(f"/api/v1/runs/{run['id']}/pause", headers=tenant.headers)
    assert r.status_code == 409 and r.headers["content-type"].startswith("application/problem+json")
    r = await client.post(f"/api/v1/runs/{run['id']}/resume", headers=tenant.headers)
    assert r.status_code == 200
    done = await wait_run(client, tenant.headers, run["id"])
    assert done["status"] == "succeeded"
    assert step(done, "b")["started_at"] > step(done, "a")["finished_at"]


async def test_pause_holds_queued_steps_until_resume(
    client: httpx.AsyncClient, tenant: TenantKey, settings: Settings, app: Any
) -> None:
    """No worker yet: the first step is queued; pause; a worker then refuses it; resume re-sends it."""
    from workers.main import run_worker

    wf = name()
    await create_workflow(client, tenant.headers, wf, [{"id": "a", "tool": "echo"}])
    run = await start_run(client, tenant.headers, wf)
    assert step(run, "a")["status"] == "queued"
    assert (await client.post(f"/api/v1/runs/{run['id']}/pause", headers=tenant.headers)).status_code == 200
    task = asyncio.create_task(
        run_worker(settings.model_copy(update={"reconcile_interval_s": 1, "outbox_stale_s": 0.2}))
    )
    try:
        await asyncio.sleep(1.5)
        held = (await client.get(f"/api/v1/runs/{run['id']}", headers=tenant.headers)).json()
        assert held["status"] == "paused" and step(held, "a")["status"] == "queued"
        assert (await client.post(f"/api/v1/runs/{run['id']}/resume", headers=tenant.headers)).status_code == 200
        done = await wait_run(client, tenant.headers, run["id"], timeout=10)
        assert done["status"] == "succeeded"
        assert len(step(done, "a")["attempts"]) == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_cancel_aborts_the_running_step(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, app: Any
) -> None:
    wf = name()
    await create_workflow(
        client,
        tenant.headers,
        wf,
        [
            {"id": "long", "tool": "sleep", "args": {"seconds": 60}},
            {
                "id": "other",
                "tool": "fail",
                "args": {"times": 5},
                "retry": {"max_attempts": 6, "backoff_base_s": 30},
            },
            {"id": "next", "needs": ["long"], "tool": "echo"},
        ],
    )
    run = await start_run(client, tenant.headers, wf)
    running = await wait_for(
        client,
        tenant.headers,
        run["id"],
        lambda r: step(r, "long")["status"] == "running" and step(r, "other")["status"] == "queued",
    )
    job_id = None
    r = await client.post(f"/api/v1/runs/{run['id']}/cancel", headers=tenant.headers)
    assert r.status_code == 200
    cancelled = r.json()
    assert cancelled["status"] == "cancelled"
    assert {s["id"]: s["status"] for s in cancelled["steps"]} == {
        "long": "cancelled",
        "other": "cancelled",
        "next": "cancelled",
    }
    assert step(cancelled, "long")["attempts"][-1]["status"] == "cancelled"
    # The worker's job is aborted: arq's in-progress marker for it disappears long before 60 s.
    redis = app.state.runtime.redis
    job_id = await _job_of(app, running["id"], "long")
    for _ in range(100):
        if not await redis.exists(f"arq:in-progress:{job_id}"):
            break
        await asyncio.sleep(0.05)
    assert not await redis.exists(f"arq:in-progress:{job_id}")
    assert (await client.post(f"/api/v1/runs/{run['id']}/cancel", headers=tenant.headers)).status_code == 409
    assert (await client.post(f"/api/v1/runs/{run['id']}/resume", headers=tenant.headers)).status_code == 409
    await asyncio.sleep(0.3)
    final = (await client.get(f"/api/v1/runs/{run['id']}", headers=tenant.headers)).json()
    assert len(step(final, "long")["attempts"]) == 1 and step(final, "long")["status"] == "cancelled"


async def _job_of(app: Any, run_id: str, step_id: str) -> str:
    # The engine's own pool: the app's request sessions see nothing without a tenant (row-level security).
    job = await app.state.runtime.pg.fetchval(
        "SELECT a.job_id FROM step_attempt a JOIN step_run s ON s.id = a.step_run_id "
        "WHERE s.run_id = $1 AND s.step_id = $2",
        uuid.UUID(run_id), step_id,
    )
    return str(job)


async def test_retry_resumes_from_the_failed_step_without_rerunning_completed_ones(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings
) -> None:
    wf = name()
    await create_workflow(
        client,
        tenant.headers,
        wf,
        [
            {"id": "a", "tool": "echo", "args": {"v": 1}},
            {
                "id": "m",
                "needs": ["a"],
                "map": {
                    "items": [0, 1, 2],
                    "tool": "fail",
                    "concurrency": 1,
                    "args": {"times": "${{ item == 1 ? 1 : 0 }}", "transient": False},
                },
            },
            {"id": "b", "needs": ["m"], "tool": "fail", "args": {"times": 1, "transient": False}},
            {"id": "c", "needs": ["b"], "tool": "echo", "args": {"from_b": "${{ steps.b.output }}"}},
        ],
    )
    run = await start_run(client, tenant.headers, wf)
    first = await wait_run(client, tenant.headers, run["id"])
    assert first["status"] == "failed" and first["error"]["step"] == "m"
    assert (await client.post(f"/api/v1/runs/{run['id']}/resume", headers=tenant.headers)).status_code == 409
    # First retry: the map's failed item runs again, then b fails once.
    assert (await client.post(f"/api/v1/runs/{run['id']}/retry", headers=tenant.headers)).status_code == 200
    second = await wait_run(client, tenant.headers, run["id"])
    assert second["status"] == "failed" and second["error"]["step"] == "b"
    # Second retry: only b runs again.
    assert (await client.post(f"/api/v1/runs/{run['id']}/retry", headers=tenant.headers)).status_code == 200
    done = await wait_run(client, tenant.headers, run["id"])
    assert done["status"] == "succeeded", done["error"]
    assert [a["status"] for a in step(done, "a")["attempts"]] == ["succeeded"]
    items = step(done, "m")["items"]
    assert [[a["status"] for a in i["attempts"]] for i in items] == [
        ["succeeded"],
        ["failed", "succeeded"],
        ["succeeded"],
    ]
    assert [a["status"] for a in step(done, "b")["attempts"]] == ["failed", "succeeded"]
    assert step(done, "c")["output"] == {"from_b": {"attempts": 2}}
    assert [e["type"] for e in done["events"]].count("run_retried") == 2
    assert (await client.post(f"/api/v1/runs/{run['id']}/retry", headers=tenant.headers)).status_code == 409


async def test_signal_completes_a_waiting_step(client: httpx.AsyncClient, tenant: TenantKey, worker: Settings) -> None:
    wf = name()
    await create_workflow(
        client,
        tenant.headers,
        wf,
        [
            {"id": "w", "wait": {"signal": "paid", "timeout_s": 60}},
            {
                "id": "after",
                "needs": ["w"],
                "tool": "echo",
                "args": {"amount": "${{ steps.w.output.amount }}"},
            },
        ],
    )
    run = await start_run(client, tenant.headers, wf)
    assert run["status"] == "waiting" and step(run, "w")["status"] == "waiting"
    r = await client.post(f"/api/v1/runs/{run['id']}/signals/shipped", json={"payload": {}}, headers=tenant.headers)
    assert r.status_code == 409
    r = await client.post(
        f"/api/v1/runs/{run['id']}/signals/paid", json={"payload": {"amount": 42}}, headers=tenant.headers
    )
    assert r.status_code == 200, r.text
    done = await wait_run(client, tenant.headers, run["id"])
    assert done["status"] == "succeeded"
    assert done["output"] == {"after": {"amount": 42}}
    r = await client.post(f"/api/v1/runs/{run['id']}/signals/paid", json={"payload": {}}, headers=tenant.headers)
    assert r.status_code == 409


async def test_wait_times_out(client: httpx.AsyncClient, tenant: TenantKey, worker: Settings) -> None:
    wf = name()
    await create_workflow(client, tenant.headers, wf, [{"id": "w", "wait": {"signal": "never", "timeout_s": 0.3}}])
    done = await wait_run(client, tenant.headers, (await start_run(client, tenant.headers, wf))["id"])
    assert done["status"] == "failed"
    assert step(done, "w")["error"]["class"] == "wait_timeout"


async def test_high_priority_run_is_not_starved_by_a_low_priority_backlog(
    client: httpx.AsyncClient, tenant: TenantKey, settings: Settings
) -> None:
    from workers.main import run_worker

    wf = name()
    await create_workflow(client, tenant.headers, wf, [{"id": "s", "tool": "sleep", "args": {"seconds": 0.3}}])
    low = [await start_run(client, tenant.headers, wf, priority="low") for _ in range(12)]
    high = await start_run(client, tenant.headers, wf, priority="high")
    task = asyncio.create_task(run_worker(settings, concurrency=2))
    try:
        high_done = await wait_run(client, tenant.headers, high["id"])
        assert high_done["status"] == "succeeded"
        lows = [(await client.get(f"/api/v1/runs/{r['id']}", headers=tenant.headers)).json() for r in low]
        # Two low slots working through 12 runs of 0.3 s take ~1.8 s; the high run is done well before.
        assert sum(1 for r in lows if r["status"] == "succeeded") <= 4
        for r in low:
            assert (await wait_run(client, tenant.headers, r["id"]))["status"] == "succeeded"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_http_tool_sends_the_idempotency_key_and_honours_retry_after(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings
) -> None:
    seen: list[tuple[str, float]] = []
    loop = asyncio.get_running_loop()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        key = next(line.split(": ", 1)[1] for line in head.split("\r\n") if line.lower().startswith("idempotency-key"))
        seen.append((key, loop.time()))
        if len(seen) == 1:
            writer.write(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n")
        else:
            body = b'{"ok": true}'
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        wf = name()
        await create_workflow(
            client,
            tenant.headers,
            wf,
            [
                {
                    "id": "call",
                    "tool": "http",
                    "args": {
                        "url": f"http://127.0.0.1:{port}/charge",
                        "method": "POST",
                        "json": {"amount": 5},
                    },
                    "retry": {"max_attempts": 3, "backoff_base_s": 0.01},
                },
            ],
        )
        run = await start_run(client, tenant.headers, wf)
        done = await wait_run(client, tenant.headers, run["id"])
    finally:
        server.close()
    assert done["status"] == "succeeded", done["error"]
    assert step(done, "call")["output"]["body"] == {"ok": True}
    assert [k for k, _ in seen] == [f"{run['id']}:call"] * 2
    assert seen[1][1] - seen[0][1] >= 0.95  # Retry-After: 1 beat the 10 ms backoff
    assert step(done, "call")["attempts"][0]["error"]["class"] == "http_429"


async def test_http_tool_refuses_private_addresses_by_default(
    client: httpx.AsyncClient, tenant: TenantKey, settings: Settings
) -> None:
    from app.tools.builtins import ToolCall, ToolError, http
    from workers.main import run_worker

    strict = settings.model_copy(update={"http_allow_private_networks": False})
    async with httpx.AsyncClient() as h:
        with pytest.raises(ToolError) as exc:
            await http(ToolCall({"url": "http://127.0.0.1:9/"}, 1, "k", strict, h))
    assert exc.value.error_class == "forbidden_destination" and not exc.value.transient

    # Through the engine: a permanent failure, not retried.
    wf = name()
    await create_workflow(
        client,
        tenant.headers,
        wf,
        [{"id": "call", "tool": "http", "args": {"url": "http://127.0.0.1:9/"}, "retry": {"max_attempts": 3}}],
    )
    task = asyncio.create_task(run_worker(strict))
    try:
        done = await wait_run(client, tenant.headers, (await start_run(client, tenant.headers, wf))["id"])
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert done["status"] == "failed"
    assert [a["error"]["class"] for a in step(done, "call")["attempts"]] == ["forbidden_destination"]


async def test_a_long_step_keeps_its_lease_alive(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings
) -> None:
    """The worker renews the lease (here 2 s) while a 3.5 s step runs: the reconciler must not take
    the step for lost."""
    assert worker.lease_s < 3
    wf = name()
    await create_workflow(client, tenant.headers, wf, [{"id": "long", "tool": "sleep", "args": {"seconds": 3.5}}])
    done = await wait_run(client, tenant.headers, (await start_run(client, tenant.headers, wf))["id"])
    assert done["status"] == "succeeded"
    assert [a["status"] for a in step(done, "long")["attempts"]] == ["succeeded"]


async def test_limits_on_map_size_and_step_output(
    client: httpx.AsyncClient, tenant: TenantKey, worker: Settings, settings: Settings
) -> None:
    wf = name()
    await create_workflow(
        client,
        tenant.headers,
        wf,
        [
            {"id": "many", "map": {"items": "${{ input.items }}", "tool": "echo"}},
        ],
    )
    too_many = list(range(settings.max_map_items + 1))
    done = await wait_run(
        client, tenant.headers, (await start_run(client, tenant.headers, wf, {"items": too_many}))["id"]
    )
    assert done["status"] == "failed"
    assert step(done, "many")["error"]["class"] == "map_too_large"
    assert step(done, "many")["items"] is None  # nothing was expanded

    big = name()
    await create_workflow(
        client, tenant.headers, big, [{"id": "huge", "tool": "echo", "args": {"v": "${{ input.v }}"}}]
    )
    blob = "x" * (settings.max_output_bytes + 1)
    done = await wait_run(client, tenant.headers, (await start_run(client, tenant.headers, big, {"v": blob}))["id"])
    assert done["status"] == "failed"
    assert step(done, "huge")["error"]["class"] == "output_too_large"
    assert step(done, "huge")["output"] is None
