"""The proxy's configuration compiled for the request path: route patterns as regular expressions,
most specific first, and each upstream's live targets with its balancer and breakers.

A `ProxyConfig` is immutable once built. A reload builds a new one and swaps the reference, so a
request (which reads the reference once) sees the old or the new configuration, never a mix. The
targets' live state (requests in flight, latency, breaker) carries over to the new configuration for
every target URL that stays in its upstream.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from orchestration.gateway.proxy.balancers import Balancer, RequestFacts, Target, open_balancer
from orchestration.gateway.proxy.config import (
    TEMPLATE_PARAMETER,
    RoutesFile,
    RouteSpec,
    UpstreamSpec,
    VersioningSpec,
)
from orchestration.gateway.proxy.cors import CorsPolicy
from orchestration.gateway.proxy.limiters import Limiter, RateLimitSpec, open_limiter
from orchestration.gateway.proxy.transforms import RouteTransform
from orchestration.kernel.breaker import CircuitBreaker, RetryBudget, Transition
from orchestration.kernel.spec_errors import SpecError
from orchestration.kernel.times import duration_seconds


@dataclass
class Upstream:
    name: str
    spec: UpstreamSpec
    targets: list[Target]
    balancer: Balancer
    connect_timeout_s: float
    read_timeout_s: float
    total_timeout_s: float | None
    retry_budget: RetryBudget

    def pick(self, facts: RequestFacts, exclude: set[Target]) -> Target | None:
        """A target for this request that its breaker lets through (None: none can take it now)."""
        now = time.monotonic()
        candidates = [target for target in self.targets if target not in exclude and target.available(now)]
        while candidates:
            target = self.balancer.choose(candidates, facts)
            if target.breaker.allow():
                return target
            candidates.remove(target)  # its half-open probes are all in flight
        return None

    def retry_after_s(self) -> float:
        """When a target may take traffic again, for a 503's Retry-After (at least 1 s)."""
        now = time.monotonic()
        waits = [max(target.breaker.retry_after_s(), target.ejected_until - now) for target in self.targets]
        return max(1.0, min(waits, default=1.0))

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "algorithm": self.spec.algorithm,
            "targets": [target.to_json() for target in self.targets],
            "retry_budget": self.retry_budget.to_json(),
        }


@dataclass(frozen=True)
class Route:
    name: str
    spec: RouteSpec
    pattern: re.Pattern[str]
    literal_length: int  # characters of the path before its first parameter: the most specific first
    methods: frozenset[str] | None
    hosts: frozenset[str] | None
    headers: tuple[tuple[str, str], ...]  # lowercase names
    scopes: tuple[str, ...]  # all needed; () for an open route
    limiters: tuple[Limiter, ...] = ()
    versions: Versions | None = None
    transform: RouteTransform | None = None
    cors: CorsPolicy | None = None
    answers: Any = None  # the AnswerCache of `cache`
    # Per upstream name: the route's timeouts over the upstream's (aiohttp.ClientTimeout, total s).
    timeouts: dict[str, tuple[Any, float | None]] = field(default_factory=dict, compare=False)

    def retries(self, upstream: Upstream) -> int:
        return upstream.spec.retries if self.spec.retries is None else self.spec.retries

    def client_timeout(self, upstream: Upstream) -> tuple[Any, float | None]:
        """(the aiohttp.ClientTimeout for a request to `upstream`, or None for its session's; the
        total seconds until the answer's headers, or None)."""
        found = self.timeouts.get(upstream.name)
        if found is None:
            own = self.spec.timeouts
            if own is None or (own.connect is None and own.read is None):
                client_timeout = None
            else:
                import aiohttp

                client_timeout = aiohttp.ClientTimeout(
                    sock_connect=duration_seconds(own.connect) if own.connect else upstream.connect_timeout_s,
                    sock_read=duration_seconds(own.read) if own.read else upstream.read_timeout_s,
                )
            total = duration_seconds(own.total) if own is not None and own.total else upstream.total_timeout_s
            found = self.timeouts[upstream.name] = (client_timeout, total)
        return found

    def upstream_path(self, path: str, match: re.Match[str], rest: str) -> str:
        """The path asked of the target: `rest` is what follows the route's path (a path version
        taken out)."""
        if self.spec.rewrite is not None:
            parameters = {name: value for name, value in match.groupdict().items() if name != "rest"}
            return TEMPLATE_PARAMETER.sub(lambda found: parameters[found.group(1)], self.spec.rewrite) + rest
        if self.spec.strip_path:
            return rest or "/"
        return path


@dataclass(frozen=True)
class RouteMatch:
    route: Route
    upstream_path: str
    upstream: str | None  # None: `problem` says why (a version the route does not have)
    version: str | None = None
    response_headers: tuple[tuple[bytes, bytes], ...] = ()  # Deprecation, Sunset of an old version
    problem: str | None = None


_MEDIA_VERSION = re.compile(r"(?:vnd\.[^;,+\s]+?\.(v?[A-Za-z0-9_-]+)\+|version=\s*([A-Za-z0-9._-]+))")


@dataclass(frozen=True)
class Versions:
    """A route's versions compiled: which one a request asks for, its upstream and headers."""

    spec: VersioningSpec
    headers_of: dict[str, tuple[tuple[bytes, bytes], ...]]

    @classmethod
    def compile(cls, spec: VersioningSpec) -> Versions:
        headers_of = {}
        for name, version in spec.versions.items():
            headers: list[tuple[bytes, bytes]] = []
            if version.deprecated is True:
                headers.append((b"deprecation", b"true"))
            elif version.deprecated:
                moment = datetime.combine(version.deprecated, datetime.min.time(), UTC)
                headers.append((b"deprecation", f"@{int(moment.timestamp())}".encode()))  # RFC 9745
            if version.sunset is not None:
                moment = datetime.combine(version.sunset, datetime.min.time(), UTC)
                headers.append((b"sunset", format_datetime(moment, usegmt=True).encode()))  # RFC 8594
            headers_of[name] = tuple(headers)
        return cls(spec, headers_of)

    def _known(self, asked: str | None) -> str | None:
        if asked is None:
            return None
        if asked in self.spec.versions:
            return asked
        prefixed = f"v{asked}"
        return prefixed if prefixed in self.spec.versions else None

    def resolve(self, rest: str, headers: dict[str, str]) -> tuple[str | None, str, str | None]:
        """(version, the rest of the path without a path version, the version asked when unknown)."""
        asked: str | None = None
        if self.spec.by == "path":
            segment = rest.split("/", 2)[1] if rest.startswith("/") and len(rest) > 1 else ""
            version = self._known(segment) if segment else None
            if version is not None:
                return version, rest[len(segment) + 1 :], None
        elif self.spec.by == "header":
            asked = headers.get(self.spec.header.lower())
        else:
            found = _MEDIA_VERSION.search(headers.get("accept", ""))
            asked = (found.group(1) or found.group(2)) if found else None
        version = self._known(asked)
        if version is not None:
            return version, rest, None
        if asked is None and self.spec.default is not None:
            return self.spec.default, rest, None
        return None, rest, asked


def _pattern(path: str) -> tuple[re.Pattern[str], int]:
    """`/orders/{id}` -> `^/orders/(?P<id>[^/]+)(?P<rest>/.*)?$`: a template's parameters are one
    segment each, and whatever follows the route's path is kept as `rest`."""
    path = path.rstrip("/") or ""
    parts, position = [], 0
    for found in TEMPLATE_PARAMETER.finditer(path):
        parts.append(re.escape(path[position : found.start()]))
        parts.append(f"(?P<{found.group(1)}>[^/]+)")
        position = found.end()
    parts.append(re.escape(path[position:]))
    first = TEMPLATE_PARAMETER.search(path)
    return re.compile("^" + "".join(parts) + r"(?P<rest>/.*)?$"), first.start() if first else len(path)


@dataclass
class ProxyConfig:
    routes: list[Route] = field(default_factory=list)
    upstreams: dict[str, Upstream] = field(default_factory=dict)
    source: str | None = None  # the file it came from
    loaded_at: float = field(default_factory=time.time)

    def match(self, method: str, path: str, host: str | None, headers: dict[str, str]) -> RouteMatch | None:
        """The most specific route the request fits (path, method, host, headers), or None."""
        for route in self.routes:
            found = route.pattern.match(path)
            if found is None:
                continue
            if route.methods is not None and method not in route.methods:
                continue
            if route.hosts is not None and (host or "").split(":")[0] not in route.hosts:
                continue
            if any(headers.get(name) != value for name, value in route.headers):
                continue
            rest = found.group("rest") or ""
            if route.versions is None:
                return RouteMatch(route, route.upstream_path(path, found, rest), route.spec.upstream)
            version, rest, asked = route.versions.resolve(rest, headers)
            if version is None:
                declared = ", ".join(route.versions.spec.versions)
                what = f"no version {asked!r}" if asked else "no version asked"
                return RouteMatch(
                    route, path, None, problem=f"route {route.name}: {what} (versions: {declared})"
                )
            return RouteMatch(
                route,
                route.upstream_path(path, found, rest),
                route.versions.spec.versions[version].upstream,
                version,
                route.versions.headers_of[version],
            )
        return None


def compile_config(
    declared: RoutesFile,
    previous: ProxyConfig | None = None,
    on_transition: Any = None,
    source: str | None = None,
    redis_url: str | None = None,
    open_answers: Any = None,
) -> ProxyConfig:
    """`declared` compiled; targets of `previous` whose URL stays in the same upstream, and limits
    declared the same on the same route, keep their state. `redis_url`: where shared limits count;
    `open_answers(AnswerCacheSpec)`: a route's answer cache (KeyError naming an unknown namespace)."""
    kept: dict[tuple[str, str], Target] = {}
    kept_limiters: dict[tuple[str, RateLimitSpec], Limiter] = {}
    kept_budgets: dict[tuple[str, Any], RetryBudget] = {}
    if previous is not None:
        for upstream in previous.upstreams.values():
            kept_budgets[(upstream.name, upstream.spec.retry_budget)] = upstream.retry_budget
            for target in upstream.targets:
                kept[(upstream.name, target.url)] = target
        for route in previous.routes:
            for limiter in route.limiters:
                kept_limiters[(route.name, limiter.spec)] = limiter
    for name, spec in declared.routes.items():
        for index, limit in enumerate(spec.rate_limits):
            if limit.shared and not redis_url:
                raise SpecError.at(
                    ("routes", name, "rate_limits", index, "shared"),
                    "a shared limit counts in Redis: set JUNCTION_REDIS_URL",
                    source,
                )
    upstreams = {}
    for name, spec in declared.upstreams.items():
        policy = spec.breaker.policy()
        targets = []
        for declared_target in spec.targets:
            target = kept.get((name, declared_target.url))
            if target is None or target.breaker.policy != policy:
                breaker = CircuitBreaker(f"{name} {declared_target.url}", policy, on_transition=on_transition)
                target = Target(
                    declared_target.url.rstrip("/"), declared_target.weight, declared_target.region, breaker
                )
            else:
                target.weight, target.region = declared_target.weight, declared_target.region
            targets.append(target)
        upstreams[name] = Upstream(
            name,
            spec,
            targets,
            open_balancer(targets, spec),
            duration_seconds(spec.timeouts.connect),
            duration_seconds(spec.timeouts.read),
            duration_seconds(spec.timeouts.total) if spec.timeouts.total else None,
            kept_budgets.get((name, spec.retry_budget)) or RetryBudget(spec.retry_budget),
        )
    routes = []
    for name, spec in declared.routes.items():
        pattern, literal_length = _pattern(spec.path)
        scopes = () if spec.auth.type == "open" else tuple(spec.auth.scopes or [f"proxy:call:{name}"])
        # An adaptive limit follows the route's (primary) upstream.
        followed = upstreams[spec.primary_upstream]
        limiters = tuple(
            kept_limiters.get((name, limit)) or open_limiter(name, limit, redis_url, followed)
            for limit in spec.rate_limits
        )
        answers = None
        if spec.cache is not None:
            if open_answers is None:
                raise SpecError.at(("routes", name, "cache"), "this proxy keeps no answers", source)
            try:
                answers = open_answers(spec.cache)
            except KeyError as exc:
                raise SpecError.at(("routes", name, "cache", "namespace"), str(exc.args[0]), source) from None
        routes.append(
            Route(
                name,
                spec,
                pattern,
                literal_length,
                frozenset(spec.methods) if spec.methods else None,
                frozenset(host.lower() for host in spec.hosts) if spec.hosts else None,
                tuple((header.lower(), value) for header, value in spec.headers.items()),
                scopes,
                limiters,
                Versions.compile(spec.versions) if spec.versions is not None else None,
                RouteTransform(name, spec.transform) if spec.transform is not None else None,
                CorsPolicy.compile(spec.cors, spec.methods) if spec.cors is not None else None,
                answers,
            )
        )
    # Most specific first: the longer literal path, then the route with more conditions.
    routes.sort(
        key=lambda route: (
            -route.literal_length,
            -(route.methods is not None) - (route.hosts is not None) - len(route.headers),
        )
    )
    return ProxyConfig(routes, upstreams, source)


def transition_logger(logger: Any):
    def log(transition: Transition) -> None:
        logger.warning(
            "breaker %s: %s -> %s (%s)", transition.breaker, transition.old, transition.new, transition.reason
        )

    return log
