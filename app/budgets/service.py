"""Run limits and tenant cost caps, enforced by reserving before every call and settling after it.

Reservation is one short transaction: it locks the run's usage row, then, for a paid call of a tenant
with caps, the tenant's hour and day windows (always in that order, so concurrent reservations cannot
deadlock), checks every limit against spent + reserved + this call's estimate, and only then records
the hold. Concurrent runs therefore can never push spend past a cap: the last one to take the locks
sees all the others' holds. Settling replaces the estimate by the actual cost; a hold whose worker died
is settled at its estimate by the reconciler.

The windows are hot rows: every paid call of every run of a tenant would queue on them. A tenant without
caps needs no window to check, so its reservations stay off them: ``windowed`` false, the hold counted in
the run's usage and the reservation row only, and settled there too. The reconciler folds their settled
cost into the windows in batches (:func:`fold_unwindowed`: one statement, one upsert per tenant window).
Readers (the usage API, the budgets page, the metrics) add to a window what is not folded into it yet,
in the same statement, found through a partial index: a fold moves amounts from one side to the other
atomically, so one snapshot sees each amount once.

Caps set while such holds are in flight still hold. A reservation of a tenant with caps locks its
windows, then (in a new statement, so a fold it waited for is seen whole) adds the tenant's unwindowed
holds at their estimate and its settled, unfolded costs. What remains is a reservation that read no caps
and has not committed its hold yet when the caps are set: a capped reservation could not see that hold
and might admit a call the cap has no room for. So every paid reservation takes a shared transaction
advisory lock on its tenant before reading the caps, and :func:`put_budget` takes it exclusively before
writing them: the update waits for reservations that may have read the old caps to commit (their holds
then visible to every later reservation), and reservations arriving meanwhile wait for its commit and
read the new caps. Shared holders do not wait for each other, and the lock lives in memory only (no row,
no WAL), so the hot path stays uncontended. Caps removed while windowed holds are in flight change
nothing for them: a hold settles into the windows exactly when it was reserved into them.

An agent's tool calls count against ``max_steps`` with the model turn that chose them, in the
transaction that saves the turn (:func:`count_chosen_calls`, under the run's usage row lock, so agents
running at once in one run cannot pass the limit together); a free call counted there needs no
transaction when it is made. A call refused before its reservation gives its count back when its result
is saved (:func:`uncount_call`), so what counts is what it was when calls were counted at reservation.
"""

from __future__ import annotations

import asyncio
import logging
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

log = logging.getLogger(__name__)

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
    "UPDATE run_usage SET tool_calls = tool_calls + 1 WHERE run_id = $1 "
    "AND (NOT limits ? 'max_steps' OR tool_calls + 1 <= (limits ->> 'max_steps')::int) "
    "AND (NOT limits ? 'max_cost_usd' OR cost_usd + reserved_usd <= (limits ->> 'max_cost_usd')::numeric) "
    "RETURNING 1"
)
# A free call that counts nothing is refused only when the run already spent past its max_cost_usd: a read.
_FREE_CHECK = (
    "SELECT 1 FROM run_usage WHERE run_id = $1 AND limits ? 'max_cost_usd' "
    "AND cost_usd + reserved_usd > (limits ->> 'max_cost_usd')::numeric"
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
# What the windows do not hold yet: unwindowed holds (at their estimate) and settled costs not yet folded in.
_UNWINDOWED = (
    "SELECT coalesce(sum(CASE status WHEN 'held' THEN amount_usd ELSE actual_usd END) "
    "FILTER (WHERE hour_start = $2), 0) AS hour, "
    "coalesce(sum(CASE status WHEN 'held' THEN amount_usd ELSE actual_usd END), 0) AS day "
    "FROM budget_reservation WHERE tenant_id = $1 AND day_start = $3 AND NOT windowed"
)
# Advisory lock (two-key form; its first key names this use) ordering reservations that found no caps
# before setting caps: reservations share it, put_budget() takes it alone. See the module docstring.
CAPS_LOCK_CLASS = 0x5354_4231
_SHARE_CAPS = "SELECT pg_advisory_xact_lock_shared($1, hashtext($2::uuid::text))"
_EXCLUDE_CAPS = "SELECT pg_advisory_xact_lock($1, hashtext($2::uuid::text))"


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
    ``count_call``: the call is an agent's step and counts against ``max_steps`` here (an agent's tool
    calls are counted beforehand, with the turn that chose them: :func:`count_chosen_calls`).

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
        # A free call counted here is one statement (Postgres re-checks the WHERE on the row it locks, so
        # concurrent calls cannot overshoot); one counting nothing is a read. No row: refused, or no usage
        # row; the full check below tells which, and why.
        if count_call:
            if await conn.fetchval(_FREE_CALL, run_id) is not None:
                return Hold(None, Decimal(0), 0)
        elif await conn.fetchval(_FREE_CHECK, run_id) is None:
            return Hold(None, Decimal(0), 0)
    async with conn.transaction():
        if amount_usd > 0:
            # Before the caps are read: setting caps waits for this transaction (module docstring).
            await conn.execute(_SHARE_CAPS, CAPS_LOCK_CLASS, tenant_id)
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
        windowed = amount_usd > 0 and (caps["hour"] is not None or caps["day"] is not None)
        if windowed:
            await conn.execute(_WINDOWS, tenant_id, hour, day)
            # Always locked, hour then day, before they are written: settle() and the fold take them in the
            # same order. Only then are the amounts they do not hold yet summed (a fold committed while this
            # waited moved them into the windows: a new statement sees both sides of that move).
            locked = await conn.fetch(_LOCK_WINDOWS, tenant_id, hour, day)
            pending = await conn.fetchrow(_UNWINDOWED, tenant_id, hour, day)
            for row in locked:
                cap = caps[row["period"]]
                used = row["used"] + pending[row["period"]]
                if cap is not None and used + amount_usd > cap:
                    name = "hourly_usd" if row["period"] == "hour" else "daily_usd"
                    return Exhausted(
                        name,
                        f"the tenant's {name.split('_')[0]} cap of ${cap:.2f} would be passed "
                        f"(spent and held: ${used:.6f})",
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
            "day_start, status, windowed) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'held', $10)",
            hold_id,
            tenant_id,
            run_id,
            step_id,
            kind,
            amount_usd,
            tokens,
            hour,
            day,
            windowed,
        )
        return Hold(hold_id, amount_usd, tokens)


# Counts as many of ``$2`` chosen calls as max_steps leaves room for (all of them without the limit), under
# the row's lock: the subquery's FOR UPDATE makes ``before`` the value this UPDATE starts from.
_COUNT_CHOSEN = (
    "UPDATE run_usage u SET tool_calls = u.tool_calls + least($2, CASE WHEN u.limits ? 'max_steps' "
    "THEN greatest((u.limits ->> 'max_steps')::int - u.tool_calls, 0) ELSE $2 END) "
    "FROM (SELECT tool_calls AS before FROM run_usage WHERE run_id = $1 FOR UPDATE) o "
    "WHERE u.run_id = $1 RETURNING u.tool_calls - o.before"
)


async def count_chosen_calls(conn: Conn, run_id: uuid.UUID, calls: int) -> int:
    """Count an agent turn's ``calls`` tool calls against ``max_steps``, in the transaction that saves the
    turn; returns how many fit (the first ones, in the model's order). Those need no counting when they
    are made; the rest are counted (and, while the limit still holds, refused) by :func:`reserve`."""
    if calls == 0:
        return 0
    counted = await conn.fetchval(_COUNT_CHOSEN, run_id, calls)
    return calls if counted is None else int(counted)  # no usage row: a run from before budgets existed


async def uncount_call(conn: Conn, run_id: uuid.UUID) -> None:
    """Give back the count of a call counted with its turn that was refused before its reservation
    (guardrails, approvals, shadow mode, an open breaker): those never counted against max_steps."""
    await conn.execute("UPDATE run_usage SET tool_calls = tool_calls - 1 WHERE run_id = $1", run_id)


_SETTLE = (
    "UPDATE budget_reservation SET status = 'settled', actual_usd = $2, actual_tokens = $3, settled_at = now() "
    "WHERE id = $1 AND status = 'held' RETURNING tenant_id, run_id, amount_usd, tokens, hour_start, day_start, "
    "windowed"
)


async def settle(conn: Conn, hold: Hold, actual_usd: Decimal, actual_tokens: int = 0) -> None:
    """Replace a hold by what the call really cost (a second settle of the same hold does nothing); the
    windows only for a windowed hold: an unwindowed one's cost is folded in later (:func:`fold_unwindowed`)."""
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
        if not r["windowed"]:
            return
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


FOLD_BATCH = 5000
# One statement, so readers see a settled cost either still unwindowed or already in its windows, never
# both or neither: marks a batch of settled unwindowed reservations windowed and adds their cost to their
# windows, one upsert per tenant window, taken in the order reserve() and settle() lock them (a tenant's
# hours before its day). Rows another fold has locked are skipped, not waited for.
_FOLD = """
WITH folded AS (
    UPDATE budget_reservation SET windowed = true WHERE id IN (
        SELECT id FROM budget_reservation WHERE NOT windowed AND status = 'settled' LIMIT $1 FOR UPDATE SKIP LOCKED)
    RETURNING tenant_id, hour_start, day_start, actual_usd),
sums AS (
    SELECT tenant_id, 'hour' AS period, hour_start AS start, sum(actual_usd) AS usd FROM folded GROUP BY 1, 3
    UNION ALL
    SELECT tenant_id, 'day', day_start, sum(actual_usd) FROM folded GROUP BY 1, 3),
added AS (
    INSERT INTO budget_window (tenant_id, period, start, spent_usd)
    SELECT tenant_id, period, start, usd FROM sums ORDER BY tenant_id, period DESC, start
    ON CONFLICT (tenant_id, period, start) DO UPDATE SET spent_usd = budget_window.spent_usd + excluded.spent_usd
    RETURNING 1)
SELECT (SELECT count(*) FROM folded) AS reservations, (SELECT count(*) FROM added) AS windows
"""


async def fold_unwindowed(conn: Conn, *, batch: int = FOLD_BATCH, batches: int = 10) -> int:
    """Add the settled cost of unwindowed reservations to their tenant's windows, in batches; returns how
    many reservations were folded. Called by the reconciler on each pass."""
    folded = 0
    for _ in range(batches):
        try:
            row = await conn.fetchrow(_FOLD, batch)
        except asyncpg.DeadlockDetectedError:
            log.warning("budgets: folding unwindowed spend was a deadlock victim; the next pass folds it")
            break
        assert row is not None
        folded += row["reservations"]
        if row["reservations"] < batch:
            break
    return folded


# --- the budgets API -----------------------------------------------------------------------------------


async def put_budget(db: AsyncSession, ctx: Ctx, budget: BudgetSettings) -> BudgetSettings:
    """Set the tenant's caps and run limits (audited); running runs keep the limits they started with."""
    conn = await driver(db)
    # Waits for reservations that read the caps before this (module docstring); held to the commit.
    await conn.execute(_EXCLUDE_CAPS, CAPS_LOCK_CLASS, ctx.tenant_id)
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


# A window as readers see it: its row plus what is not folded into it yet, read in one statement (one
# snapshot: a fold moves amounts from one side to the other atomically).
_WINDOW_NOW = (
    "SELECT coalesce((SELECT spent_usd FROM budget_window WHERE tenant_id = $1 AND period = $2 AND start = $3), 0) "
    "+ coalesce(sum(actual_usd) FILTER (WHERE status = 'settled'), 0) AS spent_usd, "
    "coalesce((SELECT reserved_usd FROM budget_window WHERE tenant_id = $1 AND period = $2 AND start = $3), 0) "
    "+ coalesce(sum(amount_usd) FILTER (WHERE status = 'held'), 0) AS reserved_usd "
    "FROM budget_reservation WHERE tenant_id = $1 AND day_start = $4 AND ($2 = 'day' OR hour_start = $3) "
    "AND NOT windowed"
)


async def usage(
    db: AsyncSession, ctx: Ctx, *, workflow: str | None = None, run: uuid.UUID | None = None
) -> dict[str, Any]:
    """Spend in the current hour and day (of one workflow's runs, or all), and one run's usage and limits."""
    conn = await driver(db)
    hour, day = windows(datetime.now(UTC))
    result: dict[str, Any] = {}
    for period, start in (("hour", hour), ("day", day)):
        if workflow is None:
            row = await conn.fetchrow(_WINDOW_NOW, ctx.tenant_id, period, start, day)
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

# The hour windows of a day, each with what is not folded into it yet (one statement: see _WINDOW_NOW).
_HOURS_OF_DAY = (
    "SELECT start, sum(spent_usd) AS spent_usd, sum(reserved_usd) AS reserved_usd FROM ("
    "SELECT start, spent_usd, reserved_usd FROM budget_window WHERE tenant_id = $1 AND period = 'hour' "
    "AND start >= $2 AND start < $3 UNION ALL "
    "SELECT hour_start, coalesce(sum(actual_usd) FILTER (WHERE status = 'settled'), 0), "
    "coalesce(sum(amount_usd) FILTER (WHERE status = 'held'), 0) FROM budget_reservation "
    "WHERE tenant_id = $1 AND day_start = $2 AND NOT windowed GROUP BY hour_start) h GROUP BY start ORDER BY start"
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

    Spend per hour is what the tenant's hour windows hold, with what is not folded into them yet: each
    settled call adds to the windows of the hour and the day it was reserved in, so today's hours add up
    to the day window's spend."""
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
