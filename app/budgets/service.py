"""Run limits and tenant cost caps, enforced by reserving before every call and settling after it.

Reservation is one short transaction: it locks the run's usage row, then the tenant's hour and day
windows (always in that order, so concurrent reservations cannot deadlock), checks every limit
against spent + reserved + this call's estimate, and only then records the hold. Concurrent runs
therefore can never push spend past a cap: the last one to take the locks sees all the others'
holds. Settling replaces the estimate by the actual cost; a hold whose worker died is settled at
its estimate by the reconciler.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit.service import record as audit
from app.context import Ctx
from app.errors import Invalid, NotFound
from app.pagination import keyset
from app.pg import Conn, driver, dumps

if TYPE_CHECKING:
    from app.budgets.schemas import BudgetSettings

# max_steps counts an agent's model turns and the tool calls it chooses (run_usage.tool_calls), to stop
# agents that loop; a workflow's own tool steps and map items are bounded by its definition instead.
DEFAULT_LIMITS: dict[str, Any] = {"max_steps": 25, "max_tokens": 100_000}
# Money columns are numeric(18, 8): ten digits before the point, eight after.
USD_DIGITS, USD_PLACES = 18, 8
LIMIT_KEYS = ("max_steps", "max_tokens", "max_cost_usd", "timeout_s")
BUDGET_EXHAUSTED = "budget_exhausted"
# The status reasons of a run paused because a limit or a budget ran out: raising limits resumes it.
PAUSED_ON_BUDGET = frozenset({BUDGET_EXHAUSTED})


@dataclass(frozen=True)
class Hold:
    """A reservation taken; ``id`` is None when nothing needed holding (free call, no caps)."""

    id: uuid.UUID | None
    amount_usd: Decimal
    tokens: int


@dataclass(frozen=True)
class Exhausted:
    limit: str  # max_steps | max_tokens | max_cost_usd | hourly_usd | daily_usd
    message: str
    on_exhausted: str  # pause | fail


def usd_text(value: Decimal) -> str:
    """An amount as written: no exponent, no trailing zeros, no sign on zero ("0E-8" -> "0", "1.50" -> "1.5")."""
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


def effective_limits(budget: Any, workflow: dict[str, Any], requested: dict[str, Any] | None) -> dict[str, Any]:
    """Tenant defaults, then the workflow's limits, then the run's; each within the tenant's maximums."""
    limits = {**DEFAULT_LIMITS, **((budget or {}).get("run_defaults") or {}), **workflow, **(requested or {})}
    maximums = (budget or {}).get("run_maximums") or {}
    errors = [
        {"pointer": f"/limits/{key}", "message": f"{limits[key]} is over the tenant's maximum of {maximums[key]}"}
        for key in LIMIT_KEYS
        if key in maximums and key in limits and float(limits[key]) > float(maximums[key])
    ]
    if errors:
        raise Invalid("the run's limits exceed the tenant's maximums", errors=errors)
    for key in LIMIT_KEYS:
        if key in maximums and key not in limits:
            limits[key] = maximums[key]
    return {key: value for key, value in limits.items() if key in LIMIT_KEYS}


async def tenant_budget(conn: Conn, tenant_id: uuid.UUID) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "SELECT hourly_usd, daily_usd, on_exhausted, run_defaults, run_maximums, updated_at, updated_by "
        "FROM budget WHERE tenant_id = $1",
        tenant_id,
    )
    return dict(row) if row is not None else None


async def create_usage(
    conn: Conn, tenant_id: uuid.UUID, run_id: uuid.UUID, workflow: str, limits: dict[str, Any]
) -> None:
    await conn.execute(
        "INSERT INTO run_usage (run_id, tenant_id, workflow_name, limits) VALUES ($1, $2, $3, $4::jsonb)",
        run_id,
        tenant_id,
        workflow,
        dumps(limits),
    )


def windows(at: datetime) -> tuple[datetime, datetime]:
    hour = at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return hour, hour.replace(hour=0)


_FREE_CALL = (
    "UPDATE run_usage SET tool_calls = tool_calls + $2 WHERE run_id = $1 "
    "AND (NOT limits ? 'max_steps' OR tool_calls + $2 <= (limits ->> 'max_steps')::int) "
    "AND (NOT limits ? 'max_cost_usd' OR cost_usd + reserved_usd <= (limits ->> 'max_cost_usd')::numeric) "
    "RETURNING 1"
)
_USAGE = (
    "SELECT u.limits, u.tool_calls, u.tokens, u.reserved_tokens, u.cost_usd, u.reserved_usd, b.hourly_usd, "
    "b.daily_usd, coalesce(b.on_exhausted, 'pause') AS on_exhausted FROM run_usage u "
    "LEFT JOIN budget b ON b.tenant_id = u.tenant_id WHERE u.run_id = $1 FOR UPDATE OF u"
)
_WINDOWS = (
    "INSERT INTO budget_window (tenant_id, period, start) VALUES ($1, 'hour', $2), ($1, 'day', $3) "
    "ON CONFLICT DO NOTHING"
)
_LOCK_WINDOWS = (
    "SELECT period, spent_usd + reserved_usd AS used FROM budget_window WHERE tenant_id = $1 "
    "AND ((period = 'hour' AND start = $2) OR (period = 'day' AND start = $3)) ORDER BY period DESC FOR UPDATE"
)


async def reserve(
    conn: Conn,
    tenant_id: uuid.UUID,
    run_id: uuid.UUID,
    step_id: str,
    kind: str,
    *,
    amount_usd: Decimal,
    tokens: int = 0,
    count_call: bool = True,
) -> Hold | Exhausted:
    """Check the run's limits and the tenant's caps for one more call, and hold its estimate;
    ``count_call``: the call is an agent's step and counts against ``max_steps``.

    Rows are locked in a fixed order, so deadlocks should not happen; should Postgres still pick
    this transaction as a deadlock victim (it rolled back), it is simply tried again."""
    for attempt in range(1, 4):
        try:
            return await _reserve(conn, tenant_id, run_id, step_id, kind, amount_usd=amount_usd, tokens=tokens,
                                  count_call=count_call)
        except asyncpg.DeadlockDetectedError:
            if attempt == 3:
                raise
            await asyncio.sleep(0.01 * attempt)
    raise AssertionError("unreachable")


async def _reserve(
    conn: Conn,
    tenant_id: uuid.UUID,
    run_id: uuid.UUID,
    step_id: str,
    kind: str,
    *,
    amount_usd: Decimal,
    tokens: int = 0,
    count_call: bool = True,
) -> Hold | Exhausted:
    if amount_usd == 0 and tokens == 0:
        # A free call only counts against max_steps: one statement (Postgres re-checks the WHERE on
        # the row it locks, so concurrent calls cannot overshoot). No row: refused, or no usage row;
        # the full check below tells which, and why.
        if await conn.fetchval(_FREE_CALL, run_id, int(count_call)) is not None:
            return Hold(None, Decimal(0), 0)
    async with conn.transaction():
        u = await conn.fetchrow(_USAGE, run_id)
        if u is None:
            return Hold(None, Decimal(0), 0)  # a run from before budgets existed
        limits, policy = u["limits"], u["on_exhausted"]
        if count_call and "max_steps" in limits and u["tool_calls"] + 1 > limits["max_steps"]:
            return Exhausted("max_steps", f"the run reached its limit of {limits['max_steps']} agent steps "
                             "(model turns and the tool calls agents chose)", policy)
        if tokens and "max_tokens" in limits and u["tokens"] + u["reserved_tokens"] + tokens > limits["max_tokens"]:
            return Exhausted(
                "max_tokens",
                f"the call could take the run past its {limits['max_tokens']} tokens "
                f"(used {u['tokens']}, held {u['reserved_tokens']}, this call up to {tokens})",
                policy,
            )
        if "max_cost_usd" in limits and u["cost_usd"] + u["reserved_usd"] + amount_usd > Decimal(
            str(limits["max_cost_usd"])
        ):
            return Exhausted(
                "max_cost_usd",
                f"the call could take the run past its ${limits['max_cost_usd']} "
                f"(spent ${u['cost_usd']:.6f}, held ${u['reserved_usd']:.6f})",
                policy,
            )
        hour, day = windows(datetime.now(UTC))
        caps = {"hour": u["hourly_usd"], "day": u["daily_usd"]}
        if amount_usd > 0:
            await conn.execute(_WINDOWS, tenant_id, hour, day)
            # Always locked, hour then day, before they are written: settle() takes them in the same order.
            locked = await conn.fetch(_LOCK_WINDOWS, tenant_id, hour, day)
            for row in locked:
                cap = caps[row["period"]]
                if cap is not None and row["used"] + amount_usd > cap:
                    name = "hourly_usd" if row["period"] == "hour" else "daily_usd"
                    return Exhausted(
                        name,
                        f"the tenant's {name.split('_')[0]} cap of ${cap:.2f} would be passed "
                        f"(spent and held: ${row['used']:.6f})",
                        policy,
                    )
            await conn.execute(
                "UPDATE budget_window SET reserved_usd = reserved_usd + $4 WHERE tenant_id = $1 "
                "AND ((period = 'hour' AND start = $2) OR (period = 'day' AND start = $3))",
                tenant_id,
                hour,
                day,
                amount_usd,
            )
        await conn.execute(
            "UPDATE run_usage SET tool_calls = tool_calls + $2, reserved_usd = reserved_usd + $3, "
            "reserved_tokens = reserved_tokens + $4 WHERE run_id = $1",
            run_id,
            int(count_call),
            amount_usd,
            tokens,
        )
        if amount_usd == 0 and tokens == 0:
            return Hold(None, Decimal(0), 0)
        hold_id = uuid.uuid4()
        await conn.execute(
            "INSERT INTO budget_reservation (id, tenant_id, run_id, step_id, kind, amount_usd, tokens, hour_start, "
            "day_start, status) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'held')",
            hold_id,
            tenant_id,
            run_id,
            step_id,
            kind,
            amount_usd,
            tokens,
            hour,
            day,
        )
        return Hold(hold_id, amount_usd, tokens)


_SETTLE = (
    "UPDATE budget_reservation SET status = 'settled', actual_usd = $2, actual_tokens = $3, settled_at = now() "
    "WHERE id = $1 AND status = 'held' RETURNING tenant_id, run_id, amount_usd, tokens, hour_start, day_start"
)


async def settle(conn: Conn, hold: Hold, actual_usd: Decimal, actual_tokens: int = 0) -> None:
    """Replace a hold by what the call really cost (a second settle of the same hold does nothing)."""
    if hold.id is None:
        return
    async with conn.transaction():
        r = await conn.fetchrow(_SETTLE, hold.id, actual_usd, actual_tokens)
        if r is None:
            return
        await conn.execute(
            "UPDATE run_usage SET reserved_usd = reserved_usd - $2, cost_usd = cost_usd + $3, "
            "reserved_tokens = reserved_tokens - $4, tokens = tokens + $5 WHERE run_id = $1",
            r["run_id"],
            r["amount_usd"],
            actual_usd,
            r["tokens"],
            actual_tokens,
        )
        await conn.execute(_LOCK_WINDOWS, r["tenant_id"], r["hour_start"], r["day_start"])
        await conn.execute(
            "UPDATE budget_window SET reserved_usd = greatest(reserved_usd - $4, 0), spent_usd = spent_usd + $5 "
            "WHERE tenant_id = $1 AND ((period = 'hour' AND start = $2) OR (period = 'day' AND start = $3))",
            r["tenant_id"],
            r["hour_start"],
            r["day_start"],
            r["amount_usd"],
            actual_usd,
        )


async def settle_stale(conn: Conn, older_than_s: float) -> int:
    """Settle holds left by dead workers at their estimate (the call may well have been paid for)."""
    rows = await conn.fetch(
        "SELECT id, amount_usd, tokens FROM budget_reservation WHERE status = 'held' AND created_at < $1 LIMIT 500",
        datetime.now(UTC) - timedelta(seconds=older_than_s),
    )
    for row in rows:
        await settle(conn, Hold(row["id"], row["amount_usd"], row["tokens"]), row["amount_usd"], row["tokens"])
    return len(rows)


# --- the budgets API -----------------------------------------------------------------------------------


async def put_budget(db: AsyncSession, ctx: Ctx, budget: BudgetSettings) -> BudgetSettings:
    """Set the tenant's caps and run limits (audited); running runs keep the limits they started with."""
    conn = await driver(db)
    await conn.execute(
        "INSERT INTO budget (tenant_id, hourly_usd, daily_usd, on_exhausted, run_defaults, run_maximums, updated_by) "
        "VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb, $7) ON CONFLICT (tenant_id) DO UPDATE SET "
        "hourly_usd = excluded.hourly_usd, daily_usd = excluded.daily_usd, on_exhausted = excluded.on_exhausted, "
        "run_defaults = excluded.run_defaults, run_maximums = excluded.run_maximums, updated_at = now(), "
        "updated_by = excluded.updated_by",
        ctx.tenant_id,
        budget.hourly_usd,
        budget.daily_usd,
        budget.on_exhausted,
        dumps(budget.run_defaults.given()),
        dumps(budget.run_maximums.given()),
        ctx.principal,
    )
    await audit(conn, ctx.tenant_id, ctx, "budget.update", "budget", data=budget.model_dump(mode="json"))
    return budget


async def get_budget(db: AsyncSession, ctx: Ctx) -> dict[str, Any] | None:
    """The tenant's ``budget`` row, or None when it never set one."""
    return await tenant_budget(await driver(db), ctx.tenant_id)


async def usage(
    db: AsyncSession, ctx: Ctx, *, workflow: str | None = None, run: uuid.UUID | None = None
) -> dict[str, Any]:
    """Spend in the current hour and day (of one workflow's runs, or all), and one run's usage and limits."""
    conn = await driver(db)
    hour, day = windows(datetime.now(UTC))
    result: dict[str, Any] = {}
    for period, start in (("hour", hour), ("day", day)):
        if workflow is None:
            row = await conn.fetchrow(
                "SELECT spent_usd, reserved_usd FROM budget_window WHERE tenant_id = $1 AND period = $2 AND start = $3",
                ctx.tenant_id,
                period,
                start,
            )
        else:
            row = await conn.fetchrow(
                f"SELECT coalesce(sum(r.actual_usd) FILTER (WHERE r.status = 'settled'), 0) AS spent_usd, "
                f"coalesce(sum(r.amount_usd) FILTER (WHERE r.status = 'held'), 0) AS reserved_usd "
                f"FROM budget_reservation r JOIN run_usage u ON u.run_id = r.run_id "
                f"WHERE r.tenant_id = $1 AND r.{period}_start = $2 AND u.workflow_name = $3",
                ctx.tenant_id,
                start,
                workflow,
            )
        result[period] = {
            "start": start,
            "spent_usd": usd_text(row["spent_usd"]) if row else "0",
            "reserved_usd": usd_text(row["reserved_usd"]) if row else "0",
        }
    if run is not None:
        row = await conn.fetchrow(
            "SELECT limits, tool_calls, tokens, reserved_tokens, cost_usd, reserved_usd FROM run_usage "
            "WHERE run_id = $1 AND tenant_id = $2",
            run,
            ctx.tenant_id,
        )
        if row is None:
            raise NotFound(f"run {run} not found")
        result["run"] = {
            **dict(row), "cost_usd": usd_text(row["cost_usd"]), "reserved_usd": usd_text(row["reserved_usd"])
        }
    return result


async def set_run_limits(db: AsyncSession, ctx: Ctx, run_id: uuid.UUID, requested: dict[str, Any]) -> dict[str, Any]:
    """Change one run's limits, within the tenant's maximums (audited); returns the limits now in force."""
    conn = await driver(db)
    current = await conn.fetchval(
        "SELECT limits FROM run_usage WHERE run_id = $1 AND tenant_id = $2 FOR UPDATE", run_id, ctx.tenant_id
    )
    if current is None:
        raise NotFound(f"run {run_id} not found")
    limits = effective_limits(await tenant_budget(conn, ctx.tenant_id), current, requested)
    await conn.execute("UPDATE run_usage SET limits = $2::jsonb WHERE run_id = $1", run_id, dumps(limits))
    await audit(conn, ctx.tenant_id, ctx, "run.limits", f"run:{run_id}", data={"from": current, "to": limits})
    return limits


# --- the budgets page ----------------------------------------------------------------------------------

PAUSED_PAGES = keyset("budget-paused-runs", datetime, uuid.UUID)
TOP_WORKFLOWS = 10

_HOURS_OF_DAY = (
    "SELECT start, spent_usd, reserved_usd FROM budget_window WHERE tenant_id = $1 AND period = 'hour' "
    "AND start >= $2 AND start < $3 ORDER BY start"
)
# Settled spend by workflow since a day's start: what the windows count, split by the runs' workflows.
_TOP_WORKFLOWS = (
    "SELECT u.workflow_name AS workflow, sum(r.actual_usd) AS spent_usd, count(DISTINCT r.run_id) AS runs "
    "FROM budget_reservation r JOIN run_usage u ON u.run_id = r.run_id "
    "WHERE r.tenant_id = $1 AND r.status = 'settled' AND r.day_start >= $2 "
    "GROUP BY u.workflow_name HAVING sum(r.actual_usd) > 0 ORDER BY spent_usd DESC, workflow LIMIT $3"
)
_PAUSED_RUNS = (
    "SELECT r.id, r.workflow_name, r.workflow_version, r.created_at, r.error, u.limits, u.tool_calls, u.tokens, "
    "u.cost_usd FROM run r LEFT JOIN run_usage u ON u.run_id = r.id "
    "WHERE r.tenant_id = $1 AND r.status = 'paused' AND r.status_reason = $2 "
    "AND ($3::timestamptz IS NULL OR (r.created_at, r.id) < ($3, $4::uuid)) "
    "ORDER BY r.created_at DESC, r.id DESC LIMIT $5"
)


@dataclass(frozen=True)
class HourSpend:
    """One clock hour of today (UTC): settled spend in it, held reservations, and the day's total by its end."""

    start: datetime
    spent_usd: Decimal
    reserved_usd: Decimal
    cumulative_usd: Decimal


@dataclass(frozen=True)
class Overview:
    """The budgets page: caps, spend now (``usage``, as ``GET /budgets/usage`` answers), today's spend hour
    by hour up to the current hour, the workflows that spent most, and runs paused on a budget."""

    budget: dict[str, Any] | None
    usage: dict[str, Any]
    hours: list[HourSpend]
    top_today: list[dict[str, Any]]
    top_week: list[dict[str, Any]]
    paused: list[dict[str, Any]]
    next_cursor: str | None


async def overview(db: AsyncSession, ctx: Ctx, *, limit: int, cursor: str | None) -> Overview:
    """Everything the budgets page shows, read in one transaction; paused runs keyset-paged, newest first.

    Spend per hour is what the tenant's hour windows hold: each settled call adds to the windows of the hour
    and the day it was reserved in, so today's hours add up to the day window's spend."""
    conn = await driver(db)
    after = PAUSED_PAGES.decode(cursor)
    hour, day = windows(datetime.now(UTC))
    spent = await usage(db, ctx)
    rows = await conn.fetch(_HOURS_OF_DAY, ctx.tenant_id, day, day + timedelta(days=1))
    by_start = {r["start"]: r for r in rows}
    hours, total = [], Decimal(0)
    for h in range(hour.hour + 1):
        start = day + timedelta(hours=h)
        row = by_start.get(start)
        spent_usd = row["spent_usd"] if row else Decimal(0)
        total += spent_usd
        hours.append(HourSpend(start, spent_usd, row["reserved_usd"] if row else Decimal(0), total))
    top_today = [dict(r) for r in await conn.fetch(_TOP_WORKFLOWS, ctx.tenant_id, day, TOP_WORKFLOWS)]
    top_week = [dict(r) for r in await conn.fetch(
        _TOP_WORKFLOWS, ctx.tenant_id, day - timedelta(days=6), TOP_WORKFLOWS)]
    paused = await conn.fetch(_PAUSED_RUNS, ctx.tenant_id, BUDGET_EXHAUSTED, *(after or (None, None)), limit + 1)
    page, next_cursor = PAUSED_PAGES.page(paused, limit, lambda r: (r["created_at"], r["id"]))
    return Overview(await tenant_budget(conn, ctx.tenant_id), spent, hours, top_today, top_week,
                    [dict(r) for r in page], next_cursor)
