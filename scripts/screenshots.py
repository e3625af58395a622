#!/usr/bin/env python3
"""Screenshots of the dashboard's main pages, taken from a real run of the product, for docs/img/.

Starts the product as the engine benchmark does (a database of its own on the given PostgreSQL, a Redis
database, `steward api` and `steward worker`), makes a few runs through the REST API — one that
succeeds, one waiting on an approval, one that failed, and an agent's run against a scripted
OpenAI-compatible model server on loopback — signs the local admin in with headless Chromium (Debian's
/usr/bin/chromium) and saves the runs page, a run's graph and timeline, the agent's reasoning chain and
the approvals inbox at 1280x800.

    .venv/bin/python scripts/screenshots.py [--pg postgresql://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import httpx  # noqa: E402
from playwright.async_api import async_playwright  # noqa: E402

from app.auth.local import ensure_local_admin  # noqa: E402
from bench.engine import Product  # noqa: E402
from tests.fakes.model_server import ModelServer, Turn  # noqa: E402

OUT = ROOT / "docs" / "img"
WORKFLOW = {
    "name": "refund",
    "definition": {
        "input_schema": {"type": "object", "required": ["order"], "properties": {"order": {"type": "string"}}},
        "steps": [
            {"id": "lookup", "tool": "echo", "args": {"order": "${{ input.order }}", "amount": 120}},
            {"id": "items", "needs": ["lookup"], "map": {"items": "${{ [1, 2, 3] }}", "tool": "echo",
                                                       "args": {"line": "${{ item }}"}}},
            {"id": "approve", "needs": ["items"], "approval": {"reason": "Refund over 100 USD"}},
            {"id": "notify", "needs": ["approve"], "tool": "echo", "args": {"sent": True}},
        ],
    },
}
AGENT = {"name": "support-triage", "definition": {"steps": [
    {"id": "triage", "agent": {"model": "local/triage-1", "tools": ["echo"], "input": "${{ input.ticket }}",
                               "instructions": "Look the customer up, then say who should answer the ticket."}},
]}}
TRIAGE = [
    Turn.tool_calls([("echo", {"customer": "ACME-42", "lookup": "plan"})], content="Let me look the customer up.",
                    usage=(412, 38)),
    Turn.final("Route to the billing team: the customer is on the Enterprise plan and asks about an invoice.",
               usage=(530, 41)),
]
BROKEN = {"name": "nightly-sync", "definition": {"steps": [
    {"id": "fetch", "tool": "echo", "args": {}},
    {"id": "sync", "needs": ["fetch"], "tool": "fail", "args": {"message": "upstream answered 503"}},
]}}


def api(base: str, key: str, method: str, path: str, body: Any = None) -> Any:
    answer = httpx.request(method, base + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    answer.raise_for_status()
    return answer.json()


def wait(base: str, key: str, run_id: str, statuses: set[str]) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        run: dict[str, Any] = api(base, key, "GET", f"/api/v1/runs/{run_id}?wait=5")
        if run["status"] in statuses:
            return run
    raise SystemExit(f"run {run_id} did not reach {statuses}")


async def admin_password(database_url: str) -> str:
    conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        tenant_id = await conn.fetchval("SELECT id FROM tenant WHERE name = 'bench'")
        password = await ensure_local_admin(conn, tenant_id)
    finally:
        await conn.close()
    assert password is not None, "a new database's local admin has no password yet"
    return password


async def shoot(base: str, key: str, password: str) -> None:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path="/usr/bin/chromium")
        page = await browser.new_page(base_url=base, viewport={"width": 1280, "height": 800})
        await page.goto("/auth/login?next=/runs")
        await page.fill("#username", "admin")
        await page.fill("#password", password)
        await page.click("form[action='/auth/local'] button[type=submit]")
        await page.wait_for_url(lambda url: url.endswith("/runs"))

        # A refund approved in the inbox by the admin (four-eyes: not by the key that started it).
        done = api(base, key, "POST", "/api/v1/runs", {"workflow": "refund", "input": {"order": "A-1001"}})
        wait(base, key, done["id"], {"waiting"})
        approval = api(base, key, "GET", f"/api/v1/approvals?run={done['id']}")["items"][0]
        await page.goto("/approvals")
        await page.fill(f"#comment-{approval['id']}", "Customer is in good standing")
        await page.click(f"form[action='/approvals/{approval['id']}'] button[value=approve]")
        await page.wait_for_url(lambda url: url.endswith("/approvals"))
        wait(base, key, done["id"], {"succeeded"})
        # An agent's run, one waiting for its approval, one failed.
        agent = api(base, key, "POST", "/api/v1/runs", {"workflow": "support-triage",
                                                        "input": {"ticket": "Why was I charged twice?"}})
        wait(base, key, agent["id"], {"succeeded"})
        gated = api(base, key, "POST", "/api/v1/runs", {"workflow": "refund", "input": {"order": "A-1002"}})
        failed = api(base, key, "POST", "/api/v1/runs", {"workflow": "nightly-sync", "input": {}})
        wait(base, key, gated["id"], {"waiting"})
        wait(base, key, failed["id"], {"failed"})

        for file, url in {"dashboard-runs.png": "/runs", "dashboard-run.png": f"/runs/{done['id']}",
                          "dashboard-timeline.png": f"/runs/{done['id']}?tab=timeline",
                          "dashboard-reasoning.png": f"/runs/{agent['id']}/steps/triage/conversation",
                          "dashboard-approvals.png": "/approvals"}.items():
            await page.goto(url)
            await page.screenshot(path=str(OUT / file))
            print(f"wrote docs/img/{file} ({url})")
        await browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/13")
    args = parser.parse_args()
    # The scripted model server answers on loopback, which the product refuses unless told.
    product = Product(argparse.Namespace(pg=args.pg, redis=args.redis, startup_timeout=90.0,
                                         env=["STEWARD_HTTP_ALLOW_PRIVATE_NETWORKS=true"]))
    models = ModelServer().script("triage-1", TRIAGE)
    try:
        models.start()
        target = product.start()
        base, key = target.url, target.key
        api(base, key, "PUT", "/api/v1/providers/local", {
            "base_url": models.url, "models": {"triage-1": {"input_per_mtok": "3.00", "output_per_mtok": "15.00"}}})
        for workflow in (WORKFLOW, AGENT, BROKEN):
            api(base, key, "POST", "/api/v1/workflows", workflow)
        password = asyncio.run(admin_password(target.database_url))
        asyncio.run(shoot(base, key, password))
    finally:
        product.stop()
        models.stop()


if __name__ == "__main__":
    main()
