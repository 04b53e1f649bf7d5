"""The reverse proxy's declarations: upstreams (targets and how to spread over them) and routes
(which requests go to which upstream), from `resources/routes.yaml` (setting JUNCTION_ROUTES_FILE).

```yaml
upstreams:
  orders:
    algorithm: weighted_round_robin      # round_robin | weighted_round_robin | least_connections |
                                         # least_response_time | consistent_hash | geo
    targets:
      - {url: "http://10.0.0.5:8080", weight: 3, region: eu-west}
      - {url: "http://10.0.0.6:8080", weight: 1, region: us-east}
    hash_on: {by: header, name: X-Customer-Id}          # consistent_hash: header|cookie|query|ip|path
    geo:                                                 # geo: the client's region, then the fallbacks
      header: X-Client-Region                            # set by a trusted edge
      networks: {"10.1.0.0/16": eu-west}                 # else the client address's network
      fallback: [eu-west, us-east]
    breaker: {error_ratio: 0.5, min_requests: 20, window: 10s, open_for: 5s}   # per target
    timeouts: {connect: 2s, read: 30s, total: 60s}      # total: until the headers, retries included
    retries: 1                                           # on another target, idempotent methods only
    retry_budget: {ratio: 0.2, min_per_second: 3, window: 10s}   # retries <= 20% of the requests
    health:
      active: {path: /health, interval: 5s, timeout: 1s, healthy: 2, unhealthy: 3}   # probes
      passive: {consecutive_failures: 5, eject_for: 10s, max_eject_for: 5m}        # outlier ejection
routes:
  orders-v1:
    path: /orders                       # under /gateway/proxy; a prefix, or a template /orders/{id}
    methods: [GET, POST]
    hosts: [api.example.com]            # the Host header (default: any)
    headers: {X-Tenant: acme}           # headers that must be present with these values
    strip_path: true                    # /gateway/proxy/orders/7 -> <target>/7 (false: /orders/7)
    auth: {type: key, scopes: ["proxy:call:orders"]}   # default: a key with proxy:call:<route>; or open
    rewrite: /v1/orders/{id}            # or the upstream path from the template's parameters
    rate_limits: [{algorithm: token_bucket, rate: 100, per: 1s, by: [consumer]}]   # limiters.py
    transform: {request: {headers: {add: {X-Source: junction}}}}                   # transforms.py
    timeouts: {read: 5s}                # replacing the upstream's; and retries: 0
    max_body_bytes: 1048576             # a larger request is 413
    cors: {origins: ["https://app.example.com"], credentials: true}
    cache: {namespace: http, ttl: 30s}  # GET/HEAD answers, revalidated with ETag/Last-Modified
    openapi: {url: /openapi.json}       # or {file: orders.yaml}: merged into /gateway/openapi.json
  customers:
    path: /customers
    versions:                           # instead of upstream: one API in several versions
      by: path                          # /customers/v1/... | header (API-Version) | media_type (Accept)
      default: v2
      versions:
        v1: {upstream: customers-v1, deprecated: 2026-01-01, sunset: 2026-12-31}
        v2: {upstream: customers-v2}
    upstream: orders
```

Everything is checked when the file is read (the kernel's error format: file, field, reason) and
compiled once (`routing.py`): no request parses configuration.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import date
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from orchestration.gateway.proxy.limiters import RateLimitSpec
from orchestration.gateway.proxy.transforms import TransformSpec
from orchestration.kernel.breaker import BreakerSpec, RetryBudgetSpec
from orchestration.kernel.spec_errors import SpecError, read_yaml, validate_spec
from orchestration.kernel.times import DurationText
from resources.cache.http_answers import AnswerCacheSpec

Algorithm = Literal[
    "round_robin",
    "weighted_round_robin",
    "least_connections",
    "least_response_time",
    "consistent_hash",
    "geo",
]
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
NAME = r"^[a-z][a-z0-9_-]*$"
TEMPLATE_PARAMETER = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TargetSpec(_Strict):
    url: str = Field(pattern=r"^https?://[^/]+", description="Scheme, host and port; a path is a prefix")
    weight: int = Field(default=1, ge=1, le=1000)
    region: str | None = Field(default=None, description="For geo routing")


class HashOnSpec(_Strict):
    by: Literal["header", "cookie", "query", "ip", "path"]
    name: str | None = Field(default=None, description="The header, cookie or query parameter")

    @model_validator(mode="after")
    def _named(self) -> HashOnSpec:
        if self.by in ("header", "cookie", "query") and not self.name:
            raise ValueError(f"hashing on a {self.by} needs its name")
        if self.by in ("ip", "path") and self.name:
            raise ValueError(f"hashing on the {self.by} takes no name")
        return self


class GeoSpec(_Strict):
    header: str | None = Field(default="X-Client-Region", description="Set by a trusted edge")
    networks: dict[str, str] = Field(default_factory=dict, description="CIDR -> region of the client")
    fallback: list[str] = Field(
        default_factory=list, description="Regions tried, in order, after the client's"
    )

    @field_validator("networks")
    @classmethod
    def _cidrs(cls, networks: dict[str, str]) -> dict[str, str]:
        for cidr in networks:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not a network (e.g. 10.1.0.0/16)") from None
        return networks


class TimeoutsSpec(_Strict):
    connect: DurationText = "2s"
    read: DurationText = Field(default="30s", description="Between two reads of the answer")
    total: DurationText | None = Field(
        default=None, description="Until the answer's headers, every attempt included (default: none)"
    )


class RouteTimeoutsSpec(_Strict):
    """A route's own timeouts, each replacing its upstream's."""

    connect: DurationText | None = None
    read: DurationText | None = None
    total: DurationText | None = None


class CorsSpec(_Strict):
    """Browsers on other origins may call the route (preflights answered by the gateway, before auth)."""

    origins: list[str] = Field(min_length=1, description='Exact origins (https://app.example.com), or "*"')
    methods: list[str] | None = Field(default=None, description="Default: the route's methods, else all")
    headers: list[str] = Field(
        default_factory=lambda: ["Authorization", "Content-Type", "X-API-Key"],
        description="Request headers a page may send",
    )
    expose_headers: list[str] = Field(default_factory=list, description="Answer headers a page may read")
    credentials: bool = Field(default=False, description="Cookies and credentials allowed")
    max_age: DurationText = Field(default="10m", description="How long a browser keeps a preflight")

    @model_validator(mode="after")
    def _no_wildcard_with_credentials(self) -> CorsSpec:
        if self.credentials and "*" in self.origins:
            raise ValueError('credentials: browsers refuse them with origins "*": list the origins')
        return self


class ActiveHealthSpec(_Strict):
    """Probes of each target: `unhealthy` failures in a row take it out, `healthy` successes bring it back."""

    path: str = Field(default="/health", pattern=r"^/")
    interval: DurationText = "5s"
    timeout: DurationText = "1s"
    healthy: int = Field(default=2, ge=1, description="Successes in a row that bring a target back")
    unhealthy: int = Field(default=3, ge=1, description="Failures in a row that take it out")
    expect: list[Annotated[int, Field(ge=100, le=599)]] = Field(
        default_factory=list, description="Statuses that pass (default: 2xx and 3xx)"
    )


class PassiveHealthSpec(_Strict):
    """Outlier ejection (Envoy's): `consecutive_failures` 5xx, timeouts or connection errors in a row
    eject a target for `eject_for`, doubled on each ejection that follows, up to `max_eject_for`."""

    consecutive_failures: int = Field(default=5, ge=1)
    eject_for: DurationText = "10s"
    max_eject_for: DurationText = "5m"


class HealthSpec(_Strict):
    active: ActiveHealthSpec | None = None
    passive: PassiveHealthSpec | None = Field(default_factory=PassiveHealthSpec)


class UpstreamSpec(_Strict):
    targets: list[TargetSpec] = Field(min_length=1)
    algorithm: Algorithm = "round_robin"
    hash_on: HashOnSpec | None = None
    geo: GeoSpec | None = None
    breaker: BreakerSpec = Field(default_factory=BreakerSpec, description="Per target")
    timeouts: TimeoutsSpec = Field(default_factory=TimeoutsSpec)
    health: HealthSpec = Field(default_factory=HealthSpec)
    retries: int = Field(default=1, ge=0, le=5, description="On another target, idempotent methods only")
    retry_budget: RetryBudgetSpec = Field(
        default_factory=RetryBudgetSpec, description="Retries stay this share of the requests"
    )

    @model_validator(mode="after")
    def _algorithm_needs(self) -> UpstreamSpec:
        if self.algorithm == "consistent_hash" and self.hash_on is None:
            raise ValueError("consistent_hash needs hash_on: {by: header|cookie|query|ip|path, name}")
        if self.algorithm == "geo":
            if self.geo is None:
                raise ValueError("geo needs geo: {header, networks, fallback}")
            unplaced = [target.url for target in self.targets if target.region is None]
            if unplaced:
                raise ValueError(f"geo: every target needs a region ({', '.join(unplaced)} has none)")
            regions = {target.region for target in self.targets}
            unknown = [region for region in self.geo.fallback if region not in regions]
            if unknown:
                raise ValueError(f"geo.fallback: no target is in {', '.join(unknown)}")
        urls = [target.url for target in self.targets]
        if len(set(urls)) != len(urls):
            raise ValueError("targets: a URL is listed twice (give it a weight instead)")
        return self


class RouteAuthSpec(_Strict):
    """Who may call a route: `key` (an API key or JWT whose scopes cover `scopes`; default
    `proxy:call:<route>`) or `open` (anyone)."""

    type: Literal["key", "open"] = "key"
    scopes: list[str] | None = Field(default=None, description="Each needed (default: proxy:call:<route>)")

    @field_validator("scopes")
    @classmethod
    def _scopes_parse(cls, scopes: list[str] | None) -> list[str] | None:
        from orchestration.kernel.principals import ScopeError, parse_scope

        for scope in scopes or ():
            try:
                parse_scope(scope)
            except ScopeError as exc:
                raise ValueError(str(exc)) from None
        return scopes


class VersionSpec(_Strict):
    upstream: str
    deprecated: bool | date = Field(default=False, description="true, or the day it was deprecated")
    sunset: date | None = Field(default=None, description="The day it goes away (the Sunset header)")


class VersioningSpec(_Strict):
    """One API in several versions, each to its own upstream; old ones answer with `Deprecation` and
    `Sunset` headers."""

    by: Literal["path", "header", "media_type"] = Field(
        default="path",
        description="path: /orders/v2/...; header: API-Version: 2; media_type: Accept: "
        "application/vnd.example.v2+json (or ;version=2)",
    )
    header: str = "API-Version"
    default: str | None = Field(default=None, description="When the request names none (else 404)")
    versions: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]+$")], VersionSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _default_declared(self) -> VersioningSpec:
        if self.default is not None and self.default not in self.versions:
            raise ValueError(
                f"default: {self.default!r} is not one of the versions ({', '.join(self.versions)})"
            )
        return self


class OpenApiSourceSpec(_Strict):
    """Where the upstream's own OpenAPI document is (merged into the gateway's, `openapi.py`)."""

    url: str | None = Field(
        default=None, description="http(s)://..., or a path asked of the upstream's targets (/openapi.json)"
    )
    file: str | None = Field(default=None, description="JSON or YAML, relative to the routes file's folder")

    @model_validator(mode="after")
    def _one_source(self) -> OpenApiSourceSpec:
        if (self.url is None) == (self.file is None):
            raise ValueError("give one of url or file")
        if self.url is not None and not re.match(r"^(https?://[^/]+)?/", self.url):
            raise ValueError(f"url: {self.url!r} is neither http(s)://... nor a path starting with /")
        return self


class RouteSpec(_Strict):
    path: str = Field(pattern=r"^/", description="A prefix (/orders) or a template (/orders/{id})")
    upstream: str | None = Field(default=None, description="Where it goes (or per version: versions)")
    versions: VersioningSpec | None = None
    transform: TransformSpec | None = None
    auth: RouteAuthSpec = Field(default_factory=RouteAuthSpec)
    methods: list[Annotated[str, Field(pattern=r"^[A-Z]+$")]] | None = None
    hosts: list[str] | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    strip_path: bool = True
    rewrite: str | None = Field(
        default=None, pattern=r"^/", description="The upstream path; {params} of path"
    )
    rate_limits: list[RateLimitSpec] = Field(default_factory=list, description="Each applies (limiters.py)")
    timeouts: RouteTimeoutsSpec | None = Field(default=None, description="Replacing the upstream's")
    retries: int | None = Field(default=None, ge=0, le=5, description="Replacing the upstream's")
    max_body_bytes: int | None = Field(
        default=None, ge=0, description="A larger request body is 413 (default: the gateway's limit)"
    )
    cors: CorsSpec | None = None
    cache: AnswerCacheSpec | None = Field(
        default=None, description="GET and HEAD answers kept in a cache namespace (caches.yaml)"
    )
    openapi: OpenApiSourceSpec | None = Field(
        default=None, description="The upstream's OpenAPI document, merged under the route's path"
    )

    @property
    def primary_upstream(self) -> str:
        """Its upstream; with versions, the default version's (else the first's)."""
        if self.versions is None:
            return self.upstream
        return self.versions.versions[self.versions.default or next(iter(self.versions.versions))].upstream

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: list[str] | None) -> list[str] | None:
        unknown = [method for method in methods or () if method not in METHODS]
        if unknown:
            raise ValueError(f"unknown method {', '.join(unknown)} (one of {', '.join(METHODS)})")
        return methods

    @model_validator(mode="after")
    def _rewrite_parameters(self) -> RouteSpec:
        if (self.upstream is None) == (self.versions is None):
            raise ValueError("give one of upstream or versions")
        if self.rewrite is not None:
            known = set(TEMPLATE_PARAMETER.findall(self.path))
            unknown = [name for name in TEMPLATE_PARAMETER.findall(self.rewrite) if name not in known]
            if unknown:
                raise ValueError(f"rewrite: {{{unknown[0]}}} is not a parameter of path {self.path!r}")
        return self


class RoutesFile(_Strict):
    SPEC_SHAPE: ClassVar[str] = "a routes file is a mapping with upstreams and routes"

    upstreams: dict[Annotated[str, Field(pattern=NAME)], UpstreamSpec] = Field(default_factory=dict)
    routes: dict[Annotated[str, Field(pattern=NAME)], RouteSpec] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _references(self) -> RoutesFile:
        known = ", ".join(sorted(self.upstreams)) or "none declared"
        for name, route in self.routes.items():
            named = (
                [(("routes", name, "upstream"), route.upstream)]
                if route.versions is None
                else [
                    (("routes", name, "versions", "versions", version, "upstream"), declared.upstream)
                    for version, declared in route.versions.versions.items()
                ]
            )
            for location, upstream in named:
                if upstream not in self.upstreams:
                    raise SpecError.at(location, f"no upstream {upstream!r} (upstreams: {known})")
        return self


def load_routes_file(path: str | Path | None = None) -> RoutesFile:
    """`path` (default: the setting) validated; a missing file declares nothing."""
    if path is None:
        from orchestration.settings import get_settings

        path = get_settings().routes_file
    path = Path(path)
    if not path.exists():
        return RoutesFile()
    data = read_yaml(path)
    return validate_spec({} if data is None else data, RoutesFile, path)
