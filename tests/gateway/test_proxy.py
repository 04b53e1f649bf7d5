"""The reverse proxy in the gateway, against real local upstream servers: routing (prefix, template,
rewrite, method, host, header), key auth with scopes, forwarded headers, breakers that open on a
failing target and close when it recovers, retries of idempotent requests on another target,
timeouts, 503 with Retry-After when no target can take a request, reloads without a restart, and a
bad routes file named by file and field."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from proxy_upstreams import Upstream, start_upstreams
from support import bearer, wait_until

from orchestration.kernel.spec_errors import SpecError

PROBLEM = "application/problem+json"
QUICK_BREAKER = {"error_ratio": 0.5, "min_requests": 4, "window": "10s", "open_for": "300ms"}


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Upstream]]:
    started = start_upstreams("a", "b", "c")
    yield started
    for server in started.values():
        server.stop()


@pytest.fixture
def upstreams(servers: dict[str, Upstream]) -> dict[str, Upstream]:
    for server in servers.values():
        server.reset()
    return servers


def write_routes(path: Path, upstreams: dict, routes: dict) -> Path:
    path.write_text(yaml.safe_dump({"upstreams": upstreams, "routes": routes}))
    return path


@pytest.fixture
def proxy(gateway, tmp_path: Path, upstreams: dict[str, Upstream]):
    """A gateway whose routes file is `routes.yaml` in tmp_path, written from the arguments."""

    def build(upstream_specs: dict, routes: dict):
        path = write_routes(tmp_path / "routes.yaml", upstream_specs, routes)
        return gateway(routes_file=path)

    return build


def targets(*servers: Upstream, **extra) -> dict:
    return {"targets": [{"url": server.url} for server in servers], **extra}


def test_routes_match_by_prefix_template_method_host_and_header(proxy, upstreams, make_key):
    a, b, c = upstreams["a"], upstreams["b"], upstreams["c"]
    client = proxy(
        {"one": targets(a), "two": targets(b), "three": targets(c)},
        {
            "orders": {"path": "/orders", "upstream": "one", "auth": {"type": "open"}},
            "order-lines": {
                "path": "/orders/{id}/lines",
                "upstream": "two",
                "rewrite": "/v2/lines/{id}",
                "auth": {"type": "open"},
            },
            "kept": {"path": "/kept", "upstream": "two", "strip_path": False, "auth": {"type": "open"}},
            "tenant": {
                "path": "/orders",
                "upstream": "three",
                "methods": ["POST"],
                "hosts": ["api.example.com"],
                "headers": {"X-Tenant": "acme"},
                "auth": {"type": "open"},
            },
        },
    )
    answer = client.get("/proxy/orders/7?expand=lines&x=1")
    assert answer.status_code == 200, answer.text
    assert answer.json()["target"] == "a" and answer.json()["path"] == "/7?expand=lines&x=1"
    assert (
        answer.headers["via"] == "1.1 junction" and float(answer.headers["x-junction-upstream-latency"]) >= 0
    )
    assert client.get("/proxy/orders/7/lines/3").json()["path"] == "/v2/lines/7/3", "template and rewrite"
    assert client.get("/proxy/kept/x").json()["path"] == "/kept/x", "strip_path: false"
    tenant = {"Host": "api.example.com", "X-Tenant": "acme"}
    tenant_answer = client.post("/proxy/orders", headers=tenant, content=b'{"n": 1}')
    assert tenant_answer.json().get("target") == "c", tenant_answer.text
    assert client.post("/proxy/orders", headers={"X-Tenant": "acme"}).json()["target"] == "a", "another host"
    assert client.get("/proxy/orders", headers=tenant).json()["target"] == "a", "another method"
    missing = client.get("/proxy/nowhere")
    assert missing.status_code == 404 and missing.headers["content-type"] == PROBLEM
    assert missing.json()["detail"] == "no proxy route for GET /nowhere"


def test_routes_need_a_key_with_their_scope_and_the_key_is_not_forwarded(proxy, upstreams, make_key):
    a = upstreams["a"]
    client = proxy(
        {"one": targets(a)},
        {
            "orders": {"path": "/orders", "upstream": "one"},
            "reports": {
                "path": "/reports",
                "upstream": "one",
                "auth": {"type": "key", "scopes": ["reports:read"]},
            },
        },
    )
    refused = client.get("/proxy/orders")
    assert refused.status_code == 401 and refused.headers["content-type"] == PROBLEM
    assert refused.headers["www-authenticate"] == "Bearer"
    other = make_key("reporter", "reports:read")
    assert "proxy:call:orders" in client.get("/proxy/orders", headers=bearer(other)).json()["detail"]
    assert client.get("/proxy/reports", headers=bearer(other)).status_code == 200
    caller = make_key("caller", "proxy:call:orders")
    answer = client.get("/proxy/orders/1", headers={**bearer(caller), "X-Forwarded-For": "198.51.100.9"})
    assert answer.status_code == 200
    seen = answer.json()["headers"]
    assert "authorization" not in seen and "x-api-key" not in seen, "the gateway's key stays here"
    assert seen["x-forwarded-for"].startswith("198.51.100.9, ")
    assert client.get("/proxy/orders/1", headers={"X-API-Key": caller}).status_code == 200


def test_a_failing_target_opens_its_breaker_and_the_traffic_moves(proxy, upstreams):
    a, b = upstreams["a"], upstreams["b"]
    client = proxy(
        {"pair": targets(a, b, breaker=QUICK_BREAKER, retries=0)},
        {"pair": {"path": "/pair", "upstream": "pair", "auth": {"type": "open"}}},
    )
    a.status = 500
    statuses = Counter()
    for _ in range(12):
        answer = client.get("/proxy/pair")
        statuses[(answer.json().get("target"), answer.status_code)] += 1
    # Round robin sends a every other request until a's own window holds min_requests (4) calls,
    # at least half of them failures: then only b.
    assert statuses[("a", 500)] == 4 and statuses[("b", 200)] == 8, statuses
    status = client.app.state.proxy.status()
    breaker = next(t for t in status["upstreams"][0]["targets"] if t["url"] == a.url)["breaker"]
    assert breaker["state"] == "open" and breaker["transitions"] == 1
    a.status = 200
    time.sleep(0.35)  # past open_for: the next request to a is a probe
    served = Counter(client.get("/proxy/pair").json()["target"] for _ in range(6))
    assert served["a"] >= 2, served
    closed = next(t for t in client.app.state.proxy.status()["upstreams"][0]["targets"] if t["url"] == a.url)
    assert closed["breaker"]["state"] == "closed"


def test_idempotent_requests_are_retried_on_another_target_and_others_are_not(proxy, upstreams):
    a, b = upstreams["a"], upstreams["b"]
    client = proxy(
        {
            "pair": targets(a, b, retries=1, health={"passive": {"consecutive_failures": 100}})
        },  # never ejected
        {"pair": {"path": "/pair", "upstream": "pair", "auth": {"type": "open"}}},
    )
    a.stop()
    gets = [client.get("/proxy/pair") for _ in range(4)]
    assert [answer.status_code for answer in gets] == [200] * 4
    assert {answer.json()["target"] for answer in gets} == {"b"}
    posts = Counter(client.post("/proxy/pair", content=b"{}").status_code for _ in range(4))
    assert posts[502] >= 1 and posts[200] >= 1, posts
    bad = next(
        answer for answer in (client.post("/proxy/pair") for _ in range(4)) if answer.status_code == 502
    )
    assert (
        bad.headers["content-type"] == PROBLEM
        and "route pair: upstream pair unreachable" in bad.json()["detail"]
    )


def test_no_available_target_is_a_fast_503_with_retry_after_and_a_slow_one_504(proxy, upstreams):
    a, c = upstreams["a"], upstreams["c"]
    c.delay_s = 1.0
    client = proxy(
        {
            "solo": targets(a, breaker={**QUICK_BREAKER, "min_requests": 2, "open_for": "5s"}, retries=0),
            "slow": targets(c, timeouts={"read": "200ms"}, retries=0),
        },
        {
            "solo": {"path": "/solo", "upstream": "solo", "auth": {"type": "open"}},
            "slow": {"path": "/slow", "upstream": "slow", "auth": {"type": "open"}},
        },
    )
    a.status = 503
    assert [client.get("/proxy/solo").status_code for _ in range(2)] == [503, 503]
    started = time.perf_counter()
    refused = client.get("/proxy/solo")
    assert time.perf_counter() - started < 0.5
    assert refused.status_code == 503 and refused.headers["content-type"] == PROBLEM
    assert 1 <= int(refused.headers["retry-after"]) <= 5
    assert "no target of upstream solo can take requests now" in refused.json()["detail"]
    assert len(a.seen) == 2, "the open breaker kept the request from the target"
    slow = client.get("/proxy/slow")
    assert slow.status_code == 504 and "did not answer in time" in slow.json()["detail"]


def test_a_changed_routes_file_applies_without_a_restart_and_a_bad_one_leaves_the_running(
    proxy, upstreams, tmp_path: Path, monkeypatch
):
    from orchestration.gateway.proxy import app as proxy_app

    monkeypatch.setattr(proxy_app, "RELOAD_CHECK_S", 0.05)
    a, b = upstreams["a"], upstreams["b"]
    open_route = {"auth": {"type": "open"}}
    client = proxy({"one": targets(a)}, {"r": {"path": "/r", "upstream": "one", **open_route}})
    assert client.get("/proxy/r").json()["target"] == "a"
    routes = tmp_path / "routes.yaml"
    write_routes(routes, {"one": targets(b)}, {"r": {"path": "/r", "upstream": "one", **open_route}})
    wait_until(lambda: client.get("/proxy/r").json()["target"] == "b", 5, "the new targets, no restart")
    routes.write_text(yaml.safe_dump({"upstreams": {}, "routes": {"r": {"path": "/r", "upstream": "gone"}}}))
    wait_until(lambda: client.app.state.proxy.status()["last_error"] is not None, 5, "the proxy to reload")
    assert client.get("/proxy/r").json()["target"] == "b", "a bad file leaves the running configuration"
    last_error = client.app.state.proxy.status()["last_error"]
    assert "routes.yaml: routes.r.upstream: no upstream 'gone'" in last_error


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ({"routes": {"r": {"path": "/r", "upstream": "nope"}}}, "routes.r.upstream: no upstream 'nope'"),
        ({"upstreams": {"u": {"targets": []}}}, "upstreams.u.targets: List should have at least 1 item"),
        ({"upstreams": {"u": {"targets": [{"url": "ftp://x"}]}}}, "upstreams.u.targets[0].url"),
        (
            {"upstreams": {"u": {"targets": [{"url": "http://x"}], "algorithm": "consistent_hash"}}},
            "upstreams.u: consistent_hash needs hash_on",
        ),
        (
            {
                "upstreams": {"u": {"targets": [{"url": "http://x"}]}},
                "routes": {"r": {"path": "/r/{id}", "upstream": "u", "rewrite": "/{nope}"}},
            },
            "routes.r: rewrite: {nope} is not a parameter",
        ),
        (
            {"routes": {"r": {"path": "/r", "upstream": "u", "methods": ["FETCH"]}}},
            "routes.r.methods: unknown method FETCH",
        ),
    ],
)
def test_a_bad_routes_file_names_file_field_and_reason(tmp_path: Path, document: dict, problem: str):
    from orchestration.gateway.proxy.app import ProxyApp

    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(SpecError) as caught:
        ProxyApp(path)
    assert f"routes.yaml: {problem}" in str(caught.value)


def test_analytics_per_route_consumer_and_target(proxy, upstreams, make_key):
    from prometheus_client import CollectorRegistry, generate_latest

    from orchestration.gateway.api.analytics import proxy_metric_families

    a, b = upstreams["a"], upstreams["b"]
    client = proxy(
        {"pair": targets(a, b)},
        {"orders": {"path": "/orders", "upstream": "pair", "rate_limits": [{"rate": 3, "per": "1m"}]}},
    )
    caller = make_key("caller", "proxy:call:orders")
    assert [client.get("/proxy/orders", headers=bearer(caller)).status_code for _ in range(4)] == [
        200
    ] * 3 + [429]
    reader = make_key("analyst", "analytics:read")
    figures = client.get("/v1/analytics/proxy", headers=bearer(reader)).json()
    orders = figures["routes"]["orders"]
    assert orders["outcomes"] == {"2xx": 3, "rate_limited": 1} and orders["consumers"] == {"caller": 3}
    assert orders["upstream_latency_ms"]["p99"] > 0 and orders["added_latency_ms"]["p50"] >= 0
    assert orders["rate_limits"] == [{"policy": "token_bucket-consumer", "rejected": 1, "fallbacks": 0}]
    assert sorted(target["chosen"] for target in figures["upstreams"][0]["targets"]) == [1, 2]
    window = client.get("/v1/analytics/requests", headers=bearer(reader)).json()["stats"]
    proxied = [row for row in window if row["route"] == "/proxy/orders"]
    assert proxied and proxied[0]["principal"] == "caller", "in the gateway's per-route statistics"

    registry = CollectorRegistry()

    class Collector:
        def collect(self):
            return proxy_metric_families(client.app.state.proxy.status())

    registry.register(Collector())
    text = generate_latest(registry).decode()
    assert 'junction_proxy_requests_total{outcome="2xx",route="orders"} 3.0' in text
    assert 'junction_proxy_rate_limited_total{policy="token_bucket-consumer",route="orders"} 1.0' in text
    assert f'junction_proxy_breaker_open{{target="{a.url}",upstream="pair"}} 0.0' in text
