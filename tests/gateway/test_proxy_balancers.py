"""The six load-balancing algorithms, each checked for the distribution it promises."""

from __future__ import annotations

from collections import Counter

import pytest

from orchestration.gateway.proxy.balancers import RequestFacts, Target, open_balancer
from orchestration.gateway.proxy.config import UpstreamSpec
from orchestration.kernel.breaker import CircuitBreaker


def upstream(algorithm: str, targets: list[dict], **extra) -> tuple[UpstreamSpec, list[Target]]:
    spec = UpstreamSpec.model_validate({"algorithm": algorithm, "targets": targets, **extra})
    live = [Target(t.url, t.weight, t.region, CircuitBreaker(t.url)) for t in spec.targets]
    return spec, live


def facts(headers: dict | None = None, query: dict | None = None, ip: str | None = "10.0.0.1", path="/x"):
    return RequestFacts(path, headers or {}, query or {}, ip)


def urls(*names: str) -> list[dict]:
    return [{"url": f"http://{name}:80"} for name in names]


def picks(balancer, candidates, count: int, request=None) -> list[str]:
    return [balancer.choose(candidates, request or facts()).url.split("//")[1][0] for _ in range(count)]


def test_round_robin_takes_each_in_turn():
    spec, targets = upstream("round_robin", urls("a", "b", "c"))
    balancer = open_balancer(targets, spec)
    assert Counter(picks(balancer, targets, 300)) == {"a": 100, "b": 100, "c": 100}
    assert set(picks(balancer, targets[:2], 10)) == {"a", "b"}, "only the available ones"


def test_weighted_round_robin_is_smooth_as_nginx():
    spec, targets = upstream(
        "weighted_round_robin",
        [
            {"url": "http://a:80", "weight": 5},
            {"url": "http://b:80", "weight": 1},
            {"url": "http://c:80", "weight": 1},
        ],
    )
    balancer = open_balancer(targets, spec)
    assert "".join(picks(balancer, targets, 7)) == "aabacaa", "nginx's sequence for 5, 1, 1"
    assert Counter(picks(balancer, targets, 700)) == {"a": 500, "b": 100, "c": 100}


def test_least_connections_prefers_fewest_in_flight_per_weight():
    spec, targets = upstream(
        "least_connections",
        [{"url": "http://a:80", "weight": 2}, {"url": "http://b:80"}, {"url": "http://c:80"}],
    )
    balancer = open_balancer(targets, spec)
    a, b, c = targets
    a.in_flight, b.in_flight, c.in_flight = 2, 3, 1
    assert {balancer.choose(targets, facts()).url for _ in range(4)} == {a.url, c.url}, (
        "2/2 ties 1/1; never b"
    )
    c.in_flight = 0
    assert balancer.choose(targets, facts()) is c
    # Held requests pile up evenly: each pick starts one that has not finished.
    for target in targets:
        target.in_flight = 0
    for _ in range(40):
        balancer.choose(targets, facts()).started()
    assert (a.in_flight, b.in_flight, c.in_flight) == (20, 10, 10)


def test_least_response_time_sends_most_to_the_fast_target_and_reacts_to_a_peak():
    spec, targets = upstream("least_response_time", urls("a", "b"))
    balancer = open_balancer(targets, spec)
    fast, slow = targets
    chosen = Counter()
    for _ in range(200):
        target = balancer.choose(targets, facts())
        chosen[target.url] += 1
        target.started()
        target.finished(0.005 if target is fast else 0.050)
    assert chosen[fast.url] > 150, chosen
    assert slow.samples >= 1, "an untried target is tried first"
    fast.finished(0.5)  # a peak: taken at once, not averaged in
    assert fast.ewma_s == pytest.approx(0.5)
    assert balancer.choose(targets, facts()) is slow


def test_consistent_hash_keeps_keys_and_a_removed_target_moves_only_its_own():
    spec, targets = upstream(
        "consistent_hash", urls("a", "b", "c", "d"), hash_on={"by": "header", "name": "X-Customer"}
    )
    balancer = open_balancer(targets, spec)
    keys = [f"customer-{n}" for n in range(4000)]
    before = {key: balancer.choose(targets, facts({"x-customer": key})).url for key in keys}
    again = {key: balancer.choose(targets, facts({"x-customer": key})).url for key in keys}
    assert before == again, "the same key, the same target"
    shares = Counter(before.values())
    assert all(700 < count < 1300 for count in shares.values()), shares
    without_b = [target for target in targets if target.url != "http://b:80"]
    after = {key: balancer.choose(without_b, facts({"x-customer": key})).url for key in keys}
    moved = [key for key in keys if before[key] != after[key]]
    assert moved and all(before[key] == "http://b:80" for key in moved), "only b's keys moved"
    assert balancer.choose(targets, facts()).url in {t.url for t in targets} and balancer.fallbacks == 1


@pytest.mark.parametrize(
    ("hash_on", "request_facts"),
    [
        ({"by": "cookie", "name": "session"}, facts({"cookie": "theme=dark; session=abc123"})),
        ({"by": "query", "name": "tenant"}, facts(query={"tenant": "acme"})),
        ({"by": "ip"}, facts(ip="192.0.2.7")),
        ({"by": "path"}, facts(path="/orders/7")),
    ],
)
def test_consistent_hash_reads_each_kind_of_key(hash_on, request_facts):
    spec, targets = upstream("consistent_hash", urls("a", "b", "c"), hash_on=hash_on)
    balancer = open_balancer(targets, spec)
    assert len({balancer.choose(targets, request_facts).url for _ in range(20)}) == 1
    assert balancer.key_of(request_facts)
    assert balancer.fallbacks == 0


def test_geo_routes_to_the_clients_region_then_the_fallbacks():
    spec, targets = upstream(
        "geo",
        [
            {"url": "http://eu1:80", "region": "eu"},
            {"url": "http://eu2:80", "region": "eu"},
            {"url": "http://us1:80", "region": "us"},
            {"url": "http://ap1:80", "region": "ap"},
        ],
        geo={"networks": {"10.1.0.0/16": "us", "10.1.2.0/24": "ap"}, "fallback": ["us", "eu"]},
    )
    balancer = open_balancer(targets, spec)
    eu1, eu2, us1, ap1 = targets
    from_eu = facts({"x-client-region": "eu"})
    assert {balancer.choose(targets, from_eu).url for _ in range(4)} == {eu1.url, eu2.url}
    assert balancer.choose(targets, facts(ip="10.1.9.9")) is us1, "the client's network"
    assert balancer.choose(targets, facts(ip="10.1.2.3")) is ap1, "the longest prefix decides"
    assert balancer.choose(targets, facts({"x-client-region": "mars"}, ip="192.0.2.1")) is us1, (
        "unknown: fallback"
    )
    assert balancer.choose([eu1, eu2, ap1], facts(ip="10.1.9.9")).region == "eu", "us down: the next fallback"
    assert balancer.choose([ap1], from_eu) is ap1, "then any region"
    assert balancer.by_region["eu"] >= 5


def test_bad_upstreams_name_the_field():
    with pytest.raises(ValueError, match="consistent_hash needs hash_on"):
        UpstreamSpec.model_validate({"algorithm": "consistent_hash", "targets": urls("a")})
    with pytest.raises(ValueError, match="every target needs a region"):
        UpstreamSpec.model_validate({"algorithm": "geo", "targets": urls("a"), "geo": {}})
    with pytest.raises(ValueError, match="hashing on a header needs its name"):
        UpstreamSpec.model_validate(
            {"algorithm": "consistent_hash", "targets": urls("a"), "hash_on": {"by": "header"}}
        )
    with pytest.raises(ValueError, match="is not a network"):
        UpstreamSpec.model_validate(
            {
                "algorithm": "geo",
                "targets": [{"url": "http://a:80", "region": "eu"}],
                "geo": {"networks": {"x": "eu"}},
            }
        )
