"""Security headers on every HTTP response: a pure ASGI middleware (no response buffering but for /docs).

Every response gets ``X-Content-Type-Options``, ``X-Frame-Options``, ``Referrer-Policy``,
``Content-Security-Policy``, ``Cross-Origin-Opener-Policy`` and ``Permissions-Policy``; responses under
``/api/`` and ``/auth/`` also get ``Cache-Control: no-store``, and requests that arrived over HTTPS get
``Strict-Transport-Security``. A header the route set itself is never replaced.

The Swagger UI page (``/docs`` and ``/docs/oauth2-redirect``) loads its script and stylesheet from
cdn.jsdelivr.net, its favicon from fastapi.tiangolo.com, and boots from an inline ``<script>``. Those
HTML pages get a relaxed policy allowing those hosts and, instead of ``'unsafe-inline'`` for scripts,
the SHA-256 hash of each inline script read from the page itself (so it follows FastAPI's template and
the app's title and OpenAPI URL). Swagger UI sets inline styles, hence ``'unsafe-inline'`` for styles
on those pages only. docs/security.md ("Security headers") says why each header is there.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSP = "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
HSTS = "max-age=31536000; includeSubDomains"
NO_STORE_PREFIXES = ("/api/", "/auth/")

_ALWAYS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
)
_CSP = b"content-security-policy"

# Inline scripts only: an element with a src attribute is covered by the host allowlist instead.
_SCRIPT = re.compile(rb"<script(?P<attrs>[^>]*)>(?P<body>.*?)</script\s*>", re.DOTALL | re.IGNORECASE)
_SRC = re.compile(rb"\bsrc\s*=", re.IGNORECASE)


def docs_csp(html: bytes) -> str:
    """The Swagger UI page's policy: its CDN hosts, plus a hash of each inline script in ``html``."""
    hashes = "".join(
        f" 'sha256-{base64.b64encode(hashlib.sha256(match['body']).digest()).decode()}'"
        for match in _SCRIPT.finditer(html)
        if not _SRC.search(match["attrs"])
    )
    return (
        "default-src 'self'; "
        f"script-src 'self' https://cdn.jsdelivr.net{hashes}; "
        "style-src 'self' https://cdn.jsdelivr.net 'unsafe-inline'; "
        "img-src 'self' data: https://fastapi.tiangolo.com; "
        "object-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    )


def _with_defaults(message: Message, defaults: Iterable[tuple[bytes, bytes]]) -> Message:
    """``message`` (a response start) with each default header the response does not already carry."""
    headers = list(message.get("headers", ()))
    present = {name.lower() for name, _ in headers}
    headers.extend((name, value) for name, value in defaults if name not in present)
    return {**message, "headers": headers}


def _is_html(message: Message) -> bool:
    return any(
        name.lower() == b"content-type" and value.lower().startswith(b"text/html")
        for name, value in message.get("headers", ())
    )


class SecurityHeadersMiddleware:
    """Add the security headers above to every HTTP response; ``docs_path=None``: no /docs relaxation."""

    def __init__(self, app: ASGIApp, docs_path: str | None = "/docs") -> None:
        self.app = app
        self.docs_path = docs_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        defaults = list(_ALWAYS)
        if path.startswith(NO_STORE_PREFIXES):
            defaults.append((b"cache-control", b"no-store"))
        if scope.get("scheme") == "https":
            defaults.append((b"strict-transport-security", HSTS.encode()))
        if self.docs_path and (path == self.docs_path or path.startswith(self.docs_path + "/")):
            await self._docs(scope, receive, send, defaults)
            return

        strict = [*defaults, (_CSP, CSP.encode())]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = _with_defaults(message, strict)
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _docs(self, scope: Scope, receive: Receive, send: Send, defaults: list[tuple[bytes, bytes]]) -> None:
        """Buffer an HTML docs page (a few kB) to hash its inline scripts into its policy."""
        held: Message | None = None
        chunks: list[bytes] = []

        async def send_docs(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", ())}
                if _is_html(message) and _CSP not in names:
                    held = message
                    return
                message = _with_defaults(message, [*defaults, (_CSP, CSP.encode())])
            elif message["type"] == "http.response.body" and held is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = b"".join(chunks)
                start = _with_defaults(held, [*defaults, (_CSP, docs_csp(body).encode())])
                held = None
                await send(start)
                message = {"type": "http.response.body", "body": body, "more_body": False}
            await send(message)

        await self.app(scope, receive, send_docs)
