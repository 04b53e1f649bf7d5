"""API analytics (window and history) and the Prometheus endpoint."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, Field
from sqlalchemy import func, select

from orchestration.gateway.api.streams import gateway_events
from orchestration.gateway.metrics import RouteStats
from orchestration.gateway.problems import problem_responses
from orchestration.gateway.security import requires
from orchestration.kernel.principals import Principal

router = APIRouter(tags=["analytics"])
metrics_router = APIRouter(tags=["platform"])

RUN_STATUSES = ["QUEUED", "NOT_STARTED", "STARTING", "STARTED", "SUCCESS", "FAILURE", "CANCELING", "CANCELED"]
_RUN_COUNT_FIELDS = "\n".join(
    f"  {status.lower()}: runsOrError(filter: {{statuses: [{status}]}}) {{ ... on Runs {{ count }} }}"
    for status in RUN_STATUSES
)
RUN_COUNTS_QUERY = f"query RunCounts {{\n{_RUN_COUNT_FIELDS}\n}}"


class RequestWindow(BaseModel):
    window_s: int
    instance: str
    stats: list[RouteStats]


class RequestHistoryRow(BaseModel):
    minute: datetime
    instance: str
    route: str
    method: str
    principal: str
    requests: int
    status_2xx: int
    status_3xx: int
    status_4xx: int
    status_5xx: int
    p50_ms: float
    p95_ms: float
    p99_ms: float


class RequestHistory(BaseModel):
    rows: list[RequestHistoryRow]


@router.get("/analytics/requests", response_model=RequestWindow, responses=problem_responses(401, 403, 422))
async def request_window(
    request: Request,
    _: Annotated[Principal, Depends(requires("analytics:read", read_only=True))],
    window_s: int = Query(
        default=900, ge=1, le=86_400, description="Look back this many seconds (in memory)."
    ),
):
    """This gateway process's requests per route, method and principal over a recent window."""
    stats = request.app.state.request_stats
    return RequestWindow(
        window_s=window_s,
        instance=stats.instance,
        stats=stats.summary(window_s),
    )


class RunPerformanceRow(BaseModel):
    run_id: str
    job: str
    status: str
    created_at: datetime
    queued_s: float | None = Field(description="From the run's creation to its start (the run queue).")
    duration_s: float | None
    rows: int | None = Field(description="Rows read by the run's pipelines (their staged assets' rows_read).")
    rows_per_s: float | None
    steps: dict[str, dict[str, Any]] = Field(description="Per step: seconds, attempts, status.")


class JobPerformance(BaseModel):
    runs: int
    failures: int
    duration_p50_s: float | None
    duration_p95_s: float | None
    queued_p50_s: float | None
    queued_p95_s: float | None
    rows_per_s_p50: float | None


class RunPerformancePage(BaseModel):
    since: datetime
    jobs: dict[str, JobPerformance]
    runs: list[RunPerformanceRow]


@router.get("/metrics/runs", response_model=RunPerformancePage, responses=problem_responses(401, 403, 422))
async def run_performance(
    request: Request,
    _: Annotated[Principal, Depends(requires("metrics:read", read_only=True))],
    job: str | None = Query(default=None, max_length=200),
    since: datetime | None = Query(default=None, description="Default: 24 hours ago."),
    limit: int = Query(default=1000, ge=1, le=10_000),
):
    """Finished runs' queue wait, duration, rows/s and step times (recorded by the `run_performance`
    sensor), newest first, with per-job percentiles over the runs returned."""
    from orchestration.store import get_engine
    from sensors.performance import job_summaries, run_series

    since = since or datetime.now(UTC) - timedelta(hours=24)
    if since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    engine = get_engine(request.app.state.settings.store_url)
    series = await anyio.to_thread.run_sync(lambda: run_series(engine, job=job, since=since, limit=limit))
    return RunPerformancePage(since=since, jobs=job_summaries(series), runs=series)


@router.get("/analytics/proxy", responses=problem_responses(401, 403))
async def proxy_analytics(
    request: Request, _: Annotated[Principal, Depends(requires("analytics:read", read_only=True))]
) -> dict:
    """The reverse proxy in this gateway process: per route its outcomes, consumers, latency
    percentiles (upstream and added by the gateway) and rate limits; per upstream its targets with
    balancer choices, latency, breaker state and transitions, health and ejections."""
    return request.app.state.proxy.status()


@router.get(
    "/analytics/requests/history",
    response_model=RequestHistory,
    responses=problem_responses(401, 403, 422, 503),
)
async def request_history(
    _: Annotated[Principal, Depends(requires("analytics:read", read_only=True))],
    since: datetime | None = Query(default=None, description="Default: 24 hours ago."),
    until: datetime | None = None,
    route: str | None = Query(default=None, max_length=500),
    limit: int = Query(default=1000, ge=1, le=10_000),
):
    """Persisted per-minute statistics of every gateway instance, newest first."""
    from orchestration.store.db import session_scope
    from orchestration.store.models import ApiRequestStats as Row

    def load() -> list[RequestHistoryRow]:
        start = since or datetime.now(UTC) - timedelta(days=1)
        statement = (
            select(Row).where(Row.minute >= start).order_by(Row.minute.desc(), Row.id.desc()).limit(limit)
        )
        if until is not None:
            statement = statement.where(Row.minute < until)
        if route is not None:
            statement = statement.where(Row.route == route)
        with session_scope() as session:
            return [
                RequestHistoryRow(
                    minute=row.minute,
                    instance=row.instance,
                    route=row.route,
                    method=row.method,
                    principal=row.principal,
                    requests=row.requests,
                    status_2xx=row.status_2xx,
                    status_3xx=row.status_3xx,
                    status_4xx=row.status_4xx,
                    status_5xx=row.status_5xx,
                    p50_ms=row.latency_p50_ms,
                    p95_ms=row.latency_p95_ms,
                    p99_ms=row.latency_p99_ms,
                )
                for row in session.scalars(statement)
            ]

    return RequestHistory(rows=await anyio.to_thread.run_sync(load))


def store_figures() -> dict:
    """Figures kept in the platform store by every process (read at scrape time)."""
    from orchestration.store.db import session_scope
    from orchestration.store.models import ApiKey, ApiRequestStats, AuditEntry, NotificationDelivery

    now = datetime.now(UTC)
    with session_scope() as session:
        audit_entries = session.scalar(select(func.count()).select_from(AuditEntry)) or 0
        keys = {"active": 0, "revoked": 0, "expired": 0}
        for revoked_at, expires_at in session.execute(select(ApiKey.revoked_at, ApiKey.expires_at)):
            if revoked_at is not None:
                keys["revoked"] += 1
            elif (
                expires_at is not None
                and (expires_at if expires_at.tzinfo else expires_at.replace(tzinfo=UTC)) <= now
            ):
                keys["expired"] += 1
            else:
                keys["active"] += 1
        deliveries = session.execute(
            select(NotificationDelivery.channel, NotificationDelivery.status, func.count()).group_by(
                NotificationDelivery.channel, NotificationDelivery.status
            )
        ).all()
        requests = session.execute(
            select(
                ApiRequestStats.route,
                ApiRequestStats.method,
                func.sum(ApiRequestStats.status_2xx),
                func.sum(ApiRequestStats.status_3xx),
                func.sum(ApiRequestStats.status_4xx),
                func.sum(ApiRequestStats.status_5xx),
            ).group_by(ApiRequestStats.route, ApiRequestStats.method)
        ).all()
    from resources.notifications.held import held_counts
    from sensors.performance import job_summaries, run_series

    performance = job_summaries(run_series(since=datetime.now(UTC) - timedelta(hours=24), limit=10_000))

    return {
        "audit_entries": audit_entries,
        "keys": keys,
        "deliveries": deliveries,
        "held": held_counts(),
        "performance": performance,
        "requests": requests,
    }


def stream_figures(events) -> tuple[bool, list]:
    """(backend reachable, statistics of every declared stream), read from the stream backend now."""
    from resources.event_stream import EventStreamUnavailable

    try:
        return True, [events.stats(definition.name) for definition in events.registry.list()]
    except EventStreamUnavailable:
        # The scrape still answers with every other figure; the gauge below says why streams are missing.
        return False, []


@metrics_router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"},
        **problem_responses(401, 403, 503),
    },
)
async def prometheus_metrics(
    request: Request, _: Annotated[Principal, Depends(requires("metrics:read", read_only=True))]
):
    """Prometheus text: this gateway's request metrics plus platform-wide figures from the stores."""
    runs = await request.app.state.dagster.graphql(RUN_COUNTS_QUERY)
    figures = await anyio.to_thread.run_sync(store_figures)
    streams_up, streams = await anyio.to_thread.run_sync(stream_figures, gateway_events(request).sync)

    scraped = CollectorRegistry(auto_describe=True)

    class StoreCollector:
        def collect(self):
            run_gauge = GaugeMetricFamily(
                "junction_dagster_runs", "Dagster runs by status (run storage).", labels=["status"]
            )
            for status in RUN_STATUSES:
                run_gauge.add_metric([status], runs[status.lower()].get("count", 0))
            yield run_gauge
            yield CounterMetricFamily(
                "junction_audit_entries", "Entries in the audit log.", value=figures["audit_entries"]
            )
            keys = GaugeMetricFamily("junction_api_keys", "API keys by state.", labels=["state"])
            for state, count in figures["keys"].items():
                keys.add_metric([state], count)
            yield keys
            deliveries = CounterMetricFamily(
                "junction_notification_deliveries",
                "Notification deliveries by channel and status.",
                labels=["channel", "status"],
            )
            for channel, status, count in figures["deliveries"]:
                deliveries.add_metric([channel, status], count)
            yield deliveries
            waiting = GaugeMetricFamily(
                "junction_notifications_held",
                "Messages a throttled or digesting channel holds for its next digest.",
                labels=["channel"],
            )
            for channel, count in figures["held"].items():
                waiting.add_metric([channel], count)
            yield waiting
            yield from performance_metric_families(figures["performance"])
            persisted = CounterMetricFamily(
                "junction_gateway_requests_persisted",
                "Gateway requests of every instance, from the persisted per-minute statistics.",
                labels=["route", "method", "status_class"],
            )
            for route, method, *classes in figures["requests"]:
                for name, count in zip(("2xx", "3xx", "4xx", "5xx"), classes, strict=True):
                    persisted.add_metric([route, method, name], count or 0)
            yield persisted
            yield GaugeMetricFamily(
                "junction_event_stream_up",
                "1 when the event stream backend answered this scrape.",
                value=int(streams_up),
            )
            yield from stream_metric_families(streams)
            yield from cache_metric_families()
            yield from proxy_metric_families(request.app.state.proxy.status())
            yield from live_metric_families(request.app.state)
            yield from subscription_metric_families(getattr(request.app.state, "dispatcher", None))

    scraped.register(StoreCollector())
    body = generate_latest(request.app.state.request_stats.registry) + generate_latest(scraped)
    return Response(content=body, media_type=CONTENT_TYPE_LATEST)


def performance_metric_families(performance: dict) -> list:
    """Per job, over the runs finished in the last 24 hours (the run_performance table)."""
    duration = GaugeMetricFamily(
        "junction_run_duration_seconds", "Run duration percentiles, last 24 h.", labels=["job", "quantile"]
    )
    queued = GaugeMetricFamily(
        "junction_run_queue_wait_seconds",
        "Run queue wait percentiles, last 24 h.",
        labels=["job", "quantile"],
    )
    finished = GaugeMetricFamily(
        "junction_runs_finished", "Runs finished in the last 24 h.", labels=["job", "outcome"]
    )
    for job, figures in performance.items():
        for quantile, suffix in (("0.5", "p50"), ("0.95", "p95")):
            if figures[f"duration_{suffix}_s"] is not None:
                duration.add_metric([job, quantile], figures[f"duration_{suffix}_s"])
            if figures[f"queued_{suffix}_s"] is not None:
                queued.add_metric([job, quantile], figures[f"queued_{suffix}_s"])
        finished.add_metric([job, "failure"], figures["failures"])
        finished.add_metric([job, "other"], figures["runs"] - figures["failures"])
    return [duration, queued, finished]


def live_metric_families(state) -> list:
    """WebSocket/SSE figures of this gateway process (none before its first live connection)."""
    hub, stats = getattr(state, "live_hub", None), getattr(state, "live_stats", None)
    if hub is None or stats is None:
        return []
    connections = GaugeMetricFamily(
        "junction_live_connections", "Open WebSocket connections.", value=stats.connections
    )
    opened = CounterMetricFamily(
        "junction_live_connections_opened", "WebSocket connections accepted.", value=stats.connections_opened
    )
    slow = CounterMetricFamily(
        "junction_live_slow_consumers",
        "Connections closed because they read too slowly (4008).",
        value=stats.slow_consumers,
    )
    subscriptions = GaugeMetricFamily(
        "junction_live_subscriptions", "Live subscriptions (WebSocket and SSE).", labels=["stream"]
    )
    delivered = CounterMetricFamily(
        "junction_live_events_delivered", "Events handed to live subscribers.", labels=["stream"]
    )
    read = CounterMetricFamily(
        "junction_live_events_read", "Events read by the stream's live reader.", labels=["stream"]
    )
    for stream in sorted(hub.streams()):
        figures = hub.stream_figures(stream)
        subscriptions.add_metric([stream], figures["subscriptions"])
        delivered.add_metric([stream], figures["events_delivered"])
        read.add_metric([stream], figures["events_read"])
    return [connections, opened, slow, subscriptions, delivered, read]


SUBSCRIPTION_COUNTERS = {
    "attempts": "Webhook delivery attempts.",
    "failures": "Webhook delivery attempts without a 2xx answer.",
    "deliveries": "Events delivered (acknowledged after a 2xx).",
    "dead_letters": "Events moved to the dead letter after their last attempt.",
    "filtered": "Events the subscription's filter dropped.",
    "redelivered": "Events claimed from a dispatcher that died (sent again).",
}
_FIGURE_OF = {"deliveries": "delivered", "dead_letters": "dead_lettered"}


def subscription_metric_families(dispatcher) -> list:
    """This gateway process's webhook deliveries per subscription (the groups' lag and pending are in
    `junction_stream_group_*`)."""
    if dispatcher is None:
        return []
    counters = {
        name: CounterMetricFamily(f"junction_subscription_{name}", help_text, labels=["subscription"])
        for name, help_text in SUBSCRIPTION_COUNTERS.items()
    }
    in_flight = GaugeMetricFamily(
        "junction_subscription_in_flight", "Events being delivered now.", labels=["subscription"]
    )
    latency = GaugeMetricFamily(
        "junction_subscription_latency_seconds",
        "Publish to acknowledged delivery, over the last deliveries.",
        labels=["subscription", "quantile"],
    )
    for subscription, figures in sorted(dispatcher.figures.items()):
        for name, family in counters.items():
            family.add_metric([subscription], getattr(figures, _FIGURE_OF.get(name, name)))
        in_flight.add_metric([subscription], figures.in_flight)
        for quantile in (0.5, 0.99):
            value = figures.quantile_ms(quantile)
            if value is not None:
                latency.add_metric([subscription, str(quantile)], value / 1000)
    return [*counters.values(), in_flight, latency]


def proxy_metric_families(status: dict) -> list:
    """The reverse proxy's figures in this gateway process: per route, target and limit."""
    requests = CounterMetricFamily(
        "junction_proxy_requests", "Proxied requests by route and outcome.", labels=["route", "outcome"]
    )
    latency = GaugeMetricFamily(
        "junction_proxy_latency_ms",
        "Latency percentiles of the newest requests: the upstream's and the gateway's own.",
        labels=["route", "part", "quantile"],
    )
    limited = CounterMetricFamily(
        "junction_proxy_rate_limited", "Requests refused by a rate limit.", labels=["route", "policy"]
    )
    chosen = CounterMetricFamily(
        "junction_proxy_target_chosen", "Balancer choices per target.", labels=["upstream", "target"]
    )
    breaker_open = GaugeMetricFamily(
        "junction_proxy_breaker_open", "1 while the target's breaker is open.", labels=["upstream", "target"]
    )
    transitions = CounterMetricFamily(
        "junction_proxy_breaker_transitions", "Breaker state changes.", labels=["upstream", "target"]
    )
    ejections = CounterMetricFamily(
        "junction_proxy_ejections", "Outlier ejections of the target.", labels=["upstream", "target"]
    )
    for route, figures in status["routes"].items():
        for outcome, count in figures["outcomes"].items():
            requests.add_metric([route, outcome], count)
        for part in ("upstream", "added"):
            for quantile, value in figures[f"{part}_latency_ms"].items():
                latency.add_metric([route, part, quantile], value)
        for limit in figures["rate_limits"]:
            limited.add_metric([route, limit["policy"]], limit["rejected"])
    for upstream in status["upstreams"]:
        for target in upstream["targets"]:
            labels = [upstream["name"], target["url"]]
            chosen.add_metric(labels, target["chosen"])
            breaker_open.add_metric(labels, int(target["breaker"]["state"] == "open"))
            transitions.add_metric(labels, target["breaker"]["transitions"])
            ejections.add_metric(labels, target["ejections"])
    return [requests, latency, limited, chosen, breaker_open, transitions, ejections]


def cache_metric_families() -> list:
    """This gateway process's cache figures per namespace and layer (only namespaces it has opened:
    a scrape opens nothing)."""
    from resources.cache.resource import opened_caches

    lookups = CounterMetricFamily(
        "junction_cache_lookups",
        "Cache lookups by namespace, layer and outcome.",
        labels=["namespace", "layer", "outcome"],
    )
    errors = CounterMetricFamily(
        "junction_cache_layer_errors",
        "Lookups and writes a layer did not answer (degraded).",
        labels=["namespace", "layer"],
    )
    loads = CounterMetricFamily(
        "junction_cache_loader_calls", "Loader calls on misses.", labels=["namespace"]
    )
    memory_bytes = GaugeMetricFamily(
        "junction_cache_memory_bytes", "Bytes in the memory layer.", labels=["namespace"]
    )
    for cache in opened_caches():
        figures = cache.to_json()
        for layer, numbers in figures["layers"].items():
            for outcome in ("hits", "misses", "corrupt"):
                lookups.add_metric([cache.name, layer, outcome], numbers[outcome])
            errors.add_metric([cache.name, layer], numbers["errors"])
        loads.add_metric([cache.name], figures["loader_calls"])
        if "memory" in figures["layers"]:
            memory_bytes.add_metric([cache.name], figures["layers"]["memory"]["bytes"])
    return [lookups, errors, loads, memory_bytes]


def stream_metric_families(streams: list) -> list:
    """Per-stream figures: retained and published events, dead-lettered, per-group pending and lag."""
    retained = GaugeMetricFamily("junction_stream_events_retained", "Events retained.", labels=["stream"])
    added = CounterMetricFamily(
        "junction_stream_events_published",
        "Events ever published (rate() gives the publish rate).",
        labels=["stream"],
    )
    dead = GaugeMetricFamily(
        "junction_stream_events_dead_lettered", "Events in the dead-letter stream.", labels=["stream"]
    )
    pending = GaugeMetricFamily(
        "junction_stream_group_pending", "Events delivered and not acknowledged.", labels=["stream", "group"]
    )
    lag = GaugeMetricFamily(
        "junction_stream_group_lag", "Events not yet delivered to the group.", labels=["stream", "group"]
    )
    rates = {
        window: GaugeMetricFamily(
            f"junction_stream_publish_rate_{window}",
            f"Events per second published over the last {label}.",
            labels=["stream"],
        )
        for window, label in (("1m", "minute"), ("5m", "five minutes"))
    }
    for stats in streams:
        rates["1m"].add_metric([stats.stream], stats.rate_1m)
        rates["5m"].add_metric([stats.stream], stats.rate_5m)
        retained.add_metric([stats.stream], stats.length)
        added.add_metric([stats.stream], stats.events_added)
        dead.add_metric([stats.stream], stats.dead_lettered)
        for group in stats.groups:
            pending.add_metric([stats.stream, group.name], group.pending)
            if group.lag is not None:
                lag.add_metric([stats.stream, group.name], group.lag)
    return [retained, added, dead, pending, lag, *rates.values()]
