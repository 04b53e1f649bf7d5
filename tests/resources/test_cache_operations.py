"""Operating the cache: figures summed across processes, sampled key reads and warming (CLI, asset and
on start), adaptive sizing of the memory layer, and early probabilistic refresh."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml
from click.testing import CliRunner
from support import wait_until

from orchestration.cli import cli
from resources.cache import close_caches, open_cache
from resources.cache.reporting import stored_figures, top_keys
from resources.cache.resource import report_figures_now

REPO = Path(__file__).resolve().parents[2]
NAMESPACES = {
    "namespaces": {
        "rates": {
            "layers": ["memory", "database"],
            "warm": {"loader": "tests_warm_loader:rate", "top": 3, "match": "rate:*"},
        },
        "sized": {
            "layers": ["memory"],
            "memory": {
                "max_bytes": 400_000,
                "min_bytes": 20_000,
                "max_entries": 100_000,
                "target_hit_rate": 0.9,
            },
        },
        "early": {"layers": ["memory"], "ttl": "1h", "early_refresh": 1.0},
    }
}


@pytest.fixture(autouse=True)
def fresh_caches():
    close_caches()
    yield
    close_caches()


@pytest.fixture
def caches_file(tmp_path: Path, monkeypatch) -> str:
    from orchestration.settings import reset_settings_cache

    path = tmp_path / "caches.yaml"
    path.write_text(yaml.safe_dump(NAMESPACES))
    # The warm loader lives in a module of the test's own, importable by name in any process.
    (tmp_path / "tests_warm_loader.py").write_text(
        "CALLS = []\n"
        "def rate(key):\n"
        "    CALLS.append(key)\n"
        "    if key == 'rate:XXX':\n"
        "        raise LookupError('no such currency')\n"
        "    return {'currency': key.split(':')[1], 'rate': 1.5}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{REPO / 'tests'}")
    monkeypatch.setenv("JUNCTION_CACHES_FILE", str(path))
    reset_settings_cache()
    return str(path)


def _engine(store_url):
    from orchestration.store.db import get_engine

    return get_engine(store_url)


def test_figures_are_summed_over_the_processes_that_reported(store_url, caches_file):
    script = (
        "from resources.cache import open_cache\n"
        "from resources.cache.resource import report_figures_now\n"
        "cache = open_cache('rates')\n"
        "cache.set('rate:EUR', 1)\n"
        "for _ in range(30): cache.get('rate:EUR')\n"
        "cache.get('rate:GBP')\n"
        "report_figures_now()\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, timeout=60)
    cache = open_cache("rates")
    for _ in range(10):
        cache.get("rate:EUR")
    report_figures_now()
    merged = stored_figures(_engine(store_url))["rates"]
    assert merged["processes"] == 2
    assert (merged["gets"], merged["hits"]) == (41, 40)
    memory = merged["layers"]["memory"]
    # The other process read its own memory 30 times; this one read the database once, then its memory.
    assert (memory["hits"], merged["layers"]["database"]["hits"]) == (39, 1)
    assert memory["hit_p99_us"] is not None and merged["hit_rate"] == round(40 / 41, 4)
    stats = CliRunner().invoke(cli, ["cache", "stats", "rates"])
    assert stats.exit_code == 0, stats.output
    assert "2 process(es)" in stats.output and "97.6%" in stats.output
    as_json = CliRunner().invoke(cli, ["cache", "stats", "--json"])
    assert as_json.exit_code == 0 and '"processes": 2' in as_json.output


def test_reads_are_sampled_per_key_and_warming_loads_the_most_read(store_url, caches_file):
    import tests_warm_loader

    tests_warm_loader.CALLS.clear()

    cache = open_cache("rates")
    reads = {"rate:EUR": 800, "rate:USD": 400, "rate:XXX": 200, "rate:GBP": 100, "other:1": 1000}
    for key, count in reads.items():
        for _ in range(count):
            cache.get(key)
    report_figures_now()
    ranked = top_keys(_engine(store_url), "rates", 10)
    assert [key for key, _ in ranked] == ["other:1", "rate:EUR", "rate:USD", "rate:XXX", "rate:GBP"]
    # One read in 16 is counted: about 1000/16 for the most read.
    assert 40 <= ranked[0][1] <= 90, ranked
    warmed = CliRunner().invoke(cli, ["cache", "warm", "rates"])
    # The loader knows rate keys only (match), three of them (top): EUR, USD and XXX, which fails.
    assert warmed.exit_code == 1, warmed.output
    assert "warmed 2 of 3 most read key(s)" in warmed.output and "1 failed" in warmed.output
    assert "rate:XXX: no such currency" in warmed.output
    assert sorted(tests_warm_loader.CALLS) == ["rate:EUR", "rate:USD", "rate:XXX"]
    close_caches()
    # After a "restart" the warmed values are in the database layer for every process.
    assert open_cache("rates").get("rate:EUR") == {"currency": "EUR", "rate": 1.5}
    assert CliRunner().invoke(cli, ["cache", "warm", "early"]).exit_code == 2, "no warm loader declared"


def test_the_warming_and_statistics_assets_materialize(store_url, caches_file):
    from orchestration.cache_definitions import cache_definitions
    from resources.cache import CacheResource
    from resources.platform_store import PlatformStoreResource

    cache = open_cache("rates")
    for _ in range(64):
        cache.get("rate:EUR")
    report_figures_now()
    definitions = dg.Definitions.merge(
        cache_definitions(caches_file),
        dg.Definitions(resources={"cache": CacheResource(), "platform_store": PlatformStoreResource()}),
    )
    assert {key.to_user_string() for key in definitions.resolve_asset_graph().get_all_asset_keys()} == {
        "cache_statistics",
        "cache_warming__rates",
    }
    result = dg.materialize(
        [definitions.get_assets_def("cache_warming__rates"), definitions.get_assets_def("cache_statistics")],
        resources={"cache": CacheResource(), "platform_store": PlatformStoreResource()},
    )
    assert result.success
    warm_metadata = result.asset_materializations_for_node("cache_warming__rates")[0].metadata
    assert warm_metadata["loaded"].value == 1 and warm_metadata["candidates"].value == 1
    statistics = result.asset_materializations_for_node("cache_statistics")[0].metadata
    assert statistics["rates/gets"].value == 64 and statistics["rates/processes"].value == 1
    assert {row.data["layer"] for row in statistics["by_layer"].value.records} == {"memory", "database"}


def test_a_bad_warm_declaration_names_the_field(tmp_path):
    from orchestration.kernel.spec_errors import SpecError
    from resources.cache.config import load_caches_file

    path = tmp_path / "caches.yaml"
    path.write_text(
        yaml.safe_dump({"namespaces": {"x": {"warm": {"loader": "a:b", "schedule": "every day"}}}})
    )
    with pytest.raises(SpecError, match=r"caches.yaml: namespaces.x.warm.*not a cron expression"):
        load_caches_file(path)


def test_adaptive_sizing_grows_under_eviction_and_shrinks_when_idle(store_url, caches_file):
    cache = open_cache("sized")
    memory = cache.memory
    assert memory.byte_bound == 20_000, "starts at min_bytes"
    value = "x" * 800  # about 1 KB an entry with its overhead
    # A working set of 150 keys (~150 KB) read round robin: evictions and misses until it fits.
    for _ in range(12):
        for number in range(150):
            cache.get_or_set(f"k{number}", lambda: value)
        cache.adapt_memory()
    decisions = cache.to_json()["sizing"]["decisions"]
    assert decisions and all(d["to_bytes"] > d["from_bytes"] for d in decisions), decisions
    assert "evicted" in decisions[0]["reason"]
    grown = memory.byte_bound
    assert grown >= 150_000 and grown <= 400_000
    # Now only ten keys are read: all hits, no evictions, most of the bound unused -> it shrinks.
    for number in range(140):
        memory.delete([f"k{number + 10}"])
    for _ in range(30):
        for number in range(10):
            assert cache.get(f"k{number}") is not None
    cache.adapt_memory()
    assert memory.byte_bound < grown and memory.byte_bound >= 20_000
    assert "none evicted" in cache.to_json()["sizing"]["decisions"][-1]["reason"]


def test_early_refresh_reloads_a_fresh_value_before_it_expires(store_url, caches_file):
    cache = open_cache("early")
    loads = []

    def loader():
        loads.append(time.time())
        time.sleep(0.05)
        return len(loads)

    assert cache.get_or_set("k", loader, ttl=3600) == 1
    # Far from expiry: a 50 ms loader makes an early refresh vanishingly unlikely.
    for _ in range(200):
        cache.get_or_set("k", loader, ttl=3600)
    assert len(loads) == 1
    # 5 ms before expiry with a 50 ms loader, a read refreshes with probability e^-0.1 = 0.9: within a
    # few reads one does, in the background, while the reads still get the fresh value.
    cache.set("k", 1, ttl=0.005)
    while len(loads) == 1 and cache.get("k") == 1:
        assert cache.get_or_set("k", loader, ttl=3600) in (1, 2)
    wait_until(lambda: cache.get("k") == 2, 5, "the background early refresh to store its value")
    assert len(loads) == 2 and cache.to_json()["early_refreshes"] == 1
