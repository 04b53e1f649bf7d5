"""API observability: per endpoint and per key — requests, status classes, latency percentiles.

Three views of the same observations:
- a bounded in-memory window (the last `window_s` seconds, at most `max_observations`) behind
  `GET /v1/analytics/requests`;
- per-minute buckets persisted to the platform store (`api_request_stats`, one row per minute, route,
  method, principal and gateway instance) for history across restarts and instances;
- Prometheus text at `GET /metrics`: this process's counters plus figures that live in other
  processes (runs by status, audit entries, keys, deliveries, every instance's persisted requests),
  read from the stores at scrape time rather than kept here.
"""

from __future__ import annotations

import itertools
import os
import socket
import statistics
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNMATCHED_ROUTE = "(unmatched)"
ANONYMOUS = "-"


def status_class(status: int) -> str:
    return f"{status // 100}xx"


def percentiles(latencies_ms: list[float]) -> tuple[float, float, float]:
    if not latencies_ms:
        return (0.0, 0.0, 0.0)
    if len(latencies_ms) == 1:
        return (latencies_ms[0],) * 3
    cuts = statistics.quantiles(latencies_ms, n=100, method="inclusive")
    return (cuts[49], cuts[94], cuts[98])


# One request: (at, route, method, principal, status, latency_ms). A plain tuple of atoms, which the
# garbage collector stops tracking: a window of 100,000 objects it walked on every full collection
# (tens of ms on the request path, benchmarks/proxy.py) is now none.
Observation = tuple[float, str, str, str, int, float]


@dataclass
class Bucket:
    latencies_ms: list[float] = field(default_factory=list)
    classes: dict[str, int] = field(default_factory=lambda: defaultdict(int))


@dataclass(frozen=True)
class RouteStats:
    route: str
    method: str
    principal: str
    requests: int
    status_classes: dict[str, int]
    p50_ms: float
    p95_ms: float
    p99_ms: float


_APP_NUMBERS = itertools.count(1)


class RequestStats:
    def __init__(self, window_s: float = 900, max_observations: int = 100_000):
        self.window_s = window_s
        # Unique per app, also for two apps built in one process within a second (a restart in tests).
        self.instance = f"{socket.gethostname()}:{os.getpid()}:{int(time.time())}:{next(_APP_NUMBERS)}"
        self._window: deque[Observation] = deque(maxlen=max_observations)
        self._buckets: dict[tuple[datetime, str, str, str], Bucket] = defaultdict(Bucket)
        self._lock = threading.Lock()
        # A registry per app, not the global one: tests build many apps in one process.
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "junction_gateway_requests",
            "Gateway requests handled by this process.",
            ["route", "method", "status_class", "principal"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "junction_gateway_request_duration_seconds",
            "Gateway request latency in this process.",
            ["route", "method"],
            registry=self.registry,
        )

    def observe(self, route: str, method: str, principal: str, status: int, latency_s: float) -> None:
        now = time.time()
        latency_ms = latency_s * 1000
        minute = datetime.fromtimestamp(now - now % 60, UTC)
        with self._lock:
            self._window.append((now, route, method, principal, status, latency_ms))
            bucket = self._buckets[(minute, route, method, principal)]
            bucket.latencies_ms.append(latency_ms)
            bucket.classes[status_class(status)] += 1
        self.requests.labels(route, method, status_class(status), principal).inc()
        self.latency.labels(route, method).observe(latency_s)

    def summary(self, window_s: float | None = None) -> list[RouteStats]:
        """Stats per route, method and principal over the last `window_s` seconds."""
        since = time.time() - (window_s or self.window_s)
        groups: dict[tuple[str, str, str], list[Observation]] = defaultdict(list)
        with self._lock:
            for observation in self._window:
                if observation[0] >= since:
                    groups[observation[1:4]].append(observation)
        stats = []
        for (route, method, principal), observations in sorted(groups.items()):
            classes: dict[str, int] = defaultdict(int)
            for _, _, _, _, status, _ in observations:
                classes[status_class(status)] += 1
            p50, p95, p99 = percentiles([latency_ms for *_, latency_ms in observations])
            stats.append(
                RouteStats(route, method, principal, len(observations), dict(classes), p50, p95, p99)
            )
        return stats

    def take_buckets(self, *, include_current: bool) -> dict[tuple[datetime, str, str, str], Bucket]:
        """Remove and return the finished minutes (and the current one when shutting down)."""
        now = time.time()
        current = datetime.fromtimestamp(now - now % 60, UTC)
        with self._lock:
            ready = {k: v for k, v in self._buckets.items() if include_current or k[0] < current}
            for key in ready:
                del self._buckets[key]
        return ready

    def flush(self, engine=None, *, include_current: bool = False) -> int:
        """Persist finished minute buckets; returns the rows written. Buckets survive a failed write."""
        from orchestration.store.db import session_scope
        from orchestration.store.models import ApiRequestStats

        buckets = self.take_buckets(include_current=include_current)
        if not buckets:
            return 0
        try:
            with session_scope(engine) as session:
                for (minute, route, method, principal), bucket in buckets.items():
                    p50, p95, p99 = percentiles(bucket.latencies_ms)
                    session.add(
                        ApiRequestStats(
                            minute=minute,
                            instance=self.instance,
                            route=route[:500],
                            method=method,
                            principal=principal[:200],
                            requests=len(bucket.latencies_ms),
                            status_2xx=bucket.classes.get("2xx", 0),
                            status_3xx=bucket.classes.get("3xx", 0),
                            status_4xx=bucket.classes.get("4xx", 0),
                            status_5xx=bucket.classes.get("5xx", 0),
                            latency_sum_ms=sum(bucket.latencies_ms),
                            latency_p50_ms=p50,
                            latency_p95_ms=p95,
                            latency_p99_ms=p99,
                        )
                    )
        except Exception:
            with self._lock:  # put them back (merging with anything recorded meanwhile) and retry later
                for key, bucket in buckets.items():
                    merged = self._buckets[key]
                    merged.latencies_ms.extend(bucket.latencies_ms)
                    for name, count in bucket.classes.items():
                        merged.classes[name] += count
            raise
        return len(buckets)


def route_template(scope: Scope, path: str, root: str) -> str:
    """The matched route as a template (`/v1/runs/{run_id}`), so labels stay few.

    Rebuilt from the path and its parameters: FastAPI's included routers do not expose the full
    template of the matched route in the scope.
    """
    if "endpoint" not in scope:
        return UNMATCHED_ROUTE
    if root and path.startswith(root):
        path = path[len(root) :]
    by_value = {str(value): name for name, value in scope.get("path_params", {}).items()}
    return "/".join(f"{{{by_value[part]}}}" if part in by_value else part for part in path.split("/"))


class RecordRequests:
    """ASGI middleware feeding `RequestStats` with each request's route template, principal, status, latency."""

    def __init__(self, app: ASGIApp, stats: RequestStats):
        self.app = app
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        # Routing rewrites root_path on the way down (included routers, mounts): keep the entry values.
        path, root = scope["path"], scope.get("root_path", "")

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            principal = scope.get("state", {}).get("principal_name", ANONYMOUS)
            latency_s = time.perf_counter() - started
            self.stats.observe(
                route_template(scope, path, root), scope["method"], principal, status, latency_s
            )
