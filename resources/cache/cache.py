"""`Cache`: one namespace's layers read in order and filled back, with stampede protection and
invalidation that reaches every process.

Reads go memory → Redis → database; a hit in a lower layer is written back into the layers above
it. Writes are write-through: the lowest layer first, so a value in memory is always also below.
A layer that does not answer is skipped (counted in its `errors`, logged once a minute) unless the
namespace says `require_l2` and that layer is Redis; a stored entry that does not decode is a miss
(counted as `corrupt`, and removed). A memory hit hands back the very object the memory layer holds
(as cashews' and aiocache's memory backends do, and for the same reason: no decoding on the fastest
path), so treat cached values as read-only.

`get_or_set(key, loader)`:
- a fresh value is returned;
- a stale one (past the ttl, within `stale_grace`) is returned at once while one thread of this
  process refreshes it in the background;
- on a miss, one caller per process loads (single-flight: the others wait for its result), and with
  Redis one process at a time: the loader's process holds `SET lock NX PX lock_timeout`; the others
  poll Redis for the value until the lock is released or times out, so a crashed holder delays them
  at most `lock_timeout`, never longer.

Invalidation (`delete`, `invalidate_tags`) removes the entries from every layer and, with Redis,
publishes the keys and tags on the channel `junction:cache:invalidations`; each process listening
drops them from its memory layer as the message arrives (milliseconds). While Redis is unreachable a
memory entry another process invalidated lives at most until its own expiry: the namespace's ttl
plus stale grace is the bound.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

import orjson

from resources.cache import serializers
from resources.cache.config import NamespaceSpec, parse_size
from resources.cache.layers import NOT_DECODED, Layer, LayerUnavailable, MemoryLayer, RedisLayer, StoredEntry
from resources.cache.sizing import AdaptiveBound
from resources.cache.stats import NamespaceStats

logger = logging.getLogger("junction.cache")
INVALIDATION_CHANNEL = "junction:cache:invalidations"
# One read in this many is counted against its key (what warming preloads): cheap, and the most read
# keys still stand out after a few thousand reads.
SAMPLE_EVERY = 16
# How often a process waiting for another's load looks for the value in Redis.
LOCK_POLL_S = 0.01
_MISSING = object()


@dataclass(frozen=True)
class Cached:
    value: Any
    fresh: bool  # False: past its ttl, within the namespace's stale grace
    fresh_until: float  # epoch seconds


class CacheUnavailable(Exception):
    """A layer the namespace requires (`require_l2`) did not answer."""


class Cache:
    def __init__(
        self,
        name: str,
        spec: NamespaceSpec,
        layers: list[Layer],
        *,
        redis_client: Any | None = None,
        process_id: str | None = None,
    ):
        self.name = name
        self.spec = spec
        self.layers = layers
        self.memory = next((layer for layer in layers if isinstance(layer, MemoryLayer)), None)
        self.redis = redis_client
        self.process_id = process_id or uuid.uuid4().hex
        self.topology_identity: str | None = None  # the Redis servers it shares with other processes
        self.write_behind: Any = None  # a WriteBehind when the namespace declares `write_behind`
        self.stats = NamespaceStats.for_layers([layer.name for layer in layers])
        self._layers_and_stats = [(layer, self.stats.layers[layer.name]) for layer in layers]
        self.store_url: str | None = None  # the platform store its figures and key hits go to
        self.warmed_on_start = False
        # Sampled reads per key (one read in SAMPLE_EVERY), moved to the store by the reporter.
        self.key_hits: dict[str, int] = {}
        self.adaptive: AdaptiveBound | None = None
        if self.memory is not None and spec.memory.min_bytes is not None:
            self.adaptive = AdaptiveBound(
                parse_size(spec.memory.min_bytes),
                parse_size(spec.memory.max_bytes),
                spec.memory.target_hit_rate,
            )
            self.memory.resize(self.adaptive.min_bytes)  # grows when reads show it should
        self._flights: dict[str, Future] = {}
        self._flights_lock = threading.Lock()
        self._refreshing: set[str] = set()
        self._last_warning: dict[str, float] = {}

    # --- reading ------------------------------------------------------------------------------------

    def _unavailable(self, layer: Layer, exc: LayerUnavailable) -> None:
        self.stats.layers[layer.name].errors += 1
        if self.spec.require_l2 and isinstance(layer, RedisLayer):
            raise CacheUnavailable(f"cache namespace {self.name!r} requires Redis: {exc}") from None
        now = time.monotonic()
        if now - self._last_warning.get(layer.name, -60.0) >= 60:
            self._last_warning[layer.name] = now
            logger.warning(
                "cache %s: layer %s unavailable, degraded to the others: %s", self.name, layer.name, exc
            )

    def _lookup(self, key: str) -> tuple[Any, StoredEntry] | None:
        """(value, entry) from the first layer holding an unexpired, decodable entry, filled back.

        The hot path of every read (a memory hit costs ~1 µs here): locals, no per-call slices."""
        now = time.time()
        clock = time.perf_counter
        for index, (layer, layer_stats) in enumerate(self._layers_and_stats):
            started = clock()
            try:
                entry = layer.get(key)
            except LayerUnavailable as exc:
                self._unavailable(layer, exc)
                continue
            if entry is None or entry.expires_at <= now:
                layer_stats.misses += 1
                continue
            if entry.value is NOT_DECODED:
                entry = self._decoded(layer, key, entry)
                if entry is None:
                    continue
            layer_stats.hits += 1
            layer_stats.hit_seconds.append(clock() - started)
            if index:
                for above in self.layers[:index]:
                    self._store(above, key, entry)
            return entry.value, entry
        return None

    def _decoded(self, layer: Layer, key: str, entry: StoredEntry) -> StoredEntry | None:
        """The entry with its value decoded, or None (counted as a corrupt miss, and removed)."""
        try:
            return replace(entry, value=serializers.decode(entry.data))
        except serializers.CorruptEntry:
            layer_stats = self.stats.layers[layer.name]
            layer_stats.corrupt += 1
            layer_stats.misses += 1
            self._quietly(layer.delete, [key])
            return None

    def _count_get(self, key: str, hit: bool) -> None:
        # Unlocked: two threads may lose an increment between them; figures, not accounting.
        self.stats.gets += 1
        if hit:
            self.stats.hits += 1
        if self.stats.gets % SAMPLE_EVERY == 0:
            self.key_hits[key] = self.key_hits.get(key, 0) + 1

    def take_key_hits(self) -> dict[str, int]:
        """The sampled reads per key since the last call (the reporter stores them)."""
        taken, self.key_hits = self.key_hits, {}
        return taken

    def adapt_memory(self) -> None:
        """One adaptive sizing decision (`sizing.py`), from the memory layer's reads so far."""
        if self.adaptive is None:
            return
        figures = self.stats.layers[self.memory.name]
        bound = self.adaptive.decide(self.memory, figures.hits, figures.misses)
        if bound is not None:
            self.memory.resize(bound)

    def lookup(self, key: str) -> Cached | None:
        """The value with its freshness, for callers that revalidate a stale value themselves (an
        HTTP answer's ETag with `If-None-Match`: on 304, `set` the same value again)."""
        found = self._lookup(key)
        self._count_get(key, found is not None)
        if found is None:
            return None
        value, entry = found
        return Cached(value, entry.fresh_until > time.time(), entry.fresh_until)

    def get(self, key: str, default: Any = None) -> Any:
        """The value (fresh or within its stale grace), else `default`."""
        found = self._lookup(key)
        self._count_get(key, found is not None)
        return default if found is None else found[0]

    # --- writing ------------------------------------------------------------------------------------

    def _quietly(self, function: Callable, *args: Any) -> Any:
        try:
            return function(*args)
        except LayerUnavailable:
            return None

    def _store(self, layer: Layer, key: str, entry: StoredEntry, lock_token: str | None = None) -> bool:
        """Whether the layer answered; `lock_token`: Redis releases the key's load lock with the write."""
        try:
            kept = layer.set(key, entry, lock_token) if lock_token is not None else layer.set(key, entry)
        except LayerUnavailable as exc:
            self._unavailable(layer, exc)
            return False
        self.stats.layers[layer.name].sets += 1
        if not kept:
            self.stats.layers[layer.name].refused += 1
        return True

    def _entry(self, value: Any, ttl: float | None, tags: Iterable[str]) -> StoredEntry:
        data, raw_size = serializers.encode_sized(value, self.spec.serializer, self.spec.compress_over_bytes)
        self.stats.add(raw_bytes=raw_size, stored_bytes=len(data))
        now = time.time()
        fresh_until = now + (self.spec.ttl_s if ttl is None else ttl)
        return StoredEntry(
            data, fresh_until, fresh_until + self.spec.stale_grace_s, tuple(sorted(set(tags))), value
        )

    def set(self, key: str, value: Any, ttl: float | None = None, tags: Iterable[str] = ()) -> None:
        """Write through: the database first, then Redis, then memory. With write-behind, the write
        is first queued for the origin (`write_behind.py`): it returns once the write is durable."""
        self._write(key, value, ttl, tags)

    def _write(
        self, key: str, value: Any, ttl: float | None, tags: Iterable[str], lock_token: str | None = None
    ) -> bool:
        """`set`; with the load lock's token, Redis releases it in the write's round trip (whether it did)."""
        entry = self._entry(value, ttl, tags)
        if self.write_behind is not None:
            self.write_behind.enqueue(key, value)
        released = False
        for layer in reversed(self.layers):
            if lock_token is not None and isinstance(layer, RedisLayer):
                released = self._store(layer, key, entry, lock_token)
            else:
                self._store(layer, key, entry)
        return released

    def set_many(self, items: Mapping[str, Any], ttl: float | None = None, tags: Iterable[str] = ()) -> None:
        """`set` of several keys, each layer written once: one Redis pipeline per server and one
        database transaction instead of a round trip per key (warming writes this way)."""
        entries = {key: self._entry(value, ttl, tags) for key, value in items.items()}
        if not entries:
            return
        if self.write_behind is not None:
            for key, value in items.items():
                self.write_behind.enqueue(key, value)
        for layer in reversed(self.layers):
            try:
                kept = layer.set_many(entries)
            except LayerUnavailable as exc:
                self._unavailable(layer, exc)
                continue
            self.stats.layers[layer.name].sets += len(entries)
            self.stats.layers[layer.name].refused += len(entries) - kept

    def delete(self, *keys: str) -> None:
        if self.write_behind is not None:
            for key in keys:
                self.write_behind.enqueue(key, None, deleted=True)
        for layer in self.layers:
            try:
                layer.delete(keys)
            except LayerUnavailable as exc:
                self._unavailable(layer, exc)
        self._publish(keys=list(keys))

    def invalidate_tags(self, *tags: str) -> set[str]:
        """Drop every entry carrying one of `tags`, in every layer and every process's memory."""
        dropped: set[str] = set()
        for layer in reversed(self.layers):
            try:
                dropped |= layer.delete_tags(tags)
            except LayerUnavailable as exc:
                self._unavailable(layer, exc)
        if self.memory is not None:
            self.memory.delete(dropped)
        self._publish(keys=sorted(dropped), tags=list(tags))
        return dropped

    def _publish(self, keys: list[str] = (), tags: list[str] = ()) -> None:
        if self.redis is None or self.memory is None:
            return
        message = {"namespace": self.name, "version": self.spec.version, "keys": keys, "tags": tags}
        try:
            self.redis.publish(INVALIDATION_CHANNEL, orjson.dumps({**message, "from": self.process_id}))
        except Exception as exc:  # noqa: BLE001 - other processes' memory then expires by itself
            logger.warning(
                "cache %s: invalidation not broadcast (%s); other processes' memory expires by ttl",
                self.name,
                exc,
            )

    def drop_from_memory(self, keys: Iterable[str] = (), tags: Iterable[str] = ()) -> None:
        """What another process invalidated (the invalidation listener calls this)."""
        if self.memory is not None:
            self.memory.delete_tags(tags)
            self.memory.delete(keys)

    # --- loading ------------------------------------------------------------------------------------

    def get_or_set(
        self, key: str, loader: Callable[[], Any], ttl: float | None = None, tags: Iterable[str] = ()
    ) -> Any:
        """Cache-aside with stampede protection and stale-while-revalidate (see the module doc)."""
        found = self._lookup(key)
        self._count_get(key, found is not None)
        if found is not None:
            value, entry = found
            now = time.time()
            if entry.fresh_until <= now:
                self.stats.add(stale_served=1)
                self._refresh_in_background(key, loader, ttl, tags)
            elif self.spec.early_refresh is not None and self._refresh_early(entry, now):
                if self._refresh_in_background(key, loader, ttl, tags, early=True):
                    self.stats.add(early_refreshes=1)
            return value
        return self._single_flight(key, lambda: self._load_once_across_processes(key, loader, ttl, tags))

    def _refresh_early(self, entry: StoredEntry, now: float) -> bool:
        """XFetch (Vattani et al., "Optimal Probabilistic Cache Stampede Prevention"): refresh when
        `now - delta * beta * ln(random())` passes the fresh time, delta being the loader's mean
        time here; each caller decides alone, so refreshes spread out instead of piling up."""
        calls = self.stats.loader_calls
        delta = self.stats.loader_seconds / calls if calls else 0.0
        return now - delta * self.spec.early_refresh * math.log(1.0 - random.random()) >= entry.fresh_until

    def _found_meanwhile(self, key: str) -> Any:
        """The value a load that finished since this caller's miss stored, or _MISSING: a caller
        that missed just before a load finished must not start a second one."""
        found = self._lookup(key)
        return _MISSING if found is None or not found[1].is_fresh(time.time()) else found[0]

    def _single_flight(self, key: str, work: Callable[[], Any]) -> Any:
        with self._flights_lock:
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = Future()
        if not leader:
            return flight.result()
        try:
            value = work()
        except BaseException as exc:
            flight.set_exception(exc)
            raise
        else:
            flight.set_result(value)
            return value
        finally:
            with self._flights_lock:
                self._flights.pop(key, None)

    def _load(
        self,
        key: str,
        loader: Callable[[], Any],
        ttl: float | None,
        tags: Iterable[str],
        lock_token: str | None = None,
    ) -> tuple[Any, bool]:
        """(value, whether Redis released the load lock `lock_token` with the write)."""
        started = time.perf_counter()
        value = loader()
        self.stats.add(loader_calls=1, loader_seconds=time.perf_counter() - started)
        return value, self._write(key, value, ttl, tags, lock_token)

    def _filled(self, redis_layer: RedisLayer, key: str, entry: StoredEntry | None) -> Any:
        """The fresh value of an entry read from Redis (put into the layers above it), or _MISSING."""
        if entry is None or not entry.is_fresh(time.time()):
            return _MISSING
        entry = self._decoded(redis_layer, key, entry)
        if entry is None:
            return _MISSING
        for above in self.layers[: self.layers.index(redis_layer)]:
            self._store(above, key, entry)
        return entry.value

    def _load_once_across_processes(
        self, key: str, loader: Callable[[], Any], ttl: float | None, tags: Iterable[str], early: bool = False
    ) -> Any:
        """Load unless another load stored a fresh value meanwhile (`early`: reload a fresh one).

        With Redis, a miss costs three round trips: the read that missed, one script that reads the
        entry again or takes the load lock, and the write that releases the lock."""
        redis_layer = next((layer for layer in self.layers if isinstance(layer, RedisLayer)), None)
        if redis_layer is None:
            meanwhile = _MISSING if early else self._found_meanwhile(key)
            return meanwhile if meanwhile is not _MISSING else self._load(key, loader, ttl, tags)[0]
        token = uuid.uuid4().hex
        timeout_ms = int(self.spec.lock_timeout_s * 1000)
        deadline = time.monotonic() + self.spec.lock_timeout_s
        waited = False
        while True:
            try:
                if early:
                    acquired = redis_layer.acquire_lock(key, token, timeout_ms)
                else:
                    acquired = redis_layer.get_or_lock(key, token, timeout_ms)
                    if isinstance(acquired, StoredEntry):  # another process's value, or a stale one
                        meanwhile = self._filled(redis_layer, key, acquired)
                        if meanwhile is not _MISSING:
                            return meanwhile
                        acquired = redis_layer.acquire_lock(key, token, timeout_ms)
            except LayerUnavailable as exc:  # Redis down: load here, as without Redis
                self._unavailable(redis_layer, exc)
                return self._load(key, loader, ttl, tags)[0]
            if acquired:
                released = False
                try:
                    value, released = self._load(key, loader, ttl, tags, lock_token=token)
                    return value
                finally:
                    if not released:
                        self._quietly_release(redis_layer, key, token)
            if early:
                return None  # another process is reloading it already
            if not waited:
                self.stats.add(lock_waits=1)
                waited = True
            # Another process loads: take its value as soon as it is in Redis.
            while time.monotonic() < deadline:
                time.sleep(LOCK_POLL_S)
                found = self._lookup(key)
                if found is not None:
                    return found[0]
                if not self._quietly(redis_layer.lock_held, key):
                    break  # released without a value (its loader failed): try to take the lock
            else:
                return self._load(key, loader, ttl, tags)[0]  # the holder is gone or too slow

    def _quietly_release(self, redis_layer: RedisLayer, key: str, token: str) -> None:
        try:
            redis_layer.release_lock(key, token)
        except LayerUnavailable:  # the lock then expires by its timeout
            logger.warning("cache %s: could not release the load lock of %r", self.name, key)

    def _refresh_in_background(
        self, key: str, loader: Callable[[], Any], ttl: float | None, tags: Iterable[str], early: bool = False
    ) -> bool:
        """Reload `key` in a thread unless one does already; whether this call started one."""
        with self._flights_lock:
            if key in self._refreshing:
                return False
            self._refreshing.add(key)

        def refresh() -> None:
            try:
                self._single_flight(
                    key, lambda: self._load_once_across_processes(key, loader, ttl, tags, early)
                )
            except Exception:  # noqa: BLE001 - the stale value stays until its grace ends
                logger.warning("cache %s: background refresh of %r failed", self.name, key, exc_info=True)
            finally:
                with self._flights_lock:
                    self._refreshing.discard(key)

        threading.Thread(target=refresh, name=f"cache-refresh-{self.name}", daemon=True).start()
        return True

    # --- async --------------------------------------------------------------------------------------

    async def aget(self, key: str, default: Any = None) -> Any:
        import anyio

        return await anyio.to_thread.run_sync(lambda: self.get(key, default))

    async def aset(self, key: str, value: Any, ttl: float | None = None, tags: Iterable[str] = ()) -> None:
        import anyio

        await anyio.to_thread.run_sync(lambda: self.set(key, value, ttl, tags))

    async def aset_many(
        self, items: Mapping[str, Any], ttl: float | None = None, tags: Iterable[str] = ()
    ) -> None:
        import anyio

        await anyio.to_thread.run_sync(lambda: self.set_many(items, ttl, tags))

    async def adelete(self, *keys: str) -> None:
        import anyio

        await anyio.to_thread.run_sync(lambda: self.delete(*keys))

    async def ainvalidate_tags(self, *tags: str) -> set[str]:
        import anyio

        return await anyio.to_thread.run_sync(lambda: self.invalidate_tags(*tags))

    async def aget_or_set(
        self,
        key: str,
        loader: Callable[[], Awaitable[Any]],
        ttl: float | None = None,
        tags: Iterable[str] = (),
    ) -> Any:
        """`get_or_set` for an async loader: one load per key in this event loop at a time."""
        import asyncio

        found = await self.aget(key, _MISSING)
        if found is not _MISSING:
            return found
        flights: dict[str, asyncio.Future] = self.__dict__.setdefault("_async_flights", {})
        flight = flights.get(key)
        if flight is not None:
            return await asyncio.shield(flight)
        flight = flights[key] = asyncio.get_running_loop().create_future()
        try:
            # A load that finished between this caller's miss and its taking the lead stored it.
            import anyio

            found = await anyio.to_thread.run_sync(self._lookup, key)
            value = _MISSING if found is None else found[0]
            if value is _MISSING:
                started = time.perf_counter()
                value = await loader()
                self.stats.add(loader_calls=1, loader_seconds=time.perf_counter() - started)
                await self.aset(key, value, ttl, tags)
            flight.set_result(value)
            return value
        except BaseException as exc:
            flight.set_exception(exc)
            flight.exception()  # retrieved: no "never retrieved" warning when nobody waited
            raise
        finally:
            flights.pop(key, None)

    def to_json(self) -> dict[str, Any]:
        figures = self.stats.to_json()
        if self.memory is not None:
            figures["layers"]["memory"].update(
                entries=len(self.memory), bytes=self.memory.bytes, evictions=self.memory.evictions
            )
        if self.write_behind is not None:
            figures["write_behind"] = self.write_behind.to_json()
        if self.adaptive is not None:
            figures["sizing"] = self.adaptive.to_json(self.memory)
        return {"namespace": self.name, "layers_declared": [layer.name for layer in self.layers], **figures}
