"""Builtin tools (``echo``, ``sleep``, ``fail`` and ``http``), and what every tool executor shares: the
call (:class:`ToolCall`), its failure (:class:`ToolError`) and the outbound-address check."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from app.config import Settings
from app.retry_after import retry_after_seconds
from app.tenants.policy import host_allowed


class ToolError(Exception):
    """A tool call that did not succeed; ``transient`` ones are retried with backoff."""

    def __init__(
        self, error_class: str, message: str, *, transient: bool, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.message = message
        self.transient = transient
        self.retry_after = retry_after


@dataclass(frozen=True)
class ToolCall:
    args: Any
    attempt: int
    idempotency_key: str
    settings: Settings
    http: httpx.AsyncClient
    # Hosts the tenant allows although they resolve to private addresses (TenantPolicy.http_allowlist).
    allowlist: tuple[str, ...] = ()


Tool = Callable[[ToolCall], Awaitable[Any]]


def _args(call: ToolCall) -> dict[str, Any]:
    if call.args is None:
        return {}
    if not isinstance(call.args, dict):
        raise ToolError("bad_args", "arguments must be an object", transient=False)
    return call.args


async def echo(call: ToolCall) -> Any:
    return call.args


async def sleep(call: ToolCall) -> Any:
    seconds = _args(call).get("seconds", 1)
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds < 0:
        raise ToolError("bad_args", "seconds must be a non-negative number", transient=False)
    await asyncio.sleep(seconds)
    return {"slept": seconds}


async def fail(call: ToolCall) -> Any:
    """Fails ``times`` attempts then succeeds; without ``times``, always fails."""
    args = _args(call)
    times = args.get("times")
    transient = bool(args.get("transient", True))
    if times is None or call.attempt <= int(times):
        raise ToolError("fail", args.get("message", f"failed on attempt {call.attempt}"), transient=transient)
    return {"attempts": call.attempt}


async def check_destination(url: str, settings: Settings, allowlist: tuple[str, ...] = ()) -> None:
    """Refuse loopback, link-local, private and other special addresses unless allowed (no SSRF)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ToolError("bad_args", "url must be an absolute http(s) URL", transient=False)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if settings.http_allow_private_networks or host_allowed(list(allowlist), parts.hostname, port):
        return
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            parts.hostname, parts.port or 443, type=socket.SOCK_STREAM
        )
    except socket.gaierror as exc:
        raise ToolError("dns", f"cannot resolve {parts.hostname}: {exc}", transient=True) from exc
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if not ip.is_global:
            raise ToolError(
                "forbidden_destination",
                f"{parts.hostname} resolves to a non-public address ({ip}); a tenant admin can allowlist the host",
                transient=False,
            )


async def http(call: ToolCall) -> Any:
    """``{"url", "method"?, "headers"?, "json"? | "body"?}`` → ``{"status", "headers", "body"}``."""
    args = _args(call)
    url = args.get("url")
    if not isinstance(url, str):
        raise ToolError("bad_args", "url is required", transient=False)
    await check_destination(url, call.settings, call.allowlist)
    headers = {str(k): str(v) for k, v in (args.get("headers") or {}).items()}
    headers.setdefault("Idempotency-Key", call.idempotency_key)
    method = str(args.get("method", "GET")).upper()
    try:
        response = await call.http.request(
            method,
            url,
            headers=headers,
            json=args.get("json"),
            content=args.get("body"),
        )
    except httpx.TimeoutException as exc:
        raise ToolError("timeout", f"{method} {url} timed out", transient=True) from exc
    except httpx.TransportError as exc:
        raise ToolError(
            "connection", f"{method} {url}: {exc.__class__.__name__}: {exc}", transient=True
        ) from exc
    status = response.status_code
    if status == 429 or status >= 500:
        raise ToolError(
            f"http_{status}",
            f"{method} {url} returned {status}",
            transient=True,
            retry_after=retry_after_seconds(response.headers.get("retry-after")),
        )
    if status >= 400:
        raise ToolError(
            f"http_{status}", f"{method} {url} returned {status}: {response.text[:500]}", transient=False
        )
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return {"status": status, "headers": {"content-type": response.headers.get("content-type")}, "body": body}


TOOLS: dict[str, Tool] = {"echo": echo, "sleep": sleep, "fail": fail, "http": http}
