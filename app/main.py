"""The FastAPI application: routers, error handlers, middleware and the runtime's lifespan."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram
from prometheus_client.core import Metric
from sqlalchemy import text
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import logs, tracing
from app import metrics as app_metrics
from app.approvals.routes import router as approvals_router
from app.audit.routes import router as audit_router
from app.auth.web import router as auth_router
from app.budgets.routes import router as budgets_router
from app.config import Settings, get_settings
from app.dashboard import router as dashboard_router
from app.db import ROOT
from app.http import (
    BodySizeLimitMiddleware,
    InternalErrorMiddleware,
    JsonRoute,
    problem_response,
    problem_responses,
    register_error_handlers,
)
from app.input_guard import InputGuardMiddleware
from app.outage import DATABASE, REDIS
from app.outage import register_handlers as register_outage_handlers
from app.providers.routes import router as providers_router
from app.runs.routes import router as runs_router
from app.runtime import Runtime
from app.security_headers import SecurityHeadersMiddleware
from app.tenants.access import router as access_router
from app.tenants.routes import router as settings_router
from app.tools.breaker import Breaker, breaker_prefix
from app.tools.routes import router as tools_router
from app.vault.routes import router as secrets_router
from app.workflows.routes import router as workflows_router

log = logging.getLogger(__name__)

try:
    VERSION = package_version("steward")
except PackageNotFoundError:  # running from a checkout that was never installed
    VERSION = "0.0.0"

READY_TIMEOUT_S = 2.0

# Module-level: prometheus_client's default registry refuses a second metric of the same name, and
# tests build several apps in one process.
HTTP_REQUESTS = Counter("steward_http_requests_total", "HTTP requests handled", ["method", "route", "status"])
HTTP_LATENCY = Histogram(
    "steward_http_request_duration_seconds", "Time to handle an HTTP request", ["method", "route"]
)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class LogContextMiddleware:
    """Log records of a request carry its tenant and principal (bound when the caller is authenticated),
    and only its own: the binding ends with the request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with logs.request_scope():
            await self.app(scope, receive, send)


class MetricsMiddleware:
    """Counts requests and their latency, labelled by route template (not raw path: bounded cardinality)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # Before the response: the request's span ends with its last byte.
                tracing.name_by_route(scope["method"], getattr(scope.get("route"), "path", None))
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            # The router writes the matched route into this same scope dict.
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            HTTP_REQUESTS.labels(method, route, str(status)).inc()
            HTTP_LATENCY.labels(method, route).observe(time.perf_counter() - started)


# Unauthenticated, without a body of their own: still a bad Content-Length (400), an oversized body (413)
# or a NUL in the query or a header (422).
health_router = APIRouter(tags=["health"], responses=problem_responses(400, 413, 422), route_class=JsonRoute)


@health_router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@health_router.get(
    "/readyz",
    summary="The database and Redis answer",
    responses=problem_responses(503),
)
async def readyz(request: Request) -> Any:
    runtime: Runtime = request.app.state.runtime
    checks = {"database": await _check_database(runtime)}
    if runtime.redis is not None:
        checks["redis"] = await _check_redis(runtime)
    down = sorted(name for name, state in checks.items() if state != "ok")
    if down:
        return problem_response(
            503,
            "not-ready",
            "Service unavailable",
            f"not ready: {', '.join(down)} unreachable",
            instance=request.url.path,
            checks=checks,
        )
    return {"status": "ok", "checks": checks}


@health_router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """This process's metrics, and gauges of what the database holds now (runs active, queues, outbox,
    budget spend) and of the breakers' state in Redis, read at scrape time; a source that does not answer
    leaves its gauges out and counts a scrape error, never failing the scrape."""
    runtime: Runtime = request.app.state.runtime
    families: list[Metric] = []
    for source in app_metrics.SCRAPE_SOURCES:
        app_metrics.SCRAPE_ERRORS.labels(source)  # present at 0 from the first scrape
    try:
        async with asyncio.timeout(READY_TIMEOUT_S), runtime.pg.acquire() as conn:
            families = await app_metrics.database_families(conn, tenant_label=runtime.settings.metrics_tenant_label)
    except Exception as exc:
        DATABASE.down(exc)
        app_metrics.SCRAPE_ERRORS.labels("database").inc()
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            states = await Breaker(runtime.redis, prefix=breaker_prefix(runtime.settings.queue_prefix)).gauge_states()
    except Exception as exc:
        REDIS.down(exc)
        app_metrics.SCRAPE_ERRORS.labels("redis").inc()
    else:
        REDIS.up()
        families.append(app_metrics.breaker_family(states))
    return Response(app_metrics.exposition(families), media_type=CONTENT_TYPE_LATEST)


async def _check_database(runtime: Runtime) -> str:
    try:
        async with asyncio.timeout(READY_TIMEOUT_S), runtime.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except Exception as exc:  # any failure means "not ready"; the reason goes to the log, once per outage
        DATABASE.down(exc)
        return "down"
    return "ok"


async def _check_redis(runtime: Runtime) -> str:
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            await runtime.redis.ping()
    except Exception as exc:
        REDIS.down(exc)
        return "down"
    REDIS.up()
    return "ok"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await Runtime.start(settings, role="api")
        app.state.runtime = runtime
        app.state.sessionmaker = runtime.sessionmaker
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(
        title="Steward",
        version=VERSION,
        description="Durable, supervised workflows for AI agents.",
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.settings = settings
    register_error_handlers(app)
    register_outage_handlers(app)
    # Last added runs first: metrics and security headers see every response, 413s and 500s included.
    # The input guard reads bodies inside the size limit, and its refusals are no internal errors.
    app.add_middleware(InternalErrorMiddleware)
    app.add_middleware(InputGuardMiddleware)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(LogContextMiddleware)
    if tracing.enabled():
        tracing.instrument_app(app)
    app.include_router(health_router)
    app.include_router(dashboard_router)
    app.include_router(workflows_router)
    app.include_router(runs_router)
    app.include_router(secrets_router)
    app.include_router(tools_router)
    app.include_router(providers_router)
    app.include_router(approvals_router)
    app.include_router(settings_router)
    app.include_router(budgets_router)
    app.include_router(auth_router)
    app.mount("/static", StaticFiles(directory=ROOT / "static"), name="static")
    app.include_router(audit_router)
    app.include_router(access_router)
    return app
