"""The cache's Redis layer scaled out: a real local 3-node Redis Cluster, and a consistent-hashing ring
of independent servers (three Redis databases of the machine's server: separate keyspaces)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from support import free_cluster_port, free_port, service_unavailable, wait_until

from resources.cache import close_caches, open_cache
from resources.cache.layers import RedisLayer
from resources.cache.topology import RedisTopology, RedisTopologySpec


def _start_servers(
    directory: Path, count: int, *extra: str, cluster: bool = False
) -> tuple[list[subprocess.Popen], list[int]]:
    """`count` redis-servers of this test's own on free ports, keeping nothing on disk."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        service_unavailable("redis-server and redis-cli (Debian's redis-server package) for local servers")
    ports: list[int] = []
    while len(ports) < count:  # distinct: nothing listens on them until all are chosen
        port = free_cluster_port() if cluster else free_port()
        if port not in ports and port + 10000 not in ports and port - 10000 not in ports:
            ports.append(port)
    servers = []
    for port in ports:
        node = directory / str(port)
        node.mkdir()
        servers.append(
            subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(node),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--logfile",
                    str(node / "redis.log"),
                    *extra,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
            )
        )
    for port, server in zip(ports, servers, strict=True):
        log = directory / str(port) / "redis.log"

        def ready(port=port, server=server, log=log) -> bool:
            if server.poll() is not None:
                raise AssertionError(f"redis-server on port {port} exited: {log.read_text()[-2000:]}")
            reply = subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True)
            return reply.stdout.strip() == b"PONG"

        # Generous: on a loaded CI machine a server can take seconds to answer its first ping.
        wait_until(ready, 60, f"redis-server on port {port}", poll_s=0.1)
    return servers, ports


def _stop(servers: list[subprocess.Popen]) -> None:
    for server in servers:
        server.terminate()
    for server in servers:
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster_ports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[int]]:
    """A real 3-node Redis Cluster (no replicas), as `redis-cli --cluster create` makes one."""
    directory = tmp_path_factory.mktemp("redis-cluster")
    servers, ports = _start_servers(
        directory, 3, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", cluster=True
    )
    try:
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *[f"127.0.0.1:{port}" for port in ports],
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        for _ in range(200):
            info = subprocess.run(
                ["redis-cli", "-p", str(ports[0]), "cluster", "info"], capture_output=True, text=True
            )
            if "cluster_state:ok" in info.stdout:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"the cluster did not come up: {info.stdout}")
        yield ports
    finally:
        _stop(servers)


@pytest.fixture(scope="module")
def ring_urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Four independent Redis servers (the ring uses three, or four to see what a new node moves)."""
    servers, ports = _start_servers(tmp_path_factory.mktemp("redis-ring"), 4)
    yield [f"redis://127.0.0.1:{port}/0" for port in ports]
    _stop(servers)


@pytest.fixture(autouse=True)
def fresh_caches():
    close_caches()
    yield
    close_caches()


def _caches_file(path: Path, redis: dict) -> str:
    namespaces = {"shared": {"layers": ["memory", "redis"], "ttl": "1h"}}
    path.write_text(yaml.safe_dump({"redis": redis, "namespaces": namespaces}))
    return str(path)


def test_a_redis_cluster_holds_the_layer_across_its_slots(
    cluster_ports, tmp_path, junction_home, monkeypatch
):
    import redis

    monkeypatch.setenv(
        "JUNCTION_TEST_CACHE_CLUSTER", ",".join(f"redis://127.0.0.1:{p}" for p in cluster_ports)
    )
    caches_file = _caches_file(
        tmp_path / "caches.yaml", {"mode": "cluster", "urls_env": "JUNCTION_TEST_CACHE_CLUSTER"}
    )
    cache = open_cache("shared", caches_file=caches_file)
    assert [layer.name for layer in cache.layers] == ["memory", "redis"]
    for number in range(300):
        cache.set(f"customer:{number}", {"id": number}, tags=[f"region:{number % 3}"])
    # Every node holds part of the keys: the slots spread them.
    per_node = [redis.Redis(port=port).dbsize() for port in cluster_ports]
    assert all(count > 0 for count in per_node) and sum(per_node) >= 300, per_node
    cache.memory.delete([f"customer:{number}" for number in range(300)])
    assert cache.get("customer:7") == {"id": 7}, "read from the cluster after memory forgot it"
    assert cache.to_json()["layers"]["redis"]["hits"] == 1
    dropped = cache.invalidate_tags("region:1")
    assert dropped == {f"customer:{number}" for number in range(300) if number % 3 == 1}
    assert cache.get("customer:7") is None and cache.get("customer:8") == {"id": 8}
    # A cold key across the cluster: the load lock lives on one slot, the loader runs once.
    calls = []
    assert cache.get_or_set("cold", lambda: calls.append(1) or "loaded") == "loaded"
    assert cache.get_or_set("cold", lambda: calls.append(1) or "again") == "loaded" and calls == [1]


def test_invalidations_reach_another_process_on_a_cluster(cluster_ports, tmp_path, junction_home):
    urls = [f"redis://127.0.0.1:{port}" for port in cluster_ports]
    caches_file = _caches_file(tmp_path / "caches.yaml", {"mode": "cluster", "urls": urls})
    cache = open_cache("shared", caches_file=caches_file)
    cache.set("k", "old")
    assert cache.get("k") == "old"  # now in this process's memory too
    script = (
        "from resources.cache import open_cache\n"
        f"open_cache('shared', caches_file={caches_file!r}).delete('k')\n"
    )
    import sys

    subprocess.run(
        [sys.executable, "-c", script], check=True, cwd=Path(__file__).resolve().parents[2], timeout=60
    )
    deadline = time.monotonic() + 2
    while cache.memory.get("k") is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cache.memory.get("k") is None, "the other process's delete dropped this process's memory entry"


def test_a_ring_spreads_keys_and_a_new_node_moves_about_its_share(ring_urls):
    three = RedisTopology.connect(RedisTopologySpec(mode="ring", urls=ring_urls[:3]), None)
    four = RedisTopology.connect(RedisTopologySpec(mode="ring", urls=ring_urls), None)
    names = [f"jc:shared:v1:{{customer:{number}}}" for number in range(20_000)]
    before = [three.urls[three.clients.index(three.client_for(name))] for name in names]
    after = [four.urls[four.clients.index(four.client_for(name))] for name in names]
    shares = {url: before.count(url) / len(names) for url in three.urls}
    assert all(0.25 < share < 0.42 for share in shares.values()), shares
    moved = sum(1 for old, new in zip(before, after, strict=True) if old != new) / len(names)
    # Ideal: 1/4 of the keys move, all of them to the new node, and nothing else moves.
    assert 0.18 < moved < 0.32, moved
    assert all(new == ring_urls[3] for old, new in zip(before, after, strict=True) if old != new)
    three.close()
    four.close()


def test_the_ring_layer_reads_back_and_invalidates_by_tag(ring_urls, tmp_path, junction_home):
    import redis

    for url in ring_urls:
        redis.Redis.from_url(url).flushdb()
    caches_file = _caches_file(tmp_path / "caches.yaml", {"mode": "ring", "urls": ring_urls[:3]})
    cache = open_cache("shared", caches_file=caches_file)
    for number in range(200):
        cache.set(f"k{number}", number, tags=["even" if number % 2 == 0 else "odd"])
    sizes = [redis.Redis.from_url(url).dbsize() for url in ring_urls[:3]]
    assert all(size > 30 for size in sizes), sizes
    layer = next(layer for layer in cache.layers if isinstance(layer, RedisLayer))
    cache.memory.delete([f"k{number}" for number in range(200)])
    assert [cache.get(f"k{number}") for number in range(5)] == [0, 1, 2, 3, 4]
    assert cache.invalidate_tags("even") == {f"k{number}" for number in range(0, 200, 2)}
    assert layer.get("k2") is None and layer.get("k3") is not None


def test_a_topology_without_servers_is_refused_in_the_kernel_format(tmp_path):
    from orchestration.kernel.spec_errors import SpecError
    from resources.cache.config import load_caches_file

    path = tmp_path / "caches.yaml"
    path.write_text(yaml.safe_dump({"redis": {"mode": "cluster"}}))
    with pytest.raises(SpecError) as error:
        load_caches_file(path)
    assert "caches.yaml" in str(error.value) and "redis" in str(error.value) and "urls" in str(error.value)
