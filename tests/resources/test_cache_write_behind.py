"""Write-behind through the real event stream (SQL on SQLite and PostgreSQL, and Redis Streams): writes
acknowledged once queued, applied in batches in order per key, and none lost to a SIGKILLed process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cache_origin
import pytest
import yaml
from support import wait_until

from resources.cache import close_caches, open_cache
from resources.cache.write_behind import WriteNotQueued

STREAM = "cache.profiles.writes"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def fresh_caches():
    close_caches()
    yield
    close_caches()


@pytest.fixture
def origin(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "origin.db"
    monkeypatch.setenv("JUNCTION_TEST_CACHE_ORIGIN", str(path))
    return path


def _declare_stream(store_url: str, payload_schema: dict | None = None) -> None:
    from orchestration.store.db import get_engine
    from resources.event_stream.registry import StreamRegistry, StreamSpec

    StreamRegistry(get_engine(store_url)).upsert(
        StreamSpec(name=STREAM, description="cache write-behind", payload_schema=payload_schema)
    )


def _caches_file(path: Path, **write_behind) -> str:
    options = {
        "stream": STREAM,
        "writer": "cache_origin:apply_writes",
        "background": False,
        **write_behind,
    }
    namespaces = {"profiles": {"layers": ["memory", "database"], "ttl": "1h", "write_behind": options}}
    path.write_text(yaml.safe_dump({"namespaces": namespaces}))
    return str(path)


@pytest.fixture(params=["sql", "redis"])
def stream_redis_url(request) -> str | None:
    return request.getfixturevalue("clean_redis_url") if request.param == "redis" else None


def test_writes_are_queued_then_applied_in_batches_newest_per_key(
    store_url, stream_redis_url, origin, tmp_path
):
    _declare_stream(store_url)
    caches_file = _caches_file(tmp_path / "caches.yaml", batch_size=3)
    cache = open_cache(
        "profiles", redis_url=stream_redis_url, database_url=store_url, caches_file=caches_file
    )
    for round_number in range(3):
        for customer in ("ann", "bob"):
            cache.set(customer, f"{customer}-{round_number}")
    cache.delete("bob")
    # Acknowledged and readable at once, not yet at the origin (no flusher runs in the background).
    assert cache.get("ann") == "ann-2" and cache.get("bob") is None
    assert cache_origin.applied() == [] and cache.write_behind.pending() == 7
    assert cache.write_behind.flush() == 7
    assert cache_origin.state() == {"ann": "ann-2"}
    # Batches of three, newest per key in each: (ann-0, bob-0, ann-1) -> bob-0, ann-1; and so on.
    assert [row[:2] for row in cache_origin.applied()] == [
        ("bob", "bob-0"),
        ("ann", "ann-1"),
        ("ann", "ann-2"),
        ("bob", "bob-2"),
        ("bob", None),
    ]
    assert cache.write_behind.pending() == 0
    assert cache.to_json()["write_behind"] == {
        "stream": STREAM,
        "queued": 7,
        "applied": 7,
        "failures": 0,
        "lost": 0,
    }


def test_a_failing_origin_keeps_the_batch_and_gets_it_again(store_url, origin, tmp_path):
    _declare_stream(store_url)
    cache = open_cache("profiles", database_url=store_url, caches_file=_caches_file(tmp_path / "caches.yaml"))
    cache.set("ann", 1)
    Path(str(origin) + ".fail").touch()
    assert cache.write_behind.flush() == 0
    assert cache.write_behind.failures == 1 and cache.write_behind.pending() == 1
    cache.set("ann", 2)
    Path(str(origin) + ".fail").unlink()
    assert cache.write_behind.flush() == 2
    assert [row[:2] for row in cache_origin.applied()] == [("ann", "1"), ("ann", "2")], (
        "pending first, in order"
    )


def test_an_undeclared_stream_or_writer_is_named(store_url, tmp_path):
    from resources.event_stream import StreamNotFound

    with pytest.raises(StreamNotFound, match=STREAM):
        open_cache("profiles", database_url=store_url, caches_file=_caches_file(tmp_path / "a.yaml"))
    close_caches()
    _declare_stream(store_url)
    with pytest.raises(Exception, match="cannot import nowhere:save"):
        open_cache(
            "profiles",
            database_url=store_url,
            caches_file=_caches_file(tmp_path / "b.yaml", writer="nowhere:save"),
        )


def test_a_value_that_cannot_be_stored_is_neither_queued_nor_written(store_url, origin, tmp_path):
    _declare_stream(store_url)
    cache = open_cache("profiles", database_url=store_url, caches_file=_caches_file(tmp_path / "caches.yaml"))
    with pytest.raises(TypeError, match="json values only"):
        cache.set("ann", {1, 2})  # a set is not JSON: refused before anything is queued or written
    assert cache.get("ann") is None and cache.write_behind.pending() == 0


def test_a_write_the_stream_refuses_is_not_acknowledged_nor_cached(store_url, origin, tmp_path):
    schema = {"type": "object", "properties": {"value": {"type": "integer"}}}
    _declare_stream(store_url, payload_schema=schema)
    cache = open_cache("profiles", database_url=store_url, caches_file=_caches_file(tmp_path / "caches.yaml"))
    cache.set("ann", 1)
    with pytest.raises(WriteNotQueued, match="refused by the stream"):
        cache.set("ann", "not a number")
    assert cache.get("ann") == 1, "the refused write reached no layer"
    assert cache.write_behind.flush() == 1 and cache_origin.state() == {"ann": "1"}


WRITER_PROCESS = """
import sys
from resources.cache import open_cache
cache = open_cache("profiles", redis_url={redis_url!r}, database_url={store_url!r}, caches_file={caches_file!r})
for round_number in range(4):
    for number in range(40):
        cache.set(f"k{{number}}", f"{{round_number}}")
        print(f"acked k{{number}} {{round_number}}", flush=True)
print("done", flush=True)
import time
time.sleep(600)
"""


@pytest.mark.parametrize("backend", ["sqlite-sql", "postgres-redis"])
def test_a_killed_process_loses_no_acknowledged_write(
    backend, request, junction_home, origin, tmp_path, monkeypatch
):
    from orchestration.store import upgrade

    if backend == "sqlite-sql":  # the embedded default: SQLite store, SQL event stream
        store_url, redis_url = f"sqlite:///{junction_home / 'platform.db'}", None
    else:
        store_url, redis_url = (
            request.getfixturevalue("clean_postgres_url"),
            request.getfixturevalue("clean_redis_url"),
        )
    upgrade(store_url)
    _declare_stream(store_url)
    # The killed process flushes slowly (a batch of 5 every 0.1 s, 0.2 s per batch): most of its writes
    # are still queued, and one batch is being applied, when it dies.
    caches_file = _caches_file(
        tmp_path / "caches.yaml", batch_size=5, flush_interval="100ms", lease="1s", background=True
    )
    env = {**os.environ, "JUNCTION_TEST_CACHE_ORIGIN_DELAY_S": "0.2", "PYTHONPATH": str(REPO / "tests")}
    script = WRITER_PROCESS.format(redis_url=redis_url, store_url=store_url, caches_file=caches_file)
    writer = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    acknowledged = {}
    for line in writer.stdout:
        if line.strip() == "done":
            break
        _, key, value = line.split()
        acknowledged[key] = value
    wait_until(lambda: cache_origin.applied(), 10, "the killed process to have applied a first batch")
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(timeout=10)
    before_restart = cache_origin.state()
    assert len(acknowledged) == 40 and before_restart != acknowledged, "writes were still queued at the kill"

    # A new process opening the namespace drains the queue once the dead flusher's lease ran out.
    monkeypatch.setenv("JUNCTION_TEST_CACHE_ORIGIN_DELAY_S", "0")
    cache = open_cache("profiles", redis_url=redis_url, database_url=store_url, caches_file=caches_file)
    deadline = time.monotonic() + 15
    while cache.write_behind.pending() and time.monotonic() < deadline:
        cache.write_behind.flush()
        time.sleep(0.1)
    assert cache.write_behind.pending() == 0
    assert cache_origin.state() == acknowledged == {f"k{n}": "3" for n in range(40)}
    # In order per key: each key's applied values never go back to an older round.
    seen: dict[str, list[int]] = {}
    for key, value, _, _ in cache_origin.applied():
        seen.setdefault(key, []).append(int(value))
    assert all(values == sorted(values) for values in seen.values()), seen


def test_the_cli_drains_the_queue_and_says_when_the_writer_fails(store_url, origin, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from orchestration.cli import cli
    from orchestration.settings import reset_settings_cache

    _declare_stream(store_url)
    monkeypatch.setenv("JUNCTION_CACHES_FILE", _caches_file(tmp_path / "caches.yaml", batch_size=2))
    reset_settings_cache()
    cache = open_cache("profiles")
    for number in range(5):
        cache.set(f"k{number}", number)
    Path(str(origin) + ".fail").touch()
    failed = CliRunner().invoke(cli, ["cache", "flush", "profiles"])
    assert failed.exit_code == 1 and "5 write(s) stay queued" in failed.output, failed.output
    Path(str(origin) + ".fail").unlink()
    drained = CliRunner().invoke(cli, ["cache", "flush", "profiles"])
    assert drained.exit_code == 0, drained.output
    assert "5 write(s) applied" in drained.output and cache_origin.state() == {
        f"k{n}": str(n) for n in range(5)
    }
    unknown = CliRunner().invoke(cli, ["cache", "flush", "default"])
    assert unknown.exit_code == 2 and "declares no write_behind" in unknown.output
