"""The gateway's FastAPI application (OpenAPI from typed models).

Later features add their routers under `/v1/...` here; the reverse proxy lives under `/proxy/...`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from orchestration import __version__
from orchestration.gateway.dagster_client import DagsterClient
from orchestration.gateway.health import Health, collect_health
from orchestration.settings import JunctionSettings, get_settings

# The base URL of the in-process Dagster app when it is reached through an ASGI transport.
IN_PROCESS_DAGSTER_URL = "http://dagster.internal"


def create_gateway_app(
    settings: JunctionSettings | None = None, dagster_transport: httpx.AsyncBaseTransport | None = None
) -> FastAPI:
    """Build the gateway. `dagster_transport` reaches an in-process Dagster app (combined server);
    without it the gateway talks HTTP to `settings.dagster_url` (standalone gateway)."""
    settings = settings or get_settings()
    dagster_url = IN_PROCESS_DAGSTER_URL if dagster_transport else settings.dagster_url

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.dagster = DagsterClient(dagster_url, transport=dagster_transport)
        try:
            yield
        finally:
            await app.state.dagster.aclose()

    app = FastAPI(
        title="Junction gateway",
        version=__version__,
        summary="The platform API of Junction, served beside the Dagster UI.",
        lifespan=lifespan,
        root_path_in_servers=False,
    )
    app.state.settings = settings

    @app.get("/health", response_model=Health, tags=["platform"], responses={503: {"model": Health}})
    async def health(request: Request) -> JSONResponse:
        """Versions and the state of each backing service (503 when one is down)."""
        report = await collect_health(settings, request.app.state.dagster)
        return JSONResponse(report.model_dump(), status_code=200 if report.status == "ok" else 503)

    return app
