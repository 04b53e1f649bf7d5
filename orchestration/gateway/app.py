"""The gateway's FastAPI application (OpenAPI from typed models).

Platform endpoints live under `/v1/...` (the API's own version); the reverse proxy lives under
`/proxy/...` (`proxy/`), so the two never collide. Later features add their routers to `V1_ROUTERS`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline

from orchestration import __version__
from orchestration.gateway.api import (
    alerts,
    analytics,
    approval_links,
    approvals,
    audit,
    caches,
    jobs,
    keys,
    live_streams,
    pipelines,
    proxy,
    runs,
    streams,
    subscriptions,
    workflows,
)
from orchestration.gateway.dagster_client import DagsterClient
from orchestration.gateway.guards import ClientNetworks, RequestGuards
from orchestration.gateway.health import Health, collect_health
from orchestration.gateway.metrics import RecordRequests, RequestStats
from orchestration.gateway.problems import install_problem_handlers
from orchestration.gateway.proxy.app import PROXY_PREFIX, ProxyApp, ProxyFirst
from orchestration.gateway.security import JwtVerifier
from orchestration.settings import JunctionSettings, get_settings

# The base URL of the in-process Dagster app when it is reached through an ASGI transport.
IN_PROCESS_DAGSTER_URL = "http://dagster.internal"
logger = logging.getLogger("junction.gateway")
V1_ROUTERS = [
    jobs.router,
    runs.router,
    audit.router,
    keys.router,
    analytics.router,
    live_streams.router,
    streams.router,
    subscriptions.router,
    alerts.router,
    approvals.router,
    pipelines.router,
    approval_links.router,
    workflows.router,
    caches.router,
    proxy.router,
]
# Finished minutes of request statistics are written to the store this often.
STATS_FLUSH_INTERVAL_S = 30
DOCS_PATHS = ("/docs", "/redoc")


def create_gateway_app(
    settings: JunctionSettings | None = None, dagster_transport: httpx.AsyncBaseTransport | None = None
) -> FastAPI:
    """Build the gateway. `dagster_transport` reaches an in-process Dagster app (combined server);
    without it the gateway talks HTTP to `settings.dagster_url` (standalone gateway)."""
    settings = settings or get_settings()
    embedded = dagster_transport is not None
    dagster_url = IN_PROCESS_DAGSTER_URL if embedded else settings.dagster_url

    request_stats = RequestStats()

    async def flush_stats_forever() -> None:
        while True:
            await anyio.sleep(STATS_FLUSH_INTERVAL_S)
            try:
                await anyio.to_thread.run_sync(request_stats.flush)
            except Exception:  # noqa: BLE001 - the store may be down; buckets are kept and retried
                logger.warning("could not persist API request statistics; will retry", exc_info=True)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.dagster = DagsterClient(dagster_url, transport=dagster_transport)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(flush_stats_forever)
            tasks.start_soon(app.state.proxy.run_health_checks)
            tasks.start_soon(app.state.proxy.watch)
            try:
                yield
            finally:
                tasks.cancel_scope.cancel()
                await app.state.dagster.aclose()
                await app.state.proxy.aclose()
        try:
            await anyio.to_thread.run_sync(lambda: request_stats.flush(include_current=True))
        except Exception:  # noqa: BLE001
            logger.warning("could not persist the last API request statistics", exc_info=True)

    # FastAPIOffline serves the docs pages' scripts from the package, not from a CDN.
    app = FastAPIOffline(
        title="Junction gateway",
        version=__version__,
        summary="The platform API of Junction, served beside the Dagster UI.",
        lifespan=lifespan,
        docs_url=DOCS_PATHS[0],
        redoc_url=DOCS_PATHS[1],
    )
    app.state.settings = settings
    app.state.request_stats = request_stats
    app.state.jwt_verifier = JwtVerifier.from_settings(settings)
    # The reverse proxy (its routes file is checked here: a bad one stops the gateway at start).
    networks = ClientNetworks(settings.gateway_allow_ips, settings.gateway_deny_ips)
    app.state.proxy = ProxyApp(
        settings.routes_file,
        jwt_verifier=app.state.jwt_verifier,
        redis_url=settings.redis_url,
        store_url=settings.store_url,
        caches_file=settings.caches_file,
        networks=networks,
        max_body_bytes=settings.gateway_max_body_bytes,
        request_stats=request_stats,
    )

    def dagster_ui_url(request: Request) -> str:
        # Embedded, the UI is this server's root; standalone, it is wherever Dagster runs.
        if embedded:
            return str(request.base_url).rstrip("/").removesuffix(settings.gateway_prefix)
        return settings.dagster_url.rstrip("/")

    app.state.dagster_ui_url = dagster_ui_url
    platform_openapi = app.openapi

    def openapi_with_proxied_routes() -> dict:
        # One document: the platform API and every proxied route (shown by /gateway/docs).
        return app.state.proxy.openapi(platform_openapi())

    app.openapi = openapi_with_proxied_routes
    install_problem_handlers(app)

    @app.get("/health", response_model=Health, tags=["platform"], responses={503: {"model": Health}})
    async def health(request: Request) -> JSONResponse:
        """Versions and the state of each backing service (503 when one is down). No key needed."""
        report = await collect_health(settings, request.app.state.dagster)
        return JSONResponse(report.model_dump(), status_code=200 if report.status == "ok" else 503)

    for router in V1_ROUTERS:
        app.include_router(router, prefix="/v1")
    app.include_router(analytics.metrics_router)
    app.include_router(live_streams.client_router)

    if settings.gateway_cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.gateway_cors_origins,
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
        )
    app.add_middleware(
        RequestGuards,
        max_body_bytes=settings.gateway_max_body_bytes,
        networks=networks,
        docs_paths=DOCS_PATHS,
        form_paths=approval_links.FORM_PATHS,
    )
    app.add_middleware(RecordRequests, stats=request_stats)  # outermost: sees guard refusals too
    # The reverse proxy's paths (`/proxy/...`) go to ProxyApp ahead of the whole middleware stack that
    # FastAPI builds (its own and the above): benchmarks/proxy.py measures what that saves. The proxy
    # applies the address lists, a body limit and the request statistics itself.
    build_platform_stack = app.build_middleware_stack
    app.build_middleware_stack = lambda: ProxyFirst(build_platform_stack(), app.state.proxy, PROXY_PREFIX)
    return app
