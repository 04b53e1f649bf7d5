"""A route's own plugins, against real local upstreams: CORS (preflights answered before auth, allow
headers on every answer for an allowed origin), a body limit (413 before the upstream sees anything),
timeouts that replace the upstream's (and a total one across retries), retries within the upstream's
retry budget, and a cache of GET answers (per consumer, revalidated with the upstream's ETag)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from proxy_upstreams import Upstream, start_upstreams
from support import bearer

PROBLEM = "application/problem+json"
APP = "https://app.example.com"


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Upstream]]:
    started = start_upstreams("a", "b")
    yield started
    for server in started.values():
        server.stop()


@pytest.fixture
def upstreams(servers: dict[str, Upstream]) -> dict[str, Upstream]:
    for server in servers.values():
        server.reset()
    return servers


@pytest.fixture
def proxy(gateway, tmp_path: Path):
    caches = tmp_path / "caches.yaml"
    caches.write_text(
        yaml.safe_dump({"namespaces": {"answers": {"layers": ["memory"], "ttl": "1h", "stale_grace": "1h"}}})
    )

    def build(upstream_specs: dict, routes: dict):
        path = tmp_path / "routes.yaml"
        path.write_text(yaml.safe_dump({"upstreams": upstream_specs, "routes": routes}))
        return gateway(routes_file=path, caches_file=caches)

    return build


def targets(*servers: Upstream, **extra) -> dict:
    return {"targets": [{"url": server.url} for server in servers], **extra}


def test_cors_preflights_are_answered_before_auth_and_answers_carry_the_allow_headers(
    proxy, upstreams, make_key
):
    a = upstreams["a"]
    cors = {"origins": [APP], "credentials": True, "expose_headers": ["X-Served-By"], "max_age": "1h"}
    client = proxy(
        {"u": targets(a)}, {"r": {"path": "/r", "upstream": "u", "methods": ["GET"], "cors": cors}}
    )
    preflight = client.options("/proxy/r/x", headers={"Origin": APP, "Access-Control-Request-Method": "GET"})
    assert preflight.status_code == 204, preflight.text
    assert preflight.headers["access-control-allow-origin"] == APP
    assert preflight.headers["access-control-allow-credentials"] == "true"
    assert preflight.headers["access-control-allow-methods"] == "GET"
    assert preflight.headers["access-control-max-age"] == "3600"
    assert a.seen == [], "the gateway answers preflights itself"
    other = client.options(
        "/proxy/r/x", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
    )
    assert other.status_code == 403 and "access-control-allow-origin" not in other.headers

    refused = client.get("/proxy/r/x", headers={"Origin": APP})
    assert refused.status_code == 401, "the route still needs its key"
    assert refused.headers["access-control-allow-origin"] == APP, "a page can read why"
    key = make_key("page", "proxy:call:r")
    answered = client.get("/proxy/r/x", headers={"Origin": APP, **bearer(key)})
    assert answered.status_code == 200
    assert answered.headers["access-control-allow-origin"] == APP
    assert answered.headers["access-control-expose-headers"] == "X-Served-By"
    assert "Origin" in answered.headers["vary"]
    assert "access-control-allow-origin" not in client.get("/proxy/r/x", headers=bearer(key)).headers


def test_a_body_over_the_routes_limit_is_413_and_never_reaches_the_upstream(proxy, upstreams):
    a = upstreams["a"]
    client = proxy(
        {"u": targets(a)},
        {"r": {"path": "/r", "upstream": "u", "auth": {"type": "open"}, "max_body_bytes": 10}},
    )
    assert client.post("/proxy/r", content=b"0123456789").status_code == 200
    declared = client.post("/proxy/r", content=b"0123456789!")
    assert declared.status_code == 413 and declared.headers["content-type"].startswith(PROBLEM)
    assert "over 10 bytes" in declared.json()["detail"]
    streamed = client.post("/proxy/r", content=iter([b"012345", b"6789!"]))  # chunked: no length
    assert streamed.status_code == 413
    assert len(a.seen) == 1


def test_route_timeouts_replace_the_upstreams_and_a_total_bounds_every_attempt(proxy, upstreams):
    a, b = upstreams["a"], upstreams["b"]
    a.delay_s = b.delay_s = 1.0
    open_route = {"auth": {"type": "open"}}
    client = proxy(
        {"u": targets(a, b, retries=1, timeouts={"read": "5s"})},
        {
            "quick": {
                "path": "/quick",
                "upstream": "u",
                "timeouts": {"read": "200ms"},
                "retries": 0,
                **open_route,
            },
            "bounded": {"path": "/bounded", "upstream": "u", "timeouts": {"total": "300ms"}, **open_route},
        },
    )
    began = time.monotonic()
    quick = client.get("/proxy/quick")
    assert quick.status_code == 504 and time.monotonic() - began < 0.9
    assert len(a.seen) + len(b.seen) == 1, "retries: 0 on the route"
    began = time.monotonic()
    bounded = client.get("/proxy/bounded")
    assert bounded.status_code == 504 and time.monotonic() - began < 0.9, "not 2 x 5 s of reads"


def test_retries_stay_within_the_upstreams_retry_budget(proxy, upstreams):
    a, b = upstreams["a"], upstreams["b"]
    a.status = b.status = 500
    budget = {"ratio": 0, "min_per_second": 0.1, "window": "10s"}  # one retry in 10 s
    client = proxy(
        {"u": targets(a, b, retries=1, retry_budget=budget, breaker={"min_requests": 100})},
        {"r": {"path": "/r", "upstream": "u", "auth": {"type": "open"}}},
    )
    assert client.get("/proxy/r").status_code == 500
    assert len(a.seen) + len(b.seen) == 2, "retried on the other target (which failed too)"
    assert client.get("/proxy/r").status_code == 500
    assert len(a.seen) + len(b.seen) == 3, "no budget left: not retried"
    upstream = client.app.state.proxy.status()["upstreams"][0]
    assert upstream["retry_budget"]["exhausted"] == 1 and upstream["retry_budget"]["window_retries"] == 1


def test_a_route_cache_keeps_get_answers_per_consumer_and_revalidates_them(proxy, upstreams, make_key):
    a = upstreams["a"]
    a.etag = '"v1"'
    client = proxy(
        {"u": targets(a)},
        {"r": {"path": "/r", "upstream": "u", "cache": {"namespace": "answers", "ttl": "300ms"}}},
    )
    first, second = bearer(make_key("first", "proxy:call:r")), bearer(make_key("second", "proxy:call:r"))
    miss = client.get("/proxy/r/item?b=2&a=1", headers=first)
    assert miss.status_code == 200 and miss.headers["x-cache-status"] == "MISS"
    hit = client.get("/proxy/r/item?a=1&b=2", headers=first)
    assert hit.headers["x-cache-status"] == "HIT" and hit.json() == miss.json()
    assert len(a.seen) == 1, "a fresh answer is reused without a request"
    assert client.get("/proxy/r/item?a=1&b=2", headers=second).headers["x-cache-status"] == "MISS"
    assert client.post("/proxy/r/item", headers=first).headers.get("x-cache-status") is None
    assert len(a.seen) == 3
    time.sleep(0.35)
    revalidated = client.get("/proxy/r/item?a=1&b=2", headers=first)
    assert revalidated.headers["x-cache-status"] == "REVALIDATED"
    assert revalidated.json() == miss.json(), "the kept body after the upstream's 304"
    assert a.seen[-1]["headers"]["if-none-match"] == '"v1"'
    conditional = client.get("/proxy/r/item?a=1&b=2", headers={**first, "If-None-Match": '"v0"'})
    assert "x-cache-status" not in conditional.headers, "the client's own validators go through uncached"
    figures = client.app.state.proxy.status()["routes"]["r"]["cache"]
    assert figures == {"cached": 1, "revalidated": 1, "fetched": 2}


def test_an_unknown_cache_namespace_names_the_route(proxy, upstreams):
    from orchestration.kernel.spec_errors import SpecError

    with pytest.raises(SpecError, match=r"routes\.r\.cache\.namespace: .*no cache namespace 'nope'"):
        proxy(
            {"u": targets(upstreams["a"])},
            {"r": {"path": "/r", "upstream": "u", "cache": {"namespace": "nope"}}},
        )


def test_the_gateways_address_lists_and_body_limit_apply_to_proxied_routes(
    gateway, tmp_path: Path, upstreams
):
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        yaml.safe_dump(
            {
                "upstreams": {"u": targets(upstreams["a"])},
                "routes": {"r": {"path": "/r", "upstream": "u", "auth": {"type": "open"}}},
            }
        )
    )
    denied = gateway(routes_file=routes, gateway_allow_ips=["10.0.0.0/8"]).get("/proxy/r")
    assert denied.status_code == 403 and denied.json()["type"].endswith("ip-denied")
    limited = gateway(routes_file=routes, gateway_max_body_bytes=4).post("/proxy/r", content=b"12345")
    assert limited.status_code == 413 and limited.json()["type"].endswith("body-too-large")
    assert upstreams["a"].seen == []
