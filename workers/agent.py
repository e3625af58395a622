"""Model steps: ``llm`` (one model call) and ``agent`` (a tool-calling loop), durable through checkpoints.

An agent step is a conversation: the instructions and the input, then model turns and tool results.
Every model turn and every tool call is checkpointed as it completes (app/engine/checkpoints.py), in
one transaction with its run events; a worker resuming the step (after a crash, a retry, an approval
or a budget pause) rebuilds the conversation from the checkpoints and carries on from there, so a
paid model call or a completed tool call is never made twice.

Tool calls take the one guarded path (app/tools/calls.py). What the guardrails refuse and what tools
fail with goes back to the model as the call's result, so it can correct itself; the same failing
call made ``loop_limit`` times ends the step as a loop. Before each model call its worst case (the
prompt's upper-bound token count plus the answer cap) is reserved against the run's token and cost
limits and the tenant's caps, and settled to the reported usage afterwards.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
from opentelemetry.trace import SpanKind

from app import tracing
from app.budgets import service as budgets
from app.budgets.service import Hold
from app.canonical import digest
from app.engine import checkpoints
from app.engine.advance import Claimed
from app.engine.attempts import AuditNote, Outcome
from app.engine.checkpoints import Checkpoint
from app.engine.transaction import in_tx
from app.engine.unit_of_work import UnitOfWork
from app.json_schema import schema_errors
from app.llm.client import ChatResult, ModelError, chat, cost_usd, estimate_input_tokens, tool_spec
from app.pg import Conn
from app.providers.service import ModelRef, resolve_model
from app.runtime import Runtime
from app.tools import service as tools
from app.tools.builtins import ToolError, check_destination
from app.tools.calls import Caller, CallResult, CallSite, exhausted_notes
from app.tools.redact import REDACTED, redact_write_only
from app.tools.service import ToolRef
from app.workflows.steps import ModelSpec, ModelStep, Permissions

log = logging.getLogger(__name__)

# Inline retries of a transient tool failure inside an agent wait at most this long each.
MAX_TOOL_RETRY_DELAY_S = 10.0
PREVIEW_CHARS = 1000


def _now() -> datetime:
    return datetime.now(UTC)


def _digest(value: Any) -> str:
    return digest(value, default=str)


@dataclass(frozen=True)
class PendingCall:
    id: str
    name: str
    args: Any
    error: str | None  # the arguments were not JSON
    counted: bool = False  # counted against max_steps with the turn that chose it


@dataclass
class Conversation:
    """The conversation as rebuilt from the checkpoints of the current epoch."""

    messages: list[dict[str, Any]]
    seq: int = 0  # the next checkpoint's number
    epoch: int = 0  # how many times the step was started afresh (a retried run)
    turns: int = 0
    pending: list[PendingCall] = field(default_factory=list)
    answer: str | None = None  # the last model turn's text, when it called no tools
    failures: Counter[str] = field(default_factory=Counter)

    def apply(self, cp: Checkpoint) -> None:
        self.seq = cp.seq + 1
        if cp.kind == "model":
            message = cp.data["message"]
            self.messages.append(message)
            self.turns += 1
            # The first ``counted`` calls were counted against max_steps when the turn was saved.
            counted = cp.data.get("counted", 0)
            self.pending = [replace(call, counted=i < counted) for i, call in enumerate(_pending(message))]
            self.answer = None if self.pending else (message.get("content") or "")
        elif cp.kind == "tool":
            self.messages.append({"role": "tool", "tool_call_id": cp.call_id, "content": cp.data["content"]})
            self.pending = [call for call in self.pending if call.id != cp.call_id]
            if not cp.data["ok"]:
                self.failures[cp.data["signature"]] += 1
        elif cp.kind == "note":
            self.messages.append({"role": "user", "content": cp.data["content"]})
            self.answer = None


def replay(base: list[dict[str, Any]], saved: list[Checkpoint]) -> Conversation:
    """The conversation after the checkpoints that follow the last ``reset`` (a retried run starts over)."""
    conversation = Conversation(list(base))
    resets = [i for i, cp in enumerate(saved) if cp.kind == "reset"]
    start = resets[-1] + 1 if resets else 0
    conversation.epoch = len(resets)
    for cp in saved[start:]:
        conversation.apply(cp)
    if saved:
        conversation.seq = saved[-1].seq + 1
    return conversation


def _pending(message: dict[str, Any]) -> list[PendingCall]:
    calls = []
    for call in message.get("tool_calls") or []:
        function = call["function"]
        raw = function.get("arguments")
        args: Any = {}
        error = None
        if isinstance(raw, str) and raw.strip():
            try:
                args = json.loads(raw)
            except ValueError as exc:
                args, error = raw, f"arguments are not valid JSON: {exc}"
        calls.append(PendingCall(call["id"], function["name"], args, error))
    return calls


def base_messages(step: ModelStep, args: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversation's opening: the system text and the (rendered) prompt or input."""
    system = args.get("system") if step.kind == "llm" else args.get("instructions")
    user = args.get("prompt") if step.kind == "llm" else args.get("input")
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    text = user if isinstance(user, str) else json.dumps(user, ensure_ascii=False)
    messages.append({"role": "user", "content": text})
    return messages


def trim(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` UTF-8 bytes, saying so: tool results must not swamp the context."""
    raw = text.encode()
    if len(raw) <= limit:
        return text
    kept = raw[:limit].decode(errors="ignore")
    return f"{kept}… [cut: {len(raw)} bytes, only the first {limit} shown]"


def parse_answer(text: str) -> Any:
    """The JSON value of a final answer, allowing the code fence models like to wrap it in."""
    stripped = text.strip()
    if stripped.startswith("```"):
        stripped = stripped.split("\n", 1)[1] if "\n" in stripped else ""
        stripped = stripped.rsplit("```", 1)[0]
    return json.loads(stripped)


def genai_message(message: dict[str, Any], refs: Mapping[str, ToolRef]) -> dict[str, Any]:
    """A chat message in the GenAI conventions' shape (``role`` and ``parts``), for a span, redacted as run
    events are: a tool call's ``writeOnly`` argument values replaced. Arguments of a tool the agent does not
    know, or that are not JSON, are replaced whole (no schema says which parts are safe; run events record
    none). Tool results are what the model read, their secrets already replaced when the call ran."""
    role = message.get("role")
    if role == "tool":
        parts = [{"type": "tool_call_response", "id": message.get("tool_call_id"), "response": message.get("content")}]
    else:
        parts = [{"type": "text", "content": message["content"]}] if message.get("content") else []
        for call in _pending(message):
            ref = refs.get(call.name)
            args = redact_write_only(ref.spec.input_schema, call.args) if ref and call.error is None else REDACTED
            parts.append({"type": "tool_call", "id": call.id, "name": call.name, "arguments": args})
    return {"role": role, "parts": parts}


def _finish(reason: str | None) -> str:
    """An OpenAI finish reason as the GenAI conventions name it."""
    return {"tool_calls": "tool_call", "function_call": "tool_call", None: "stop"}.get(reason, reason or "stop")


@dataclass
class ModelStepRun:
    """One attempt at an ``llm`` or ``agent`` step."""

    runtime: Runtime
    http: httpx.AsyncClient
    caller: Caller
    claimed: Claimed
    spec: ModelSpec
    model: ModelRef
    tools: list[dict[str, Any]]
    conversation: Conversation
    started: datetime = field(default_factory=_now)
    # An agent's turns count against the run's max_steps (with the calls it chooses); an llm step's one
    # turn, written by the workflow's author, does not.
    counts_turns: bool = False

    async def run(self) -> Outcome:
        c = self.conversation
        while True:
            if c.pending:
                outcome = await self._call_tools()
            elif c.answer is not None:
                outcome = await self._answer(c.answer)
            elif c.turns >= self.spec.max_turns:
                outcome = self._fail("max_turns", f"no final answer within {self.spec.max_turns} model turns")
            else:
                outcome = await self._model_turn()
            if outcome is not None:
                return outcome

    # --- model turns ---------------------------------------------------------------------------------

    async def _model_turn(self) -> Outcome | None:
        c, spec, settings = self.conversation, self.spec, self.runtime.settings
        answer_cap = spec.max_tokens or settings.model_max_output_tokens
        prompt_tokens = estimate_input_tokens(c.messages, self.tools)
        estimate = cost_usd(self.model.price, prompt_tokens, answer_cap)
        async with self.runtime.pg.acquire() as conn:
            hold = await budgets.reserve(conn, self.claimed.tenant_id, self.claimed.run_id, self.claimed.step_id,
                                         "model", amount_usd=estimate, tokens=prompt_tokens + answer_cap,
                                         count_call=self.counts_turns)
        if isinstance(hold, budgets.Exhausted):
            return self._exhausted(hold)
        try:
            result = await self._chat(
                messages=c.messages, tools=self.tools or None, max_tokens=answer_cap,
                response_format={"type": "json_object"} if spec.output == "json" and not self.tools else None,
                timeout_s=settings.model_timeout_s,
            )
        except ModelError as exc:
            # A call that timed out may still have been billed: keep its estimate. Refusals cost nothing.
            charged = (hold.amount_usd, hold.tokens) if exc.error_class == "timeout" else (Decimal(0), 0)
            async with self.runtime.pg.acquire() as conn:
                await budgets.settle(conn, hold, *charged)
            event = ("model_call_failed", {"turn": c.turns + 1, "model": self._model_name(), "error": exc.error_class,
                                           "message": exc.message, "transient": exc.transient})
            return Outcome(False, self.started, _now(), error_class=f"model_{exc.error_class}", message=exc.message,
                           transient=exc.transient, retry_after=exc.retry_after, events=(event,))
        cost = cost_usd(self.model.price, result.input_tokens, result.output_tokens)
        data = {"message": result.message, "input_tokens": result.input_tokens,
                "output_tokens": result.output_tokens, "cost_usd": str(cost), "ms": round(result.latency_s * 1000, 2)}
        cp = Checkpoint(c.seq, "model", None, data)
        await in_tx(self.runtime, self._save_turn, cp, [("model_called", self._turn_event(result, cost))], hold, cost,
                    result.input_tokens + result.output_tokens)
        c.apply(cp)
        return None

    async def _chat(self, **request: Any) -> ChatResult:
        """One model call, in a ``chat <model>`` span (GenAI conventions; the prompt and answer only under
        ``STEWARD_TRACE_CONTENT``, redacted)."""
        attributes = {tracing.GEN_AI_OPERATION: "chat", tracing.GEN_AI_PROVIDER: self.model.provider,
                      tracing.GEN_AI_MODEL: self.model.model, "steward.turn": self.conversation.turns + 1}
        with tracing.span(f"chat {self.model.model}", attributes, SpanKind.CLIENT) as current:
            try:
                result = await chat(self.http, base_url=self.model.base_url, api_key=self.model.api_key,
                                    model=self.model.model, max_tokens_param=self.model.max_tokens_param, **request)
            except ModelError as exc:
                tracing.outcome(current, False, f"model_{exc.error_class}")
                raise
            current.set_attribute(tracing.GEN_AI_INPUT_TOKENS, result.input_tokens)
            current.set_attribute(tracing.GEN_AI_OUTPUT_TOKENS, result.output_tokens)
            if result.finish_reason:
                current.set_attribute(tracing.GEN_AI_FINISH_REASONS, [result.finish_reason])
            if tracing.records_content(current, self.runtime.settings):
                refs = self.caller.refs
                output = {**genai_message(result.message, refs), "finish_reason": _finish(result.finish_reason)}
                tracing.set_content(current, self.runtime.settings, {
                    tracing.GEN_AI_INPUT_MESSAGES: [genai_message(m, refs) for m in request["messages"]],
                    tracing.GEN_AI_OUTPUT_MESSAGES: [output],
                })
            tracing.outcome(current, True, None)
            return result

    async def _save_turn(self, tx: UnitOfWork, cp: Checkpoint, events: list[tuple[str, dict[str, Any]]], hold: Hold,
                         cost: Decimal, tokens: int) -> None:
        """The turn's checkpoint and the settlement of its hold: both or neither. An agent's turn also
        counts the tool calls it chose against max_steps here, as many as fit (the checkpoint records how
        many), so those calls need no transaction of their own when they are free."""
        if self.counts_turns:
            chosen = len(cp.data["message"].get("tool_calls") or [])
            cp.data["counted"] = await budgets.count_chosen_calls(tx.conn, self.claimed.run_id, chosen)
        await checkpoints.save(tx, self.claimed, cp, events, [])
        await budgets.settle(tx.conn, hold, cost, tokens)

    def _turn_event(self, result: ChatResult, cost: Decimal) -> dict[str, Any]:
        content = result.content or ""
        return {
            "turn": self.conversation.turns + 1,
            "model": self._model_name(),
            "input_tokens": result.input_tokens,
            "output_tokens": result.output_tokens,
            "tokens_estimated": not result.usage_reported,
            "cost_usd": str(cost),
            "ms": round(result.latency_s * 1000, 2),
            "finish_reason": result.finish_reason,
            "tool_calls": [{"id": call.id, "name": call.name} for call in result.tool_calls],
            "content": content[:PREVIEW_CHARS],
            "content_sha256": _digest(content),
            "request_sha256": _digest(self.conversation.messages),
        }

    def _model_name(self) -> str:
        return f"{self.model.provider}/{self.model.model}"

    async def _answer(self, text: str) -> Outcome | None:
        if self.spec.output == "text":
            return Outcome(True, self.started, _now(), output=text)
        try:
            value = parse_answer(text)
        except ValueError as exc:
            problems = [f"the answer is not JSON: {exc}"]
        else:
            validator = self.spec.output_validator
            problems = [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
                        for e in (schema_errors(validator, value) if validator else [])]
            if not problems:
                return Outcome(True, self.started, _now(), output=value)
        if self.conversation.turns >= self.spec.max_turns:
            return self._fail("output_invalid", "the final answer does not match the step's output: "
                              + "; ".join(problems[:5]))
        note = ("Your final answer must be only a JSON value" + (" matching this JSON Schema: "
                + json.dumps(self.spec.output_schema) if self.spec.output_schema else "") + ". Problems: "
                + "; ".join(problems[:5]))
        cp = Checkpoint(self.conversation.seq, "note", None, {"content": note})
        await in_tx(self.runtime, checkpoints.save, self.claimed, cp,
                    [("agent_output_rejected", {"turn": self.conversation.turns, "problems": problems[:5]})], [])
        self.conversation.apply(cp)
        return None

    # --- tool calls ----------------------------------------------------------------------------------

    async def _call_tools(self) -> Outcome | None:
        c = self.conversation
        call = c.pending[0]
        if call.error is not None:
            event = ("tool_call_failed", {"tool": call.name, "error": "invalid_args", "message": call.error,
                                          "call_id": self._call_key(call)})
            result = CallResult(False, error_class="invalid_args", message=call.error, events=(event,))
        else:
            result = await self._call(call)
        if result.gate is not None or result.pause_reason is not None or (
            result.error_class == budgets.BUDGET_EXHAUSTED
        ):
            # The step stops here: it waits for a decision or a budget, or fails; it resumes at this call.
            return replace(result, started_at=self.started, finished_at=_now())
        full = json.dumps(result.for_model(), ensure_ascii=False, default=str)
        content = trim(full, self.spec.max_result_bytes)
        signature = _digest({"tool": call.name, "args": call.args})
        cp = Checkpoint(c.seq, "tool", call.id, {"tool": call.name, "ok": result.ok, "content": content,
                                                 "signature": signature})
        # What the model reads back, next to what the call did.
        heard = ("agent_tool_result", {"call_id": self._call_key(call), "tool": call.name, "ok": result.ok,
                                       "content": content[:PREVIEW_CHARS], "content_sha256": _digest(content),
                                       "bytes": len(full.encode()), "trimmed": content != full})
        # A call counted with its turn that was refused before its reservation gives its count back.
        await in_tx(self.runtime, self._save_call, cp, [*result.events, heard], result.audits,
                    call.counted and not result.budgeted)
        c.apply(cp)
        if not result.ok and c.failures[signature] >= self.spec.loop_limit:
            return self._fail("agent_loop", f"the model made the same failing call to {call.name!r} "
                              f"{c.failures[signature]} times ({result.error_class}: {result.message})")
        return None

    async def _save_call(self, tx: UnitOfWork, cp: Checkpoint, events: list[tuple[str, dict[str, Any]]],
                         audits: list[AuditNote], uncount: bool) -> None:
        await checkpoints.save(tx, self.claimed, cp, events, audits)
        if uncount:
            await budgets.uncount_call(tx.conn, self.claimed.run_id)

    def _call_key(self, call: PendingCall) -> str:
        return f"{self.conversation.turns}:{call.id}"[:128]

    async def _call(self, call: PendingCall) -> CallResult:
        """The call through the guardrails, with the tool's retry policy applied here for transient failures."""
        # Model call ids are only unique within a turn for some servers (or derived from the call's content
        # when a server sends none): the turn number makes them unique in the conversation, so a repeated
        # identical call gets an approval and an idempotency key of its own.
        call_id = self._call_key(call)
        key = f"{self.claimed.idempotency_key}:{self.conversation.epoch}:{call_id}"
        # The model chose this call: it counts against max_steps, once, however often it is retried here;
        # normally with its turn already, else (no room was left then) when it is made.
        site = CallSite(self.claimed.step_run_id, self.claimed.step_id, self.claimed.attempt_n, key, call_id, "agent",
                        counted=not call.counted)
        events: list[tuple[str, dict[str, Any]]] = []
        audits: list[AuditNote] = []
        attempt = 1
        budgeted = None  # whether the first attempt got past its reservation: where the call is counted
        while True:
            result = await self.caller.call(site, call.name, call.args)
            site = replace(site, counted=False)
            budgeted = result.budgeted if budgeted is None else budgeted
            events += result.events
            audits += result.audits
            retry = result.retry
            if result.ok or not result.transient or result.error_class == "circuit_open" or retry is None \
                    or attempt >= retry.max_attempts:
                return replace(result, events=tuple(events), audits=tuple(audits), budgeted=budgeted)
            delay = min(retry.backoff_base_s * 2 ** (attempt - 1), retry.backoff_max_s, MAX_TOOL_RETRY_DELAY_S)
            if result.retry_after is not None:
                delay = max(delay, min(result.retry_after, MAX_TOOL_RETRY_DELAY_S))
            await asyncio.sleep(delay)
            attempt += 1

    # --- endings -------------------------------------------------------------------------------------

    def _fail(self, error_class: str, message: str) -> Outcome:
        event = ("agent_stopped", {"reason": error_class, "message": message, "turns": self.conversation.turns})
        return Outcome(False, self.started, _now(), error_class=error_class, message=message, events=(event,))

    def _exhausted(self, hold: budgets.Exhausted) -> Outcome:
        event, note = exhausted_notes(self.claimed.run_id, hold, model=self._model_name())
        return Outcome(False, self.started, _now(), error_class=budgets.BUDGET_EXHAUSTED, message=hold.message,
                       pause_reason=budgets.BUDGET_EXHAUSTED if hold.on_exhausted == "pause" else None,
                       events=(event,), audits=(note,))


async def run_model_step(runtime: Runtime, http: httpx.AsyncClient, caller: Caller, step: ModelStep,
                         claimed: Claimed) -> Outcome:
    """Run (or resume) an ``llm`` or ``agent`` step attempt."""
    spec = step.model
    started = _now()
    scope = caller.scope
    async with runtime.pg.acquire() as conn:
        model = await resolve_model(conn, runtime.vault, scope.tenant_id, f"{spec.provider}/{spec.model}")
        tool_specs = await _tool_specs(conn, caller, spec.tools)
        saved = await checkpoints.load(conn, claimed.step_run_id)
    if isinstance(model, str):
        return Outcome(False, started, _now(), error_class="model_not_found", message=model)
    try:
        await check_destination(model.base_url, runtime.settings, tuple(scope.policy.http_allowlist))
    except ToolError as exc:
        return Outcome(False, started, _now(), error_class=exc.error_class, message=exc.message,
                       transient=exc.transient)
    # The agent's tools are its allowlist, within the workflow's.
    allowed = frozenset(spec.tools)
    if scope.permissions.tools is not None:
        allowed &= scope.permissions.tools
    agent_caller = replace(caller, scope=replace(scope, permissions=Permissions(scope.permissions.read_only,
                                                                                 allowed)))
    conversation = replay(base_messages(step, claimed.args or {}), saved)
    stepper = ModelStepRun(runtime, http, agent_caller, claimed, spec, model, tool_specs, conversation, started,
                           counts_turns=step.kind == "agent")
    if step.kind != "agent":
        return await stepper.run()
    attributes = {tracing.GEN_AI_OPERATION: "invoke_agent", tracing.GEN_AI_AGENT: step.id,
                  tracing.GEN_AI_PROVIDER: model.provider, tracing.GEN_AI_MODEL: model.model}
    with tracing.span(f"invoke_agent {step.id}", attributes) as current:
        outcome = await stepper.run()
        tracing.outcome(current, outcome.ok, outcome.error_class)
        return outcome


async def _tool_specs(conn: Conn, caller: Caller, names: tuple[str, ...]) -> list[dict[str, Any]]:
    """The agent's tools as the model sees them (a tool deleted since is left out; calling it says so).

    The caller keeps them, so the agent's calls use these versions without looking them up again."""
    specs = []
    for name in names:
        ref = await tools.resolve(conn, caller.scope.tenant_id, name)
        if ref is not None:
            caller.refs[name] = ref
            specs.append(tool_spec(ref.name, ref.spec.description, ref.spec.input_schema))
    return specs


__all__ = ["ModelStepRun", "base_messages", "parse_answer", "replay", "run_model_step", "trim"]
