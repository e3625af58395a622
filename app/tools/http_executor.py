"""The ``http`` executor of registered tools: render the request, call it, cut and select the response.

Secrets are rendered into header values only, and only here, just before the request is sent: they
never reach arguments, events, outputs or logs. A response that echoes one has it replaced before it is
cut or parsed. Responses longer than the tool's ``max_response_bytes`` are cut (``truncated: true``, the
body is then the text received so far).
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from app.retry_after import retry_after_seconds
from app.tools.builtins import ToolCall, ToolError, check_destination
from app.tools.redact import cut_scrubbed, secret_forms
from app.tools.spec import HttpExecutor, ToolSpec
from app.workflows.cel.evaluation import Budget, render
from app.workflows.cel.expressions import ExpressionError, ExpressionLimit, whole_expression


async def call_http_tool(spec: ToolSpec, call: ToolCall, secrets: dict[str, str]) -> Any:
    executor = spec.executor
    assert isinstance(executor, HttpExecutor)
    args = call.args if isinstance(call.args, dict) else {}
    # The request's templates share one budget; the response selector gets its own.
    budget = Budget(call.settings.expression_timeout_s)
    try:
        url = await render(executor.url, {"args": args}, budget)
        query = await render(executor.query, {"args": args}, budget) if executor.query is not None else None
        body = await render(executor.body, {"args": args}, budget) if executor.body is not None else None
        headers = {name: str(await render(value, {"args": args, "secrets": secrets}, budget))
                   for name, value in executor.headers.items()}
    except ExpressionLimit as exc:
        raise ToolError("expression", f"cannot build the request: {exc.reason}", transient=False) from exc
    except ExpressionError as exc:
        # Only the template and the reason: never a rendered value (a header may hold a secret).
        raise ToolError("bad_args", f"cannot build the request: {exc.reason}", transient=False) from exc
    if not isinstance(url, str):
        raise ToolError("bad_args", "the url template must render to a string", transient=False)
    if executor.body is None and executor.method != "GET":
        body = args
    headers.setdefault("Idempotency-Key", call.idempotency_key)
    await check_destination(url, call.settings, call.allowlist)
    method = executor.method
    forms = secret_forms(secrets.values())
    try:
        async with call.http.stream(
            method, url, params=_params(query), headers=headers, json=body if method != "GET" else None
        ) as response:
            raw, truncated = await _read_capped(response, spec.max_response_bytes, forms)
    except httpx.TimeoutException as exc:
        raise ToolError("timeout", f"{method} {_safe(url)} timed out", transient=True) from exc
    except httpx.TransportError as exc:
        raise ToolError("connection", f"{method} {_safe(url)}: {type(exc).__name__}", transient=True) from exc
    status = response.status_code
    if status == 429 or status >= 500:
        raise ToolError(f"http_{status}", f"{method} {_safe(url)} returned {status}", transient=True,
                        retry_after=retry_after_seconds(response.headers.get("retry-after")))
    if status >= 400:
        text = cut_scrubbed(raw, 500, forms)[0].decode("utf-8", "replace")
        raise ToolError(f"http_{status}", f"{method} {_safe(url)} returned {status}: {text}", transient=False)
    result: dict[str, Any] = {"status": status, "headers": {"content-type": response.headers.get("content-type")},
                              "body": _decode(raw, truncated)}
    if truncated:
        result["truncated"] = True
    if spec.response is not None:
        return await select_response(spec.response, result, Budget(call.settings.expression_timeout_s))
    return result


async def select_response(selector: str, result: dict[str, Any], budget: Budget) -> Any:
    source = whole_expression(selector)
    assert source is not None  # checked when the tool was registered
    context = {"status": result["status"], "headers": result["headers"], "body": result["body"]}
    try:
        return await render(selector, context, budget)
    except ExpressionLimit as exc:
        raise ToolError("expression", f"the response selector failed: {exc.reason}", transient=False) from exc
    except ExpressionError as exc:
        raise ToolError("response_selector", f"the response selector failed: {exc.reason}", transient=False) from exc


async def _read_capped(response: httpx.Response, limit: int, forms: list[bytes]) -> tuple[bytes, bool]:
    """The body, secrets replaced, cut to ``limit`` bytes; read a secret's length further, so a secret
    that starts before the cut is replaced whole rather than cut in two."""
    margin = len(forms[0]) if forms else 0
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit + margin:
            break
    return cut_scrubbed(b"".join(chunks), limit, forms)


def _decode(raw: bytes, truncated: bool) -> Any:
    text = raw.decode("utf-8", "replace")
    if truncated or not text:
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _params(query: Any) -> dict[str, str] | None:
    if query is None:
        return None
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in dict(query).items()}


def _safe(url: str) -> str:
    """The URL without its query string (which may carry arguments) for error messages."""
    return url.split("?", 1)[0]
