"""Rate limits of proxy routes: the four algorithms, per consumer / route / address, the IETF
RateLimit headers and 429 problems, one limit shared by two gateways through Redis, the fallback when
Redis is away, and the adaptive limit following its upstream's latency."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from proxy_upstreams import Upstream, start_upstreams
from support import bearer, free_port

from orchestration.gateway.proxy.balancers import Target
from orchestration.gateway.proxy.limiters import AdaptiveLimiter, RateLimitSpec
from orchestration.kernel.breaker import CircuitBreaker
from orchestration.kernel.spec_errors import SpecError

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def server() -> Iterator[Upstream]:
    (started,) = start_upstreams("a").values()
    yield started
    started.stop()


def routes_file(tmp_path: Path, server: Upstream, limits: list[dict], auth: dict | None = None) -> Path:
    path = tmp_path / "routes.yaml"
    route = {"path": "/r", "upstream": "one", "rate_limits": limits, "auth": auth or {"type": "open"}}
    path.write_text(
        yaml.safe_dump({"upstreams": {"one": {"targets": [{"url": server.url}]}}, "routes": {"r": route}})
    )
    return path


def statuses(client, count: int, **request) -> list[int]:
    return [client.get("/proxy/r", **request).status_code for _ in range(count)]


def test_a_token_bucket_allows_its_burst_then_refills_at_its_rate(gateway, tmp_path, server):
    limits = [{"algorithm": "token_bucket", "rate": 2, "per": "1s", "burst": 3, "by": ["ip"]}]
    client = gateway(routes_file=routes_file(tmp_path, server, limits))
    first = client.get("/proxy/r")
    assert first.headers["ratelimit-policy"] == '"token_bucket-ip";q=3;w=1'
    assert first.headers["ratelimit"].startswith('"token_bucket-ip";r=2;')
    assert statuses(client, 2) == [200, 200]
    refused = client.get("/proxy/r")
    assert refused.status_code == 429 and refused.headers["content-type"] == PROBLEM
    assert refused.headers["retry-after"] == "1" and refused.headers["ratelimit"].startswith(
        '"token_bucket-ip";r=0;'
    )
    assert "over the rate limit token_bucket-ip (3 per 1 s)" in refused.json()["detail"]
    time.sleep(0.6)  # 2 a second: one token back (and a fifth of the next)
    assert statuses(client, 2) == [200, 429]


def test_a_fixed_window_counts_per_window(gateway, tmp_path, server):
    limits = [{"algorithm": "fixed_window", "rate": 3, "per": "1s", "by": ["route"]}]
    client = gateway(routes_file=routes_file(tmp_path, server, limits))
    # Start just after a window boundary, so the four requests fall in one window.
    time.sleep(1 - time.time() % 1 + 0.02)
    assert statuses(client, 4) == [200, 200, 200, 429]


def test_a_sliding_window_never_lets_more_than_its_rate_through_any_window(gateway, tmp_path, server):
    limits = [{"algorithm": "sliding_window", "rate": 5, "per": "1s", "by": ["ip"]}]
    client = gateway(routes_file=routes_file(tmp_path, server, limits))
    accepted = []
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        sent = time.monotonic()
        if client.get("/proxy/r").status_code == 200:
            accepted.append(sent)
        time.sleep(0.02)
    # Exact (a log of hits): in every 1 s span at most 5; the client's clock leads the server's by the
    # request's own time, so the spans are read 50 ms short.
    most = max(sum(1 for t in accepted if start <= t < start + 0.95) for start in accepted)
    assert most <= 5, accepted
    assert len(accepted) >= 10, "the window slides: 5 more as each second passes"


def test_consumers_count_apart_and_a_route_limit_counts_them_together(gateway, tmp_path, server, make_key):
    limits = [
        {"algorithm": "token_bucket", "rate": 1, "per": "1m", "burst": 2, "by": ["consumer"]},
        {"algorithm": "fixed_window", "rate": 3, "per": "1m", "by": ["route"]},
    ]
    client = gateway(routes_file=routes_file(tmp_path, server, limits, auth={"type": "key"}))
    ann, bob = make_key("ann", "proxy:call:r"), make_key("bob", "proxy:call:r")
    assert statuses(client, 3, headers=bearer(ann)) == [200, 200, 429], "ann's own bucket"
    assert statuses(client, 2, headers=bearer(bob)) == [200, 429], "bob's bucket, then the route's 3"


def test_two_gateways_share_one_limit_through_redis(gateway, tmp_path, server, clean_redis_url):
    limits = [
        {"algorithm": "token_bucket", "rate": 1, "per": "1m", "burst": 4, "by": ["route"], "shared": True},
        {"algorithm": "sliding_window", "rate": 6, "per": "1m", "by": ["route"], "shared": True},
    ]
    path = routes_file(tmp_path, server, limits)
    one, two = (
        gateway(routes_file=path, redis_url=clean_redis_url),
        gateway(routes_file=path, redis_url=clean_redis_url),
    )
    assert statuses(one, 2) + statuses(two, 2) == [200] * 4
    assert statuses(one, 1) + statuses(two, 1) == [429, 429], "the bucket is one for both"
    limiter = two.app.state.proxy.config.routes[0].limiters[0]
    assert limiter.fallbacks == 0 and limiter.rejected == 1


def test_a_shared_limit_counts_locally_while_redis_is_away(gateway, tmp_path, server):
    limits = [
        {"algorithm": "token_bucket", "rate": 1, "per": "1m", "burst": 2, "by": ["route"], "shared": True}
    ]
    away = f"redis://127.0.0.1:{free_port()}/0"
    client = gateway(routes_file=routes_file(tmp_path, server, limits), redis_url=away)
    assert statuses(client, 3) == [200, 200, 429], "still limited, by this gateway's own count"
    assert client.app.state.proxy.config.routes[0].limiters[0].fallbacks == 3


def test_the_adaptive_limit_halves_when_the_upstream_slows_and_grows_back(monkeypatch):
    monkeypatch.setattr(AdaptiveLimiter, "ADJUST_EVERY_S", 0.0)

    class Upstream:
        targets = [Target("http://a", 1, None, CircuitBreaker("a"))]

    spec = RateLimitSpec(algorithm="adaptive", rate=100, per="1s", min_rate=10, latency_target="100ms")
    limiter = AdaptiveLimiter("r", spec, None, Upstream())
    target = Upstream.targets[0]
    target.finished(0.4)  # slower than the target
    for expected in (50, 25, 12.5, 10, 10):
        asyncio.run(limiter.check("k"))
        assert limiter.rate_per_s == pytest.approx(expected)
    target.ewma_s = 0.02  # fast again: a tenth of the range back each time
    asyncio.run(limiter.check("k"))
    assert limiter.rate_per_s == pytest.approx(19)
    for _ in range(20):
        asyncio.run(limiter.check("k"))
    assert limiter.rate_per_s == pytest.approx(100)
    assert limiter.decisions[-1]["rate_per_s"] == 100 and len(limiter.decisions) == 10
    for _ in range(3):  # failures count too
        target.breaker.record(False)
    limiter.spec = spec.model_copy(update={"error_ratio": 0.5})
    asyncio.run(limiter.check("k"))
    assert limiter.rate_per_s == pytest.approx(50)


@pytest.mark.parametrize(
    ("limit", "problem"),
    [
        (
            {"algorithm": "fixed_window", "rate": 3, "burst": 5},
            "routes.r.rate_limits[0]: burst is for token_bucket",
        ),
        (
            {"algorithm": "adaptive", "rate": 3, "shared": True},
            "routes.r.rate_limits[0]: adaptive limits follow",
        ),
        ({"rate": 0}, "routes.r.rate_limits[0].rate: Input should be greater than or equal to 1"),
        ({"rate": 3, "by": ["ip", "ip"]}, "routes.r.rate_limits[0]: by: a dimension is named twice"),
        ({"rate": 3, "shared": True}, "routes.r.rate_limits[0].shared: a shared limit counts in Redis"),
    ],
)
def test_bad_limits_name_the_field(tmp_path, server, limit, problem):
    from orchestration.gateway.proxy.app import ProxyApp

    with pytest.raises(SpecError) as caught:
        ProxyApp(routes_file(tmp_path, server, [limit]), redis_url=None)
    assert f"routes.yaml: {problem}" in str(caught.value)
