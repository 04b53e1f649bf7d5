"""Streaming benchmark: publish throughput of the event stream resource, and event → run started latency.

Throughput (in this process): `open_event_stream(...)` publishing to a declared stream whose payload
JSON Schema is validated on every event, one by one (`publish`) and batched (`publish_batch`, 1000
per call), on Redis (database 14, flushed first), SQLite and PostgreSQL (database
`junction_bench_streams`, recreated; each store migrated with `orchestration.store.upgrade`).
Idempotency keys are off for the throughput figures and measured separately with a key per event.
Peers on the same Redis: raw redis-py `XADD` one by one and pipelined (×100, ×1000) with the same JSON
payload (encoded before the clock starts: the peer is redis-py alone), and a `redis-benchmark` ceiling (`-t xadd` where the binary supports it, else the same
`XADD key * payload <json>` as a custom command, 50 clients, pipeline 100).

Latency: starts a real `junction dev` on a temporary copy of the project (fresh JUNCTION_HOME, the
embedded SQLite store) with one extra analyst module under `assets/` that declares a per-event
`StreamTrigger` (`minimum_interval_seconds=1`) on a no-op job, publishes events one at a time a few
seconds apart and measures, for each, publish → the run's `startTime` in Dagster (GraphQL
`runsOrError` filtered on the trigger's `junction/events_first` tag).

    .venv/bin/python benchmarks/streaming.py [--events 20000] [--single-events 2000]
        [--latency-events 20] [--json results.json] [--no-latency]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from support import free_port, pct, platform_env, platform_ready, project_copy, wait_for  # noqa: E402  (benchmarks/ is on sys.path)

# This process must not pick up a developer's platform settings (e.g. JUNCTION_REDIS_URL would
# silently turn the SQL measurements into Redis ones): every URL below is passed explicitly.
for _name in [name for name in os.environ if name.startswith("JUNCTION_")]:
    del os.environ[_name]

REDIS_URL = "redis://127.0.0.1:6379/14"
REDIS_DB = 14
POSTGRES_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
POSTGRES_DB = "junction_bench_streams"
BATCH = 1000
LATENCY_STREAM = "bench.latency"

SCHEMA = {
    "type": "object",
    "required": ["order_id", "amount", "currency", "placed_at"],
    "properties": {
        "order_id": {"type": "integer", "minimum": 1},
        "amount": {"type": "number", "minimum": 0},
        "currency": {"type": "string", "enum": ["EUR", "USD", "GBP"]},
        "placed_at": {"type": "string", "minLength": 10},
        "items": {"type": "array", "items": {"type": "string"}, "maxItems": 20},
    },
    "additionalProperties": False,
}

ANALYST_MODULE = '''"""Benchmark only (benchmarks/streaming.py): one run of a no-op job per event of bench.latency."""

import dagster as dg

from sensors.event_triggers import JobTarget, StreamTrigger


@dg.op
def bench_stream_noop() -> None:
    pass


@dg.job
def bench_stream_job():
    bench_stream_noop()


bench_stream_trigger = StreamTrigger(
    name="bench_stream_trigger",
    stream="bench.latency",
    target=JobTarget(bench_stream_job),
    minimum_interval_seconds=1,
).sensor()
'''

RUNS_QUERY = """
query($filter: RunsFilter) {
  runsOrError(filter: $filter) { ... on Runs { results { runId status startTime } } }
}
"""


def payload(index: int) -> dict:
    return {
        "order_id": index + 1,
        "amount": round((index * 37) % 100_000 / 100, 2),
        "currency": ("EUR", "USD", "GBP")[index % 3],
        "placed_at": "2026-11-28T17:00:00Z",
        "items": ["sku-1", "sku-2"],
    }


# --- throughput through the resource --------------------------------------------------------------


def declare(store_url: str, name: str) -> None:
    from resources.event_stream import StreamRegistry, StreamSpec

    StreamRegistry.for_url(store_url).upsert(
        StreamSpec(name=name, payload_schema=SCHEMA, idempotency_window=3600)
    )


def timed_publish(stream, name: str, count: int, *, batched: bool, keyed: bool, tag: str) -> float:
    """Events per second publishing `count` events to `name` (payloads built before the clock starts)."""
    from resources.event_stream import EventToPublish

    payloads = [payload(index) for index in range(count)]
    keys = [f"{tag}-{index}" if keyed else None for index in range(count)]
    accepted = 0
    started = time.perf_counter()
    if batched:
        for start in range(0, count, BATCH):
            chunk = [
                EventToPublish(payloads[i], keys[i]) if keyed else payloads[i]
                for i in range(start, min(start + BATCH, count))
            ]
            accepted += len(stream.publish_batch(name, chunk).accepted)
    else:
        for index in range(count):
            accepted += (
                stream.publish(name, payloads[index], idempotency_key=keys[index]).status == "accepted"
            )
    elapsed = time.perf_counter() - started
    if accepted != count:
        raise RuntimeError(f"{name}: {accepted} of {count} events accepted")
    return count / elapsed


def measure_backend(label: str, redis_url: str | None, store_url: str, events: int, single: int) -> dict:
    from resources.event_stream import open_event_stream

    figures = {}
    cases = [
        ("single", False, False, single),
        ("batched", True, False, events),
        ("single_idempotent", False, True, single),
        ("batched_idempotent", True, True, events),
    ]
    with open_event_stream(redis_url=redis_url, store_url=store_url) as stream:
        expected = "redis" if redis_url else "sql"
        if expected not in stream.backend:
            raise RuntimeError(f"{label}: expected the {expected} backend, got {stream.backend}")
        # Warm up: registry cache, validator compilation, connections, Lua script loading.
        declare(store_url, "bench.warmup")
        stream.publish_batch("bench.warmup", [payload(i) for i in range(200)])
        stream.publish("bench.warmup", payload(0), idempotency_key="warm")
        for case, batched, keyed, count in cases:
            name = f"bench.{case.replace('_', '-')}"
            declare(store_url, name)
            print(f"  {label}: {case} ({count} events) ...", file=sys.stderr)
            figures[case] = timed_publish(stream, name, count, batched=batched, keyed=keyed, tag=case)
    return figures


def prepare_postgres() -> str:
    from sqlalchemy import create_engine, text

    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"DROP DATABASE IF EXISTS {POSTGRES_DB} WITH (FORCE)"))
        connection.execute(text(f"CREATE DATABASE {POSTGRES_DB}"))
    admin.dispose()
    return POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{POSTGRES_DB}"


# --- the Redis peers ------------------------------------------------------------------------------


def raw_xadd(client, count: int, pipeline_size: int | None) -> float:
    """redis-py's own XADD throughput: the JSON texts are encoded before the clock starts (timed, a
    `json.dumps` per event, which builds an encoder on each call, was part of the peer's figure)."""
    key = f"bench:raw:{pipeline_size or 1}"
    texts = [json.dumps(payload(index), separators=(",", ":")) for index in range(count)]
    started = time.perf_counter()
    if pipeline_size is None:
        for text in texts:
            client.xadd(key, {"payload": text})
    else:
        for start in range(0, count, pipeline_size):
            pipe = client.pipeline(transaction=False)
            for text in texts[start : start + pipeline_size]:
                pipe.xadd(key, {"payload": text})
            pipe.execute()
    elapsed = time.perf_counter() - started
    return count / elapsed


def redis_benchmark(count: int) -> tuple[float | None, str]:
    """The redis-benchmark XADD ceiling (events/s) and how it was obtained."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return None, "redis-benchmark not found"
    common = [binary, "-h", "127.0.0.1", "-p", "6379", "--dbnum", str(REDIS_DB), "-n", str(count), "--csv"]

    def rps(output: str) -> float | None:
        # The test name (first column) holds the command with its unescaped JSON: read the seven
        # numeric columns from the right (rps, avg, min, p50, p95, p99, max latency).
        lines = [line for line in output.splitlines()[1:] if line.strip()]
        return float(lines[0].rsplit(",", 7)[1].strip('"')) if lines else None

    builtin = subprocess.run([*common, "-t", "xadd"], capture_output=True, text=True, timeout=120)
    value = rps(builtin.stdout)
    if value is not None:
        return value, "-t xadd"
    item = json.dumps(payload(0), separators=(",", ":"))
    custom = subprocess.run(
        [*common, "-c", "50", "-P", "100", "XADD", "bench:redis-benchmark", "*", "payload", item],
        capture_output=True,
        text=True,
        timeout=120,
    )
    value = rps(custom.stdout)
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.split()[1]
    note = f"redis-benchmark {version} has no xadd test (-t xadd ran nothing): custom XADD, -c 50 -P 100"
    return value, note


# --- event → run started latency ------------------------------------------------------------------


def find_run(dagster: httpx.Client, event_id: str, timeout_s: float = 120) -> dict:
    """The run the trigger launched for `event_id`, once it has a start time."""
    variables = {"filter": {"tags": [{"key": "junction/events_first", "value": event_id}]}}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        data = dagster.post("/graphql", json={"query": RUNS_QUERY, "variables": variables}).json()
        results = data["data"]["runsOrError"].get("results") or []
        if results and results[0].get("startTime"):
            return results[0]
        time.sleep(0.05)
    raise TimeoutError(f"no run started for event {event_id} within {timeout_s} s")


def wait_finished(dagster: httpx.Client, event_id: str, timeout_s: float = 120) -> None:
    variables = {"filter": {"tags": [{"key": "junction/events_first", "value": event_id}]}}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        data = dagster.post("/graphql", json={"query": RUNS_QUERY, "variables": variables}).json()
        results = data["data"]["runsOrError"].get("results") or []
        if results and results[0]["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
            return
        time.sleep(0.2)
    raise TimeoutError(f"the run of event {event_id} did not finish")


def measure_latency(count: int, gap_s: float) -> list[float]:
    from resources.event_stream import open_event_stream

    env = platform_env()
    with tempfile.TemporaryDirectory() as tmp:
        project = project_copy(Path(tmp), {"bench_stream_trigger.py": ANALYST_MODULE})
        streams_dir = Path(tmp) / "streams"
        streams_dir.mkdir()
        (streams_dir / "bench-latency.yaml").write_text(
            json.dumps({"name": LATENCY_STREAM, "payload_schema": SCHEMA})  # JSON is YAML
        )
        home = Path(tmp) / "home"
        env.update(
            JUNCTION_HOME=str(home),
            JUNCTION_STREAMS_DIR=str(streams_dir),
            PYTHONPATH=str(project),  # the copy (with the module) before the editable install
        )
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log_path = Path(tmp) / "junction-dev.log"
        with log_path.open("w") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "orchestration.cli", "dev", "--port", str(port)],
                env=env,
                cwd=project,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            latencies: list[float] = []
            try:
                print("  waiting for junction dev ...", file=sys.stderr)
                wait_for(lambda: platform_ready(base), process=process, poll_s=0.2)
                store_url = f"sqlite:///{home / 'platform.db'}"
                with (
                    open_event_stream(redis_url=None, store_url=store_url) as stream,
                    httpx.Client(base_url=base, timeout=60) as dagster,
                ):

                    def one(index: int) -> float:
                        sent = time.time()
                        result = stream.publish(LATENCY_STREAM, payload(index))
                        run = find_run(dagster, result.id)
                        wait_finished(dagster, result.id)  # one at a time: latency, not queueing
                        return run["startTime"] - sent

                    print("  warm-up event (first tick and first launch) ...", file=sys.stderr)
                    one(0)
                    for index in range(1, count + 1):
                        time.sleep(gap_s)
                        latencies.append(one(index))
                        print(f"  event {index}/{count}: {latencies[-1]:.2f} s to run start", file=sys.stderr)
            except Exception:
                log.flush()
                print(log_path.read_text()[-4000:], file=sys.stderr)
                raise
            finally:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
    return latencies


# --- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=20_000, help="events per batched case (default 20000)")
    parser.add_argument(
        "--single-events", type=int, default=2_000, help="events per one-by-one case (default 2000)"
    )
    parser.add_argument(
        "--latency-events", type=int, default=20, help="events for the latency (default 20, min 20)"
    )
    parser.add_argument("--gap", type=float, default=2.0, help="seconds between latency events (default 2)")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    parser.add_argument(
        "--no-latency", action="store_true", help="throughput only (no junction dev, no latency figures)"
    )
    args = parser.parse_args()
    if args.latency_events < 20 and not args.no_latency:
        parser.error("--latency-events must be at least 20 (p95)")

    import redis

    from orchestration.store import upgrade

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    backends: dict[str, dict] = {}
    peers: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # The Redis backend keeps its registry in a platform store: a SQLite one of its own.
        registry_url = f"sqlite:///{Path(tmp) / 'redis-registry.db'}"
        sqlite_url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        postgres_url = prepare_postgres()
        for url in (registry_url, sqlite_url, postgres_url):
            upgrade(url)
        # The raw peers right before the resource on the same Redis: on a shared machine the load
        # changes from minute to minute, and the ratios are only fair between neighbouring figures.
        print("raw redis-py XADD ...", file=sys.stderr)
        raw_xadd(client, 1000, 100)  # warm the connection
        peers["single"] = raw_xadd(client, args.single_events, None)
        peers["pipelined_100"] = raw_xadd(client, args.events, 100)
        peers["pipelined_1000"] = raw_xadd(client, args.events, 1000)
        print("publish throughput through the resource ...", file=sys.stderr)
        backends["redis"] = measure_backend("redis", REDIS_URL, registry_url, args.events, args.single_events)
        backends["sqlite"] = measure_backend("sqlite", None, sqlite_url, args.events, args.single_events)
        backends["postgres"] = measure_backend(
            "postgres", None, postgres_url, args.events, args.single_events
        )
    print("redis-benchmark ...", file=sys.stderr)
    ceiling, ceiling_note = redis_benchmark(max(args.events * 10, 100_000))
    client.flushdb()
    client.close()

    latencies: list[float] = []
    if not args.no_latency:
        print("event → run started latency through a sensor (junction dev) ...", file=sys.stderr)
        latencies = measure_latency(args.latency_events, args.gap)

    raw_1000 = peers["pipelined_1000"]
    print(f"\n{'publish, validation on':<34} {'one by one ev/s':>16} {'batched ×1000 ev/s':>19}", end="")
    print(f" {'÷ raw XADD ×1000':>17}")
    for backend, figures in backends.items():
        for keyed, label in ((False, "idempotency keys off"), (True, "idempotency keys on")):
            single = figures["single_idempotent" if keyed else "single"]
            batched = figures["batched_idempotent" if keyed else "batched"]
            name = f"{backend}, {label}"
            print(f"{name:<34} {single:>16,.0f} {batched:>19,.0f} {batched / raw_1000:>16.2f}x")
    print(f"{'raw redis-py XADD (peer)':<34} {peers['single']:>16,.0f}", end="")
    print(f" {raw_1000:>19,.0f} {1:>16.2f}x")
    print(f"{'raw redis-py XADD pipelined ×100':<34} {'':>16} {peers['pipelined_100']:>19,.0f}")
    if ceiling is not None:
        print(f"{'redis-benchmark XADD (ceiling)':<34} {'':>16} {ceiling:>19,.0f}   ({ceiling_note})")
    else:
        print(f"redis-benchmark ceiling: not measured ({ceiling_note})")
    redis_batched = backends["redis"]["batched"]
    print(
        f"\nRedis batched vs raw XADD ×100: {redis_batched / peers['pipelined_100']:.2f}x   "
        f"vs ×1000: {redis_batched / raw_1000:.2f}x"
        + (f"   vs redis-benchmark: {redis_batched / ceiling:.2f}x" if ceiling else "")
    )
    print(f"Redis one by one vs raw XADD one by one: {backends['redis']['single'] / peers['single']:.2f}x")
    if latencies:
        print(
            f"\nevent published → Dagster run started (per-event StreamTrigger, minimum_interval_seconds=1, "
            f"{len(latencies)} events): p50 {pct(latencies, 50):.2f} s   p95 {pct(latencies, 95):.2f} s   "
            f"min {min(latencies):.2f} s   max {max(latencies):.2f} s"
        )

    if args.json:
        figures: dict[str, float | int | None] = {}
        for backend, values in backends.items():
            for case, value in values.items():
                figures[f"{backend}_{case}_events_per_s"] = round(value)
        figures.update(
            raw_xadd_single_events_per_s=round(peers["single"]),
            raw_xadd_pipelined_100_events_per_s=round(peers["pipelined_100"]),
            raw_xadd_pipelined_1000_events_per_s=round(raw_1000),
            redis_benchmark_xadd_events_per_s=round(ceiling) if ceiling else None,
            ratio_redis_batched_vs_raw_xadd_1000_x=round(redis_batched / raw_1000, 3),
            ratio_redis_batched_vs_raw_xadd_100_x=round(redis_batched / peers["pipelined_100"], 3),
            ratio_redis_batched_vs_redis_benchmark_x=round(redis_batched / ceiling, 3) if ceiling else None,
            ratio_redis_single_vs_raw_xadd_single_x=round(backends["redis"]["single"] / peers["single"], 3),
            ratio_sqlite_batched_vs_raw_xadd_1000_x=round(backends["sqlite"]["batched"] / raw_1000, 3),
            ratio_postgres_batched_vs_raw_xadd_1000_x=round(backends["postgres"]["batched"] / raw_1000, 3),
            event_to_run_start_p50_s=round(pct(latencies, 50), 3) if latencies else None,
            event_to_run_start_p95_s=round(pct(latencies, 95), 3) if latencies else None,
            event_to_run_start_max_s=round(max(latencies), 3) if latencies else None,
            latency_events_count=len(latencies),
        )
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
