"""`GET /health`: versions and the state of each backing service.

Answers 200 when every configured service is reachable and 503 otherwise, so a load balancer can
take an instance out of rotation; the body always says which service failed and why.
"""

from __future__ import annotations

import platform
import time
from typing import Literal

import anyio
from pydantic import BaseModel

from orchestration import __version__
from orchestration.gateway.dagster_client import DagsterClient, DagsterUnavailable
from orchestration.settings import JunctionSettings

ServiceState = Literal["ok", "down", "embedded"]

CODE_LOCATIONS_QUERY = """
query CodeLocations {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError { __typename ... on PythonError { message } }
      }
    }
    ... on PythonError { message }
  }
}
"""

DAEMON_HEALTH_QUERY = """
query DaemonHealth {
  instance { daemonHealth { allDaemonStatuses { daemonType healthy required } } }
}
"""


class ServiceHealth(BaseModel):
    status: ServiceState
    detail: str = ""
    latency_ms: float | None = None


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    versions: dict[str, str]
    services: dict[str, ServiceHealth]


def versions() -> dict[str, str]:
    import dagster

    return {"junction": __version__, "dagster": dagster.__version__, "python": platform.python_version()}


async def _timed(check) -> ServiceHealth:
    started = time.perf_counter()
    try:
        detail = await check()
        state: ServiceState = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure of a dependency is reported, not raised
        state, detail = "down", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ServiceHealth(
        status=state, detail=detail, latency_ms=round((time.perf_counter() - started) * 1000, 2)
    )


async def check_platform_store(settings: JunctionSettings) -> str:
    from orchestration.store.bootstrap import redacted
    from orchestration.store.migrate import current_revision, heads

    revision = await anyio.to_thread.run_sync(current_revision, settings.store_url)
    expected = heads()
    if revision not in expected:
        raise RuntimeError(
            f"store at revision {revision}, code expects {', '.join(expected)}: run `junction db upgrade`"
        )
    return f"{redacted(settings.store_url)} at {revision}"


async def check_redis(settings: JunctionSettings) -> str:
    import redis.asyncio as redis

    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=2)
    try:
        await client.ping()
        info = await client.info("server")
        memory = await client.info("memory")
        policy = memory.get("maxmemory_policy", "noeviction")
        if policy != "noeviction":
            # Streams and rate limits are durable state: an evicting Redis would drop them silently.
            raise RuntimeError(
                f"maxmemory-policy is {policy}: Junction needs noeviction (it keeps durable state)"
            )
        return f"redis {info.get('redis_version', '?')}"
    finally:
        await client.aclose()


async def check_dagster(client: DagsterClient) -> str:
    info = await client.server_info()
    return f"dagster-webserver {info.get('dagster_webserver_version', '?')}"


async def check_daemon(client: DagsterClient) -> str:
    data = await client.graphql(DAEMON_HEALTH_QUERY)
    statuses = data["instance"]["daemonHealth"]["allDaemonStatuses"]
    unhealthy = [s["daemonType"] for s in statuses if s["required"] and not s["healthy"]]
    if unhealthy:
        raise DagsterUnavailable(f"daemons not running: {', '.join(sorted(unhealthy))}")
    return f"{sum(1 for s in statuses if s['required'])} daemons healthy"


async def check_code_locations(client: DagsterClient) -> str:
    data = await client.graphql(CODE_LOCATIONS_QUERY)
    workspace = data["workspaceOrError"]
    if workspace["__typename"] != "Workspace":
        raise DagsterUnavailable(workspace.get("message", "workspace unavailable"))
    failed = [
        f"{entry['name']}: {entry['locationOrLoadError'].get('message', '').strip().splitlines()[0]}"
        for entry in workspace["locationEntries"]
        if entry["locationOrLoadError"] and entry["locationOrLoadError"]["__typename"] == "PythonError"
    ]
    if failed:
        raise DagsterUnavailable("code location failed to load: " + "; ".join(failed))
    loading = [entry["name"] for entry in workspace["locationEntries"] if entry["loadStatus"] == "LOADING"]
    names = ", ".join(entry["name"] for entry in workspace["locationEntries"])
    return f"loading: {', '.join(loading)}" if loading else f"loaded: {names}"


async def collect_health(settings: JunctionSettings, dagster: DagsterClient) -> Health:
    services: dict[str, ServiceHealth] = {}

    async def run(name: str, check) -> None:
        services[name] = await _timed(check)

    async with anyio.create_task_group() as group:
        group.start_soon(run, "platform_store", lambda: check_platform_store(settings))
        group.start_soon(run, "dagster", lambda: check_dagster(dagster))
        group.start_soon(run, "daemon", lambda: check_daemon(dagster))
        group.start_soon(run, "code_locations", lambda: check_code_locations(dagster))
        if settings.redis_url:
            group.start_soon(run, "redis", lambda: check_redis(settings))
    if not settings.redis_url:
        services["redis"] = ServiceHealth(
            status="embedded", detail="JUNCTION_REDIS_URL unset: embedded backends"
        )
    overall = "ok" if all(s.status != "down" for s in services.values()) else "degraded"
    return Health(status=overall, versions=versions(), services=dict(sorted(services.items())))
