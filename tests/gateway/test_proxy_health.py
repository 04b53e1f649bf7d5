"""Health of proxy targets: passive outlier ejection after failures in a row, for a time that grows on
repeat, and the return after it; active probes taking a target out and bringing it back."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from proxy_upstreams import Upstream, start_upstreams
from support import wait_until

NO_BREAKER = {"min_requests": 1000}  # health alone decides here


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Upstream]]:
    started = start_upstreams("a", "b")
    yield started
    for server in started.values():
        server.stop()


@pytest.fixture
def pair(servers, gateway, tmp_path: Path):
    def build(health: dict):
        for server in servers.values():
            server.reset()
        upstream = {
            "targets": [{"url": server.url} for server in servers.values()],
            "breaker": NO_BREAKER,
            "retries": 0,
            "health": health,
        }
        path = tmp_path / "routes.yaml"
        route = {"path": "/r", "upstream": "pair", "auth": {"type": "open"}}
        path.write_text(yaml.safe_dump({"upstreams": {"pair": upstream}, "routes": {"r": route}}))
        return gateway(routes_file=path)

    return build


def served(client, count: int) -> Counter:
    return Counter(client.get("/proxy/r").headers.get("x-served-by", "none") for _ in range(count))


def target_state(client, url: str) -> dict:
    upstream = client.app.state.proxy.status()["upstreams"][0]
    return next(target for target in upstream["targets"] if target["url"] == url)


def test_failures_in_a_row_eject_a_target_for_longer_each_time(pair, servers):
    a = servers["a"]
    client = pair({"passive": {"consecutive_failures": 3, "eject_for": "300ms", "max_eject_for": "5s"}})
    a.status = 502
    assert served(client, 6) == {"a": 3, "b": 3}, "round robin until a's third failure in a row"
    assert target_state(client, a.url)["ejected"] and target_state(client, a.url)["ejections"] == 1
    assert served(client, 4) == {"b": 4}, "ejected: no traffic"
    time.sleep(0.35)
    assert served(client, 6) == {"a": 3, "b": 3}, "back after 300 ms, and failing again"
    time.sleep(0.35)
    assert served(client, 2) == {"b": 2}, "the second ejection lasts 600 ms"
    a.status = 200
    time.sleep(0.3)
    assert served(client, 4) == {"a": 2, "b": 2}


def test_active_probes_take_a_target_out_and_bring_it_back(pair, servers):
    a = servers["a"]
    client = pair({"active": {"path": "/health", "interval": "50ms", "healthy": 2, "unhealthy": 2}})
    a.health_status = 503
    wait_until(lambda: not target_state(client, a.url)["healthy"], 5, "a unhealthy")
    assert a.probes >= 2
    assert served(client, 4) == {"b": 4}
    a.health_status = 200
    wait_until(lambda: target_state(client, a.url)["healthy"], 5, "a healthy again")
    assert served(client, 4) == {"a": 2, "b": 2}


def test_every_target_out_is_an_immediate_503(pair, servers):
    client = pair({"active": {"interval": "50ms", "unhealthy": 1}})
    for server in servers.values():
        server.health_status = 500
    targets = lambda: client.app.state.proxy.status()["upstreams"][0]["targets"]  # noqa: E731
    wait_until(lambda: not any(target["healthy"] for target in targets()), 5, "every target unhealthy")
    started = time.perf_counter()
    answer = client.get("/proxy/r")
    assert answer.status_code == 503 and time.perf_counter() - started < 0.5
    assert answer.headers["content-type"] == "application/problem+json" and answer.headers["retry-after"]
