"""The cache's figures across processes, and what warming preloads.

Each process keeps its own figures (`stats.py`). One reporter thread per process writes them every
`REPORT_EVERY_S` into the platform store (`cache_process_stats`, one row per process and namespace),
adds the sampled reads per key to `cache_key_hits`, and makes the adaptive sizing decisions
(`sizing.py`). Readers — the gateway's `/caches` endpoints, `junction cache stats`, the
`cache_statistics` asset — merge the rows of processes heard from within `LIVE_WITHIN_S`: counts
are summed, rates recomputed from the sums, and latency percentiles are the slowest process's (a
percentile cannot be merged exactly; the worst one is the one to look at).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

logger = logging.getLogger("junction.cache")
REPORT_EVERY_S = 5.0
LIVE_WITHIN_S = 60.0
# Rows of processes not heard from for this long are removed by the next report.
FORGET_AFTER_S = 24 * 3600.0
_SUMMED = (
    "gets",
    "hits",
    "stale_served",
    "early_refreshes",
    "loader_calls",
    "lock_waits",
    "raw_bytes",
    "stored_bytes",
)
_LAYER_SUMMED = ("hits", "misses", "sets", "refused", "corrupt", "errors", "entries", "bytes", "evictions")
_LAYER_WORST = ("hit_p50_us", "hit_p99_us")


def report(cache: Any, engine: Any, process_id: str) -> None:
    """Write `cache`'s figures and sampled key reads to the store (one transaction)."""
    from sqlalchemy import delete

    from orchestration.store.db import session_scope, upsertable_insert
    from orchestration.store.models import CacheKeyHits, CacheProcessStats

    cache.adapt_memory()
    now = time.time()
    hits = cache.take_key_hits()
    figures = cache.to_json()
    row = {
        "process_id": process_id,
        "namespace": cache.name,
        "host": socket.gethostname()[:255],
        "pid": os.getpid(),
        "updated_at": now,
        "figures": figures,
    }
    try:
        with session_scope(engine) as session:
            stats = upsertable_insert(engine, CacheProcessStats).values(**row)
            session.execute(
                stats.on_conflict_do_update(
                    index_elements=["process_id", "namespace"],
                    set_={"updated_at": now, "figures": figures, "pid": row["pid"]},
                )
            )
            if hits:
                insert = upsertable_insert(engine, CacheKeyHits)
                rows = [
                    {"namespace": cache.name, "key": key[:500], "hits": count, "last_hit_at": now}
                    for key, count in hits.items()
                ]
                session.execute(
                    insert.on_conflict_do_update(
                        index_elements=["namespace", "key"],
                        set_={"hits": CacheKeyHits.hits + insert.excluded.hits, "last_hit_at": now},
                    ),
                    rows,
                )
            session.execute(
                delete(CacheProcessStats).where(CacheProcessStats.updated_at < now - FORGET_AFTER_S)
            )
    except Exception:
        # Put back what was sampled: the next report tries again.
        for key, count in hits.items():
            cache.key_hits[key] = cache.key_hits.get(key, 0) + count
        raise


def merge(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Figures of several processes of one namespace as one (see the module doc)."""
    merged: dict[str, Any] = {name: 0 for name in _SUMMED}
    merged["loader_seconds"] = 0.0
    layers: dict[str, dict[str, Any]] = {}
    for figures in rows:
        for name in (*_SUMMED, "loader_seconds"):
            merged[name] += figures.get(name) or 0
        for layer, values in figures.get("layers", {}).items():
            into = layers.setdefault(layer, {name: 0 for name in _LAYER_SUMMED} | dict.fromkeys(_LAYER_WORST))
            for name in _LAYER_SUMMED:
                into[name] += values.get(name) or 0
            for name in _LAYER_WORST:
                if values.get(name) is not None:
                    into[name] = max(into[name] or 0.0, values[name])
    for values in layers.values():
        lookups = values["hits"] + values["misses"]
        values["hit_rate"] = round(values["hits"] / lookups, 4) if lookups else None
    merged["loader_seconds"] = round(merged["loader_seconds"], 4)
    merged["hit_rate"] = round(merged["hits"] / merged["gets"], 4) if merged["gets"] else None
    merged["compression_ratio"] = (
        round(merged["raw_bytes"] / merged["stored_bytes"], 2) if merged["stored_bytes"] else None
    )
    merged["layers"] = layers
    merged["processes"] = len(rows)
    return merged


def stored_figures(
    engine: Any, namespace: str | None = None, live_within_s: float = LIVE_WITHIN_S
) -> dict[str, Any]:
    """{namespace: merged figures} of the processes that reported within `live_within_s`."""
    from sqlalchemy import select

    from orchestration.store.db import session_scope
    from orchestration.store.models import CacheProcessStats

    query = select(CacheProcessStats.namespace, CacheProcessStats.figures).where(
        CacheProcessStats.updated_at >= time.time() - live_within_s
    )
    if namespace is not None:
        query = query.where(CacheProcessStats.namespace == namespace)
    grouped: dict[str, list[dict[str, Any]]] = {}
    with session_scope(engine) as session:
        for name, figures in session.execute(query):
            grouped.setdefault(name, []).append(figures)
    return {name: merge(rows) for name, rows in sorted(grouped.items())}


def top_keys(engine: Any, namespace: str, limit: int, pattern: str = "*") -> list[tuple[str, int]]:
    """The namespace's most read keys matching `pattern` (fnmatch; sampled counts), most read first."""
    import fnmatch

    from sqlalchemy import select

    from orchestration.store.db import session_scope
    from orchestration.store.models import CacheKeyHits

    query = (
        select(CacheKeyHits.key, CacheKeyHits.hits)
        .where(CacheKeyHits.namespace == namespace)
        .order_by(CacheKeyHits.hits.desc(), CacheKeyHits.key)
    )
    if pattern == "*":
        query = query.limit(limit)
    found: list[tuple[str, int]] = []
    with session_scope(engine) as session:
        for key, hits in session.execute(query):
            if pattern == "*" or fnmatch.fnmatchcase(key, pattern):
                found.append((key, hits))
                if len(found) == limit:
                    break
    return found


class Reporter:
    """The process's reporter thread (started by the first `open_cache`)."""

    def __init__(self, caches, process_id: str):
        self.caches = caches  # a function returning the opened caches
        self.process_id = process_id
        self._stop = threading.Event()
        self._warned: set[str] = set()
        self._thread = threading.Thread(target=self._loop, name="cache-reporter", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def report_now(self) -> None:
        from orchestration.store.db import get_engine

        for cache in self.caches():
            if cache.store_url is None:
                continue
            try:
                report(cache, get_engine(cache.store_url), self.process_id)
            except Exception as exc:  # noqa: BLE001 - a store not migrated or away: next round
                if cache.name not in self._warned:
                    self._warned.add(cache.name)
                    logger.warning(
                        "cache %s: figures not reported to the platform store: %s", cache.name, exc
                    )

    def _loop(self) -> None:
        while not self._stop.wait(REPORT_EVERY_S):
            self.report_now()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
