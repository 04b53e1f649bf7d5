"""Load balancing: which target of an upstream serves a request. One class per algorithm behind one
interface (`Balancer.choose`), as Envoy's and Kong's balancers are.

The proxy runs on one event loop, so the balancers' counters need no locks. Each `choose` sees only
the targets that may take traffic now (not ejected, breaker not refusing) and the request's facts;
it never blocks and never parses configuration.

- `round_robin`: each available target in turn.
- `weighted_round_robin`: nginx's smooth weighted round robin (weights 5, 1, 1 give a a b a c a a,
  not a a a a a b c).
- `least_connections`: the fewest requests in flight per unit of weight; ties in turn.
- `least_response_time`: peak EWMA of latency times the requests in flight (+1), as Finagle's and
  Envoy's: a latency above the average is taken at once, one below decays in with a 10 s time
  constant; a target with no sample yet is tried first.
- `consistent_hash`: a ketama ring (uhashring's, its points shared by weight) over a header, cookie,
  query parameter, the client's address or the path; a request whose key is missing goes round
  robin. A target that leaves moves only its own keys: the next target on the ring takes them.
- `geo`: the client's region (a trusted header set by an edge, else the client address's network),
  then the declared fallback regions in order, then any other; within a region, smooth weighted round
  robin.
"""

from __future__ import annotations

import ipaddress
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from typing import Any

from orchestration.gateway.proxy.config import UpstreamSpec
from orchestration.kernel.breaker import CircuitBreaker

EWMA_DECAY_S = 10.0  # the time constant of least_response_time's moving average


@dataclass(eq=False)
class Target:
    """One target's live state (kept across config reloads while its URL stays in the upstream)."""

    url: str
    weight: int
    region: str | None
    breaker: CircuitBreaker
    in_flight: int = 0
    ewma_s: float = 0.0
    samples: int = 0
    last_sample_at: float = 0.0
    chosen: int = 0  # how often a balancer picked it
    current_weight: int = 0  # smooth weighted round robin's running weight
    ejected_until: float = 0.0  # monotonic seconds: passive health (outlier ejection)
    ejections: int = 0
    consecutive_failures: int = 0  # answers, for passive health
    healthy: bool = True  # active health: probes
    probes_passed: int = 0  # in a row
    probes_failed: int = 0  # in a row

    def started(self) -> None:
        self.in_flight += 1
        self.chosen += 1

    def finished(self, latency_s: float) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        now = time.monotonic()
        if self.samples == 0 or latency_s > self.ewma_s:
            self.ewma_s = latency_s  # peak: a slow answer counts in full at once
        else:
            decay = math.exp(-(now - self.last_sample_at) / EWMA_DECAY_S)
            self.ewma_s = self.ewma_s * decay + latency_s * (1 - decay)
        self.samples += 1
        self.last_sample_at = now

    def available(self, now: float) -> bool:
        """Whether it may take traffic: not ejected, and its breaker closed or due for a probe."""
        if not self.healthy or self.ejected_until > now:
            return False
        return self.breaker.state == "closed" or self.breaker.retry_after_s() == 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "weight": self.weight,
            "region": self.region,
            "in_flight": self.in_flight,
            "chosen": self.chosen,
            "latency_ewma_ms": round(self.ewma_s * 1000, 3),
            "breaker": self.breaker.to_json(),
            "ejected": self.ejected_until > time.monotonic(),
            "ejections": self.ejections,
            "healthy": self.healthy,
        }


@dataclass
class RequestFacts:
    """What a balancer may look at (lowercase header names)."""

    path: str
    headers: Mapping[str, str]
    query: Mapping[str, str]
    client_ip: str | None
    _cookies: dict[str, str] | None = field(default=None, repr=False)

    def cookie(self, name: str) -> str | None:
        if self._cookies is None:
            parsed = SimpleCookie()
            try:
                parsed.load(self.headers.get("cookie", ""))
            except Exception:  # noqa: BLE001 - a malformed Cookie header holds no usable key
                parsed = SimpleCookie()
            self._cookies = {name: morsel.value for name, morsel in parsed.items()}
        return self._cookies.get(name)


class Balancer(ABC):
    def __init__(self, targets: list[Target], spec: UpstreamSpec):
        self.targets = targets
        self.spec = spec

    @abstractmethod
    def choose(self, candidates: list[Target], facts: RequestFacts) -> Target:
        """One of `candidates` (never empty) for this request."""


class RoundRobin(Balancer):
    def __init__(self, targets: list[Target], spec: UpstreamSpec):
        super().__init__(targets, spec)
        self._next = 0

    def choose(self, candidates: list[Target], facts: RequestFacts) -> Target:
        self._next += 1
        return candidates[self._next % len(candidates)]


def smooth_weighted(candidates: list[Target]) -> Target:
    """nginx's smooth weighted round robin over `candidates` (their `current_weight` is the state)."""
    total = 0
    best: Target | None = None
    for target in candidates:
        target.current_weight += target.weight
        total += target.weight
        if best is None or target.current_weight > best.current_weight:
            best = target
    assert best is not None
    best.current_weight -= total
    return best


class WeightedRoundRobin(Balancer):
    def choose(self, candidates: list[Target], facts: RequestFacts) -> Target:
        return smooth_weighted(candidates)


class LeastConnections(Balancer):
    def __init__(self, targets: list[Target], spec: UpstreamSpec):
        super().__init__(targets, spec)
        self._next = 0

    def choose(self, candidates: list[Target], facts: RequestFacts) -> Target:
        self._next += 1
        start = self._next % len(candidates)
        rotated = candidates[start:] + candidates[:start]  # ties go in turn
        return min(rotated, key=lambda target: target.in_flight / target.weight)


class LeastResponseTime(Balancer):
    def choose(self, candidates: list[Target], facts: RequestFacts) -> Target:
        untried = [target for target in candidates if target.samples == 0]
        if untried:
            return min(untried, key=lambda target: target.in_flight)
        return min(candidates, key=lambda target: target.ewma_s * (target.in_flight + 1) / target.weight)


class ConsistentHash(Balancer):
    def __init__(self, targets: list[Target], spec: UpstreamSpec):
        from uhashring import HashRing

        super().__init__(targets, spec)
        assert spec.hash_on is not None  # the config requires it
        self.hash_on = spec.hash_on
        self.by_url = {target.url: target for target in targets}
        self.ring = HashRing(
            nodes={target.url: {"weight": target.weight} for target in targets},
            hash_fn="ketama",
        )
        self.fallback = RoundRobin(targets, spec)
        self.fallbacks = 0  # requests without a key

    def key_of(self, facts: RequestFacts) -> str | None:
        by, name = self.hash_on.by, self.hash_on.name
        if by == "header":
            return facts.headers.get(name.lower())
        if by == "query":
            return facts.query.get(name)
        if by == "cookie":
            return facts.cookie(name)
        if by == "ip":
            return facts.client_ip
        return facts.path

    def choose(self, candidates: list[Target], facts: RequestFacts) -> Target:
        key = self.key_of(facts)
        if not key:
            self.fallbacks += 1
            return self.fallback.choose(candidates, facts)
        allowed = {target.url for target in candidates}
        for url in self.ring.iterate_nodes(key, distinct=True):
            if url in allowed:
                return self.by_url[url]
        return candidates[0]  # unreachable: every candidate is on the ring


class Geographic(Balancer):
    def __init__(self, targets: list[Target], spec: UpstreamSpec):
        super().__init__(targets, spec)
        assert spec.geo is not None  # the config requires it
        self.header = spec.geo.header.lower() if spec.geo.header else None
        self.networks = [
            (ipaddress.ip_network(cidr, strict=False), region) for cidr, region in spec.geo.networks.items()
        ]
        # Longest prefix first: a /24 inside a /16 decides for its addresses.
        self.networks.sort(key=lambda item: item[0].prefixlen, reverse=True)
        self.regions = list(dict.fromkeys(target.region for target in targets))
        self.fallback = [region for region in spec.geo.fallback if region in self.regions]
        self.by_region: dict[str | None, int] = {}  # requests served per region (analytics)

    def client_region(self, facts: RequestFacts) -> str | None:
        if self.header is not None:
            region = facts.headers.get(self.header)
            if region in self.regions:
                return region
        if facts.client_ip and self.networks:
            try:
                address = ipaddress.ip_address(facts.client_ip)
            except ValueError:
                return None
            for network, region in self.networks:
                if address.version == network.version and address in network:
                    return region
        return None

    def order(self, client_region: str | None) -> list[str | None]:
        first = [client_region] if client_region is not None else []
        return list(dict.fromkeys([*first, *self.fallback, *self.regions]))

    def choose(self, candidates: list[Target], facts: RequestFacts) -> Target:
        for region in self.order(self.client_region(facts)):
            here = [target for target in candidates if target.region == region]
            if here:
                self.by_region[region] = self.by_region.get(region, 0) + 1
                return smooth_weighted(here)
        return smooth_weighted(candidates)  # unreachable: every target has a region


BALANCERS: dict[str, type[Balancer]] = {
    "round_robin": RoundRobin,
    "weighted_round_robin": WeightedRoundRobin,
    "least_connections": LeastConnections,
    "least_response_time": LeastResponseTime,
    "consistent_hash": ConsistentHash,
    "geo": Geographic,
}


def open_balancer(targets: list[Target], spec: UpstreamSpec) -> Balancer:
    return BALANCERS[spec.algorithm](targets, spec)
