"""The one path every tool call takes, from a ``tool`` step or from an agent.

In order: resolve the tool (unknown: a structured error listing the available tools) → validate
the arguments against its schema (every error) → permissions (the workflow's allowlist, read-only
workflows, the run starter's roles) → autonomy (manual, or conditional and the condition holds:
the call waits for an approval bound to this exact action) → shadow mode (write tools recorded
as "would have run") → circuit breaker (open: fail fast, or the fallback tool) → execute under
the hard timeout. Transient failures are retried by the engine with the tool's retry policy.

Nothing here writes to the database except the budget reservation: the decisions come back as a
:class:`CallResult`, an engine :class:`~app.engine.attempts.Outcome` whose events and audit notes the
caller records in the transaction that records the step's outcome. A tool step's attempt ends with it
as is; an agent reads it back to its model (:meth:`CallResult.for_model`) or stops on it.

Which calls count against the run's ``max_steps``: those an agent chooses, not the tool steps and map
items a workflow's author wrote, which their definition already bounds. An agent's calls are normally
counted with the model turn that chose them (workers/agent.py); ``CallSite.counted`` marks a call still
to be counted at its reservation (its turn found no room left, refused here while there is none). A call
refused before its reservation counts for nothing (``CallResult.budgeted`` false): the agent gives back
the count its turn took for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import httpx
from prometheus_client import Histogram

from app import tracing
from app.budgets import service as budgets
from app.budgets.service import Hold
from app.clock import now
from app.config import Settings
from app.engine.attempts import AuditNote, Outcome
from app.engine.gates import Gate, Grant, action_hash, grant_for
from app.outage import quiet_database_outage
from app.pg import Conn
from app.runtime import Runtime
from app.tenants.policy import TenantPolicy, load_policy
from app.tools import service as tools
from app.tools.breaker import Breaker, BreakerPolicy, tool_key
from app.tools.builtins import TOOLS, ToolCall, ToolError, check_destination
from app.tools.http_executor import call_http_tool
from app.tools.redact import redact_write_only, scrub
from app.tools.service import ToolRef, validate_args, validate_output
from app.tools.spec import BuiltinExecutor
from app.vault.service import open_secrets
from app.workflows.cel import evaluation
from app.workflows.cel.evaluation import Budget
from app.workflows.cel.expressions import ExpressionError, ExpressionLimit
from app.workflows.steps import Permissions, RetryPolicy

log = logging.getLogger(__name__)

GUARDRAIL_OVERHEAD_SECONDS = Histogram(
    "steward_guardrail_overhead_seconds", "Time the guarded call path adds to a tool call's own execution",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)


@dataclass(frozen=True)
class RunScope:
    """What every call of one run needs to know: who started it, under which rules."""

    tenant_id: uuid.UUID
    run_id: uuid.UUID
    principal: str | None
    roles: frozenset[str]
    policy: TenantPolicy
    permissions: Permissions
    shadow: bool

    def has_role(self, role: str) -> bool:
        return "admin" in self.roles or role in self.roles


@dataclass(frozen=True)
class CallSite:
    """Where a call is made: the step attempt, and for agents the model's call id.

    ``counted``: the call is counted against the run's ``max_steps`` when it reserves (an agent's choice
    its turn did not count yet; once per call however often it is retried); a workflow's tool steps and
    map items do not count."""

    step_run_id: uuid.UUID
    step_id: str
    attempt: int
    idempotency_key: str
    call_id: str = ""
    kind: str = "tool"  # "tool" (a tool step) | "agent"
    counted: bool = False


@dataclass(frozen=True)
class CallResult(Outcome):
    """The result of one tool call, for a tool step and an agent alike: the engine's outcome of an attempt
    (a tool step's attempt ends with it) plus what only the call knows.

    ``started_at`` and ``finished_at`` span the call itself (:meth:`Caller.call` sets them)."""

    started_at: datetime = field(default_factory=now)
    finished_at: datetime = field(default_factory=now)
    errors: tuple[dict[str, str], ...] = ()  # schema errors, for the model to read
    exec_s: float | None = None  # how long the tool itself took, when it ran
    # The call got past its budget reservation (where an uncounted agent call is counted): calls refused
    # before it (guardrails, approvals, shadow mode, an open breaker) do not count against max_steps.
    budgeted: bool = False

    def for_model(self) -> dict[str, Any]:
        """What an agent's model reads back as the tool call's result."""
        if self.ok:
            return {"ok": True, "result": self.output}
        body: dict[str, Any] = {"ok": False, "error": self.error_class, "message": self.message}
        if self.errors:
            body["errors"] = list(self.errors)
        return body


_RUN_SCOPE = (
    "SELECT r.created_by, r.principal_roles, t.policy FROM run r JOIN tenant t ON t.id = r.tenant_id WHERE r.id = $1"
)


async def run_scope(conn: Conn, run_id: uuid.UUID, tenant_id: uuid.UUID, permissions: Permissions,
                    shadow: bool) -> RunScope:
    row = await conn.fetchrow(_RUN_SCOPE, run_id)
    return RunScope(tenant_id, run_id, row["created_by"], frozenset(row["principal_roles"] or ()),
                    load_policy(row["policy"]), permissions, shadow)


@dataclass
class Caller:
    runtime: Runtime
    http: httpx.AsyncClient
    scope: RunScope
    breaker: Breaker
    # Tools as first resolved in this step attempt: an agent's calls do not look them up again.
    refs: dict[str, ToolRef] = field(default_factory=dict)

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    async def call(self, site: CallSite, name: str, args: Any) -> CallResult:
        """The call through every guardrail, then the tool; never raises for what a tool or a check did."""
        began = now()
        started = time.perf_counter()
        result = await self._call(site, name, args, allow_fallback=True)
        if result.exec_s is not None:
            # What the guarded path added to the tool's own time: lookups, checks, breaker, budget.
            overhead = time.perf_counter() - started - result.exec_s
            GUARDRAIL_OVERHEAD_SECONDS.observe(overhead)
            for type_, data in result.events:
                if type_ == "tool_called":
                    data["overhead_ms"] = round(overhead * 1000, 2)
        return replace(result, started_at=began, finished_at=now())

    async def _call(self, site: CallSite, name: str, args: Any, *, allow_fallback: bool) -> CallResult:
        async with self.runtime.pg.acquire() as conn:
            ref = self.refs.get(name) or await tools.resolve(conn, self.scope.tenant_id, name)
            if ref is not None:
                self.refs[name] = ref
            if ref is None:
                available = sorted(await tools.tool_names(conn, self.scope.tenant_id))
                if self.scope.permissions.tools is not None:
                    available = sorted(self.scope.permissions.tools)
                return self._reject(site, name, None, args, "unknown_tool",
                                    f"unknown tool {name!r}; available tools: {', '.join(available)}",
                                    guardrail=False)
            grant = None
            try:
                gated = await _gated(ref, args, self.settings.expression_timeout_s)
            except ExpressionLimit as exc:
                return self._failed(site, ref, args, "expression",
                                    f"the autonomy condition of {ref.name!r} could not be evaluated: {exc.reason}")
            if gated:
                grant = await grant_for(conn, site.step_run_id, site.call_id)
                if grant is not None and grant.status == "approved":
                    # Run exactly what was approved: that version, those arguments (hash-checked below).
                    pinned = await tools.resolve(conn, self.scope.tenant_id, name, grant.tool_version)
                    ref = pinned or ref
                    if grant.approved_args is not None:
                        args = grant.approved_args  # the approver edited them (validated when decided)
            secrets = await open_secrets(conn, self.runtime.vault, self.scope.tenant_id, ref.spec.secret_names())
        result = self._check(site, ref, args)
        if result is not None:
            return result
        if gated or grant is not None:
            result = self._approval(site, ref, args, grant)
            if result is not None:
                return result
        if ref.spec.effect == "write" and (self.scope.shadow or self.scope.policy.shadow):
            return self._shadow(site, ref, args)
        policy = BreakerPolicy(**ref.spec.breaker.model_dump())
        key = tool_key(self.scope.tenant_id, ref.name)
        decision = await self.breaker.before_call(key, policy)
        if not decision.allowed:
            if ref.spec.fallback and allow_fallback:
                fallback = await self._call(site, ref.spec.fallback, args, allow_fallback=False)
                used = ("fallback_used", {"tool": ref.name, "fallback": ref.spec.fallback, "reason": "circuit_open"})
                return replace(fallback, events=(used, *fallback.events))
            return self._failed(site, ref, args, "circuit_open",
                                f"circuit breaker for {ref.name!r} is {decision.state}; not calling it",
                                transient=True, retry_after=decision.retry_in_s)
        hold = await self._reserve(site, ref)
        if isinstance(hold, CallResult):
            return hold
        try:
            result = replace(await self._execute(site, ref, args, secrets, key, policy, decision.probe), budgeted=True)
        finally:
            # A fixed price per call: it is charged whether the call worked or not. Should the database
            # be away, the reconciler settles the hold at this same price: the call's result must not be lost.
            if hold.id is not None:
                with quiet_database_outage():
                    async with self.runtime.pg.acquire() as conn:
                        await budgets.settle(conn, hold, hold.amount_usd)
        return result

    async def _reserve(self, site: CallSite, ref: ToolRef) -> Hold | CallResult:
        async with self.runtime.pg.acquire() as conn:
            hold = await budgets.reserve(conn, self.scope.tenant_id, self.scope.run_id, site.step_id, "tool",
                                         amount_usd=ref.spec.cost_usd, count_call=site.counted)
        if isinstance(hold, Hold):
            return hold
        event, note = exhausted_notes(self.scope.run_id, hold, tool=ref.name, call_id=site.call_id or None)
        return CallResult(False, error_class=budgets.BUDGET_EXHAUSTED, message=hold.message,
                          pause_reason=_pause_reason(hold), events=(event,), audits=(note,))

    # --- checks --------------------------------------------------------------------------------------

    def _check(self, site: CallSite, ref: ToolRef, args: Any) -> CallResult | None:
        errors = validate_args(ref, args)
        if errors:
            summary = "; ".join(f"{e['pointer'] or '/'}: {e['message']}" for e in errors[:5])
            result = self._reject(site, ref.name, ref, args, "invalid_args",
                                  f"arguments do not match the schema of {ref.name!r}: {summary}", guardrail=False)
            return replace(result, errors=tuple(errors))
        perms = self.scope.permissions
        if perms.tools is not None and ref.name not in perms.tools:
            return self._reject(site, ref.name, ref, args, "not_allowed",
                                f"tool {ref.name!r} is not in this workflow's allowlist "
                                f"({', '.join(sorted(perms.tools))})")
        if perms.read_only and ref.spec.effect == "write":
            return self._reject(site, ref.name, ref, args, "read_only",
                                f"tool {ref.name!r} writes, and this workflow is read-only")
        missing = [role for role in ref.spec.required_roles if not self.scope.has_role(role)]
        if missing:
            return self._reject(site, ref.name, ref, args, "missing_role",
                                f"tool {ref.name!r} needs the role(s) {', '.join(missing)}, which "
                                f"{self.scope.principal or 'the run starter'} does not have")
        return None

    def _approval(self, site: CallSite, ref: ToolRef, args: Any, grant: Grant | None) -> CallResult | None:
        if grant is None or grant.status == "pending":
            reason = _gate_reason(ref, args)
            tracing.event("approval_required", tool=ref.name, **{"steward.tool.version": ref.version})
            return CallResult(False, error_class="approval_required", message=reason,
                              gate=Gate(kind=site.kind, call_id=site.call_id, tool=ref.name, tool_version=ref.version,
                                        args=args, reason=reason))
        if grant.status != "approved":
            return self._failed(site, ref, args, f"approval_{grant.status}",
                                f"the call was {grant.status}" + (f": {grant.comment}" if grant.comment
                                                                   else ""))
        if action_hash(ref.name, ref.version, args) != grant.action_hash:
            return self._reject(site, ref.name, ref, args, "approval_mismatch",
                                "this call is not the action that was approved (tool, version or arguments "
                                "differ); refusing to run it under that approval")
        return None

    # --- outcomes ------------------------------------------------------------------------------------

    def _reject(self, site: CallSite, name: str, ref: ToolRef | None, args: Any, reason: str, message: str,
                *, guardrail: bool = True) -> CallResult:
        """A call refused before it ran: audited and counted; ``guardrail`` ones (permissions) also alerted."""
        recorded = redact_write_only(ref.spec.input_schema, args) if ref else None
        data = {"tool": name, "version": ref.version if ref else None, "reason": reason, "message": message,
                "call_id": site.call_id or None, "args": recorded}
        tracing.event("guardrail_rejected", tool=name, reason=reason)
        note = AuditNote(self.scope.principal or "system", "guardrail.reject", f"run:{self.scope.run_id}", "denied",
                         {**data, "step": site.step_id})
        if guardrail:
            self._alert(data)
        return CallResult(False, error_class="guardrail_rejected" if guardrail else reason, message=message,
                          events=(("guardrail_rejected", data),), audits=(note,))

    def _failed(self, site: CallSite, ref: ToolRef, args: Any, error_class: str, message: str, *,
                transient: bool = False, retry_after: float | None = None) -> CallResult:
        data = {"tool": ref.name, "version": ref.version, "error": error_class, "message": message,
                "call_id": site.call_id or None}
        # Refused by the breaker or by an approver's decision: guardrail decisions, so audited.
        note = AuditNote(self.scope.principal or "system", "guardrail.reject", f"run:{self.scope.run_id}", "denied",
                         {**data, "step": site.step_id})
        return CallResult(False, error_class=error_class, message=message, transient=transient,
                          retry_after=retry_after, retry=_retry(ref), events=(("tool_call_failed", data),),
                          audits=(note,))

    def _shadow(self, site: CallSite, ref: ToolRef, args: Any) -> CallResult:
        recorded = redact_write_only(ref.spec.input_schema, args)
        output = {"shadow": True, "would_have_run": {"tool": ref.name, "version": ref.version, "args": recorded}}
        event = ("tool_shadowed", {"tool": ref.name, "version": ref.version, "args": recorded,
                                   "call_id": site.call_id or None})
        note = AuditNote(self.scope.principal or "system", "tool.shadow", f"tool:{ref.name}", "ok",
                         {"run": str(self.scope.run_id), "step": site.step_id, "version": ref.version})
        return CallResult(True, output=output, events=(event,), audits=(note,))

    async def _execute(self, site: CallSite, ref: ToolRef, args: Any, secrets: dict[str, str], key: str,
                       policy: BreakerPolicy, probe: bool) -> CallResult:
        with tracing.span(f"execute_tool {ref.name}", {
            tracing.GEN_AI_OPERATION: "execute_tool", tracing.GEN_AI_TOOL: ref.name,
            tracing.GEN_AI_TOOL_CALL_ID: site.call_id or None, "steward.tool.version": ref.version,
        }) as current:
            result = await self._execute_call(site, ref, args, secrets, key, policy, probe)
            tracing.outcome(current, result.ok, result.error_class)
            if tracing.records_content(current, self.settings):
                # What the run's tool_called event records: writeOnly values replaced; the output and the
                # error message already had the tool's secrets replaced.
                tracing.set_content(current, self.settings, {
                    tracing.GEN_AI_TOOL_CALL_ARGUMENTS: redact_write_only(ref.spec.input_schema, args),
                    tracing.GEN_AI_TOOL_CALL_RESULT: result.output if result.ok else result.for_model(),
                })
            return result

    async def _execute_call(self, site: CallSite, ref: ToolRef, args: Any, secrets: dict[str, str], key: str,
                            policy: BreakerPolicy, probe: bool) -> CallResult:
        call = ToolCall(args, site.attempt, site.idempotency_key, self.settings, self.http,
                        tuple(self.scope.policy.http_allowlist))
        started = time.perf_counter()
        error: ToolError | None = None
        try:
            if ref.builtin:
                output = await TOOLS[ref.name](call)
            else:
                async with asyncio.timeout(ref.spec.timeout_s):
                    output = await _registered(ref, call, secrets)
        except TimeoutError:
            error = ToolError("timeout", f"tool {ref.name!r} did not answer within {ref.spec.timeout_s:g}s",
                              transient=True)
        except ToolError as exc:
            error = exc
        elapsed = time.perf_counter() - started
        failed = error is not None and error.transient
        if failed or probe:
            # A success outside a probe changes nothing in the breaker: no round trip for it.
            await self.breaker.record(key, policy, not failed, probe=probe)
        recorded = redact_write_only(ref.spec.input_schema, args)
        data = {"tool": ref.name, "version": ref.version, "args": recorded, "ms": round(elapsed * 1000, 2),
                "call_id": site.call_id or None}
        audit = {"run": str(self.scope.run_id), "step": site.step_id, "tool": ref.name, "version": ref.version,
                 "call_id": site.call_id or None, "ms": data["ms"]}
        if error is not None and secrets:
            error.message = scrub(error.message, set(secrets.values()))
        if error is not None:
            event = ("tool_called", {**data, "ok": False, "error": error.error_class, "message": error.message})
            return CallResult(False, error_class=error.error_class, message=error.message,
                              transient=error.transient, retry_after=error.retry_after, retry=_retry(ref),
                              exec_s=elapsed, events=(event,),
                              audits=(self._call_note(ref, "error", {**audit, "error": error.error_class}),))
        if secrets:
            output = scrub(output, set(secrets.values()))
        errors = validate_output(ref, output)
        if errors:
            message = f"output of {ref.name!r} does not match its output_schema: {errors[0]['message']}"
            return CallResult(False, error_class="output_invalid", message=message, exec_s=elapsed,
                              events=(("tool_called", {**data, "ok": False, "error": "output_invalid"}),),
                              audits=(self._call_note(ref, "error", {**audit, "error": "output_invalid"}),))
        return CallResult(True, output=output, exec_s=elapsed, events=(("tool_called", {**data, "ok": True}),),
                          audits=(self._call_note(ref, "ok", audit),))

    def _call_note(self, ref: ToolRef, outcome: str, data: dict[str, Any]) -> AuditNote:
        """Every call that ran is audited (its arguments and result are in the run's events)."""
        return AuditNote(self.scope.principal or "system", "tool.call", f"tool:{ref.name}", outcome, data)

    def _alert(self, data: dict[str, Any]) -> None:
        url = self.scope.policy.alert_webhook
        if url is None:
            return
        body = {"type": "guardrail_rejected", "tenant": str(self.scope.tenant_id), "run": str(self.scope.run_id),
                **data}
        task = asyncio.create_task(
            _post_alert(self.http, str(url), body, self.settings, tuple(self.scope.policy.http_allowlist))
        )
        _alerts.add(task)
        task.add_done_callback(_alerts.discard)


_alerts: set[asyncio.Task[None]] = set()


async def _post_alert(
    http: httpx.AsyncClient, url: str, body: dict[str, Any], settings: Settings, allowlist: tuple[str, ...]
) -> None:
    """Best effort, a few tries: the rejection itself is already in the run's events and the audit log."""
    try:
        await check_destination(url, settings, allowlist)
    except ToolError as exc:
        log.warning("alert webhook %s refused: %s", url, exc.message)
        return
    for attempt in range(3):
        try:
            response = await http.post(url, json=body, timeout=5.0)
            if response.status_code < 500:
                return
        except httpx.HTTPError as exc:
            log.warning("alert webhook %s failed: %s", url, type(exc).__name__)
        await asyncio.sleep(0.5 * 2**attempt)
    log.warning("alert webhook %s gave up after 3 tries", url)


async def _registered(ref: ToolRef, call: ToolCall, secrets: dict[str, str]) -> Any:
    executor = ref.spec.executor
    if isinstance(executor, BuiltinExecutor):
        return await TOOLS[executor.name](call)
    missing = ref.spec.secret_names() - set(secrets)
    if missing:
        raise ToolError("secret_missing", f"secret(s) {', '.join(sorted(missing))} no longer exist", transient=False)
    return await call_http_tool(ref.spec, call, secrets)


def exhausted_notes(run_id: uuid.UUID, hold: budgets.Exhausted, **subject: Any
                    ) -> tuple[tuple[str, dict[str, Any]], AuditNote]:
    """The run event and audit note of a call refused by a budget; ``subject`` names the tool or model."""
    event = ("budget_exhausted", {"limit": hold.limit, "message": hold.message, **subject,
                                  "action": hold.on_exhausted})
    note = AuditNote("system", "budget.exhausted", f"run:{run_id}", "denied",
                     {"limit": hold.limit, **{k: v for k, v in subject.items() if k != "call_id"}})
    return event, note


def _pause_reason(hold: budgets.Exhausted) -> str | None:
    return budgets.BUDGET_EXHAUSTED if hold.on_exhausted == "pause" else None


def _retry(ref: ToolRef) -> RetryPolicy | None:
    if ref.builtin:
        return None
    r = ref.spec.retry
    return RetryPolicy(r.max_attempts, r.backoff_base_s, r.backoff_max_s, r.jitter)


async def _gated(ref: ToolRef, args: Any, budget_s: float) -> bool:
    """Whether the call needs a person's approval; raises ExpressionLimit when the condition overran."""
    mode = ref.spec.autonomy.mode
    if mode == "manual":
        return True
    if mode == "conditional":
        condition = ref.spec.autonomy.condition
        assert condition is not None
        try:
            return await evaluation.condition(condition, {"args": args}, Budget(budget_s))
        except ExpressionLimit:
            raise
        except ExpressionError:
            return True  # a condition that cannot be decided asks a person
    return False


def _gate_reason(ref: ToolRef, args: Any) -> str:
    if ref.spec.autonomy.mode == "manual":
        return f"tool {ref.name!r} needs approval for every call"
    return f"tool {ref.name!r} needs approval when {ref.spec.autonomy.condition}"
