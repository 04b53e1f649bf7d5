"""`CacheResource` (the Dagster resource), `open_cache` (the same caches outside Dagster) and the
`@cached` decorator.

Every use in a process shares one `Cache` per namespace (so one memory layer and one set of figures),
opened on first use: memory, Redis (`redis_url`, default JUNCTION_REDIS_URL; left out when unset) and
the platform store (`database_url`, default JUNCTION_DATABASE_URL / the embedded SQLite), as the
namespace's `layers` in `caches.yaml` (JUNCTION_CACHES_FILE) allow. With Redis, one listener thread
per process applies the other processes' invalidations to the memory layers.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import dagster as dg
import orjson

from resources.cache.cache import INVALIDATION_CHANNEL, Cache
from resources.cache.config import DEFAULT_NAMESPACE, NamespaceSpec, load_caches_file, parse_size
from resources.cache.layers import DatabaseLayer, Layer, MemoryLayer, RedisLayer
from resources.cache.reporting import Reporter
from resources.cache.topology import RedisTopology, RedisTopologySpec
from resources.cache.write_behind import WriteBehind, holder_id

logger = logging.getLogger("junction.cache")
PROCESS_ID = uuid.uuid4().hex
_registry_lock = threading.Lock()
_caches: dict[tuple[str, str | None, str, str], Cache] = {}
_listeners: dict[str, Any] = {}
_topologies: dict[tuple[str, str | None], RedisTopology | None] = {}
_reporter: Reporter | None = None


def _settings_defaults(redis_url: str | None, database_url: str | None, caches_file: str | None):
    from orchestration.settings import get_settings

    settings = get_settings()
    return (
        redis_url if redis_url is not None else settings.redis_url,
        database_url or settings.store_url,
        str(caches_file or settings.caches_file),
    )


def build_layers(
    name: str, spec: NamespaceSpec, topology: RedisTopology | None, store_url: str
) -> list[Layer]:
    layers: list[Layer] = []
    for layer in spec.layers:
        if layer == "memory":
            layers.append(
                MemoryLayer(
                    spec.memory.max_entries,
                    parse_size(spec.memory.max_bytes),
                    parse_size(spec.memory.max_value_bytes),
                )
            )
        elif layer == "redis" and topology is not None:
            layers.append(RedisLayer(topology, f"jc:{name}:v{spec.version}:"))
        elif layer == "database":
            from orchestration.store.db import get_engine

            layers.append(DatabaseLayer(get_engine(store_url), name, spec.version))
    return layers


def open_cache(
    namespace: str = DEFAULT_NAMESPACE,
    *,
    redis_url: str | None = None,
    database_url: str | None = None,
    caches_file: str | None = None,
) -> Cache:
    """This process's cache of `namespace` (opened once, shared by every caller)."""
    redis_url, store_url, caches_file = _settings_defaults(redis_url, database_url, caches_file)
    registry_key = (namespace, redis_url, store_url, caches_file)
    with _registry_lock:
        cache = _caches.get(registry_key)
        if cache is not None:
            return cache
        caches = load_caches_file(caches_file)
        if namespace not in caches.namespaces:
            known = ", ".join(sorted(caches.namespaces))
            raise KeyError(f"no cache namespace {namespace!r} in {caches_file} (namespaces: {known})")
        spec = caches.namespaces[namespace]
        topology = _topology(caches.redis, redis_url) if "redis" in spec.layers else None
        cache = Cache(
            namespace,
            spec,
            build_layers(namespace, spec, topology, store_url),
            redis_client=topology.bus if topology is not None else None,
            process_id=PROCESS_ID,
        )
        cache.topology_identity = topology.identity if topology is not None else None
        cache.store_url = store_url
        if spec.write_behind is not None:
            cache.write_behind = _write_behind(namespace, spec, redis_url, store_url)
        _caches[registry_key] = cache
        if topology is not None and cache.memory is not None:
            _listen(topology)
        _start_reporter()
    if spec.warm is not None and spec.warm.on_start and not cache.warmed_on_start:
        cache.warmed_on_start = True
        threading.Thread(
            target=_warm_quietly, args=(cache,), name=f"cache-warm-{namespace}", daemon=True
        ).start()
    return cache


def _warm_quietly(cache: Cache) -> None:
    from resources.cache.warming import warm

    try:
        result = warm(cache)
        logger.info(
            "cache %s: warmed %d key(s) on start (%d failed)", cache.name, result.loaded, result.failed
        )
    except Exception:  # noqa: BLE001 - a cold cache still answers, through its loaders
        logger.warning("cache %s: warming on start failed", cache.name, exc_info=True)


def _start_reporter() -> None:
    """The process's reporter thread (`reporting.py`), once (caller holds the registry lock)."""
    global _reporter
    if _reporter is None:
        _reporter = Reporter(opened_caches, PROCESS_ID)
        _reporter.start()


def report_figures_now() -> None:
    """Write this process's figures to the store now (commands that end before the reporter's turn)."""
    if _reporter is not None:
        _reporter.report_now()


def _write_behind(namespace: str, spec: NamespaceSpec, redis_url: str | None, store_url: str) -> WriteBehind:
    """The namespace's queue for the origin on the platform's event stream, and its flusher thread
    (which first applies whatever an earlier process left queued)."""
    from orchestration.store.db import get_engine
    from resources.event_stream import open_event_stream

    events = open_event_stream(redis_url=redis_url, store_url=store_url)
    write_behind = WriteBehind(
        namespace, spec.write_behind, events, get_engine(store_url), holder_id(PROCESS_ID)
    )
    if spec.write_behind.background:
        write_behind.start()
    return write_behind


def _topology(spec: RedisTopologySpec, single_url: str | None) -> RedisTopology | None:
    """One set of Redis clients per topology, shared by the namespaces on it (caller holds the lock)."""
    key = (spec.model_dump_json(), single_url)
    if key not in _topologies:
        _topologies[key] = RedisTopology.connect(spec, single_url)
    return _topologies[key]


def _listen(topology: RedisTopology) -> None:
    """One pub/sub listener thread per topology, dropping other processes' invalidations from the
    memory layers of this process's caches."""
    identity, client = topology.identity, topology.bus
    if identity in _listeners:
        return

    def apply(message: dict[str, Any]) -> None:
        try:
            event = orjson.loads(message["data"])
        except (orjson.JSONDecodeError, TypeError, KeyError):
            return
        if event.get("from") == PROCESS_ID:
            return
        for (name, _, _, _), cache in list(_caches.items()):
            if (
                cache.topology_identity == identity
                and name == event.get("namespace")
                and cache.spec.version == event.get("version")
            ):
                cache.drop_from_memory(event.get("keys", ()), event.get("tags", ()))

    try:
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(**{INVALIDATION_CHANNEL: apply})
        _listeners[identity] = pubsub.run_in_thread(
            sleep_time=0.05, daemon=True, exception_handler=_listener_failed
        )
    except Exception as exc:  # noqa: BLE001 - Redis down at start: memory entries then expire by ttl
        logger.warning(
            "cache: cannot listen for invalidations on %s (%s); memory entries expire by ttl", identity, exc
        )


def _listener_failed(exc: BaseException, pubsub: Any, thread: Any) -> None:
    # redis-py's worker thread stops on an error unless the handler returns: reconnect on next read.
    logger.warning("cache: invalidation listener lost Redis (%s); retrying", exc)
    import time

    time.sleep(1.0)


def opened_caches() -> list[Cache]:
    """The caches this process has opened (what its metrics report)."""
    with _registry_lock:
        return list(_caches.values())


def close_caches() -> None:
    """Forget this process's caches and stop its threads (tests; a process's end does it anyway)."""
    global _reporter
    with _registry_lock:
        if _reporter is not None:
            _reporter.stop()
            _reporter = None
        for thread in _listeners.values():
            try:
                thread.stop()
            except Exception:  # noqa: BLE001
                pass
        _listeners.clear()
        for cache in _caches.values():
            if cache.write_behind is not None:
                cache.write_behind.stop()
                cache.write_behind.events.close()
        _caches.clear()
        for topology in _topologies.values():
            if topology is not None:
                topology.close()
        _topologies.clear()


class CacheResource(dg.ConfigurableResource):
    """Junction's multi-layer cache for ops, assets and sensors: `cache.namespace("lookups")`, or the
    default namespace through `get`, `set`, `get_or_set`, `delete` and `invalidate_tags` (and their
    `a…` async twins on the namespace)."""

    redis_url: str | None = None
    database_url: str | None = None
    caches_file: str | None = None

    def namespace(self, name: str = DEFAULT_NAMESPACE) -> Cache:
        return open_cache(
            name, redis_url=self.redis_url, database_url=self.database_url, caches_file=self.caches_file
        )

    def get(self, key: str, default: Any = None, *, namespace: str = DEFAULT_NAMESPACE) -> Any:
        return self.namespace(namespace).get(key, default)

    def set(
        self,
        key: str,
        value: Any,
        ttl: float | None = None,
        tags: Iterable[str] = (),
        *,
        namespace: str = DEFAULT_NAMESPACE,
    ) -> None:
        self.namespace(namespace).set(key, value, ttl, tags)

    def set_many(
        self,
        items: dict[str, Any],
        ttl: float | None = None,
        tags: Iterable[str] = (),
        *,
        namespace: str = DEFAULT_NAMESPACE,
    ) -> None:
        self.namespace(namespace).set_many(items, ttl, tags)

    def get_or_set(
        self,
        key: str,
        loader: Callable[[], Any],
        ttl: float | None = None,
        tags: Iterable[str] = (),
        *,
        namespace: str = DEFAULT_NAMESPACE,
    ) -> Any:
        return self.namespace(namespace).get_or_set(key, loader, ttl, tags)

    def delete(self, *keys: str, namespace: str = DEFAULT_NAMESPACE) -> None:
        self.namespace(namespace).delete(*keys)

    def invalidate_tags(self, *tags: str, namespace: str = DEFAULT_NAMESPACE) -> set[str]:
        return self.namespace(namespace).invalidate_tags(*tags)


def _call_key(function: Callable, key: str | Callable[..., str] | None, args: tuple, kwargs: dict) -> str:
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    if callable(key):
        return key(*args, **kwargs)
    if isinstance(key, str):
        return key.format(**bound.arguments)
    arguments = orjson.dumps(dict(bound.arguments), option=orjson.OPT_SORT_KEYS, default=str).decode()
    return f"{function.__module__}.{function.__qualname__}:{arguments}"


def cached(
    ttl: float | None = None,
    tags: Iterable[str] = (),
    key: str | Callable[..., str] | None = None,
    namespace: str = DEFAULT_NAMESPACE,
):
    """Cache a function's results (sync or async) in `namespace`, loading through it on a miss.

    `key`: a format string over the arguments (`"customer:{customer_id}"`), a function of them, or
    by default the function's qualified name with its arguments as JSON. `tags` may be format
    strings too (`["customer:{customer_id}"]`), so `invalidate_tags` drops what one record affected.
    """

    def decorate(function: Callable) -> Callable:
        def key_and_tags(args: tuple, kwargs: dict) -> tuple[str, list[str]]:
            bound = inspect.signature(function).bind(*args, **kwargs)
            bound.apply_defaults()
            return _call_key(function, key, args, kwargs), [tag.format(**bound.arguments) for tag in tags]

        if inspect.iscoroutinefunction(function):

            @functools.wraps(function)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                cache_key, call_tags = key_and_tags(args, kwargs)
                return await open_cache(namespace).aget_or_set(
                    cache_key, lambda: function(*args, **kwargs), ttl, call_tags
                )

            return async_wrapper

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            cache_key, call_tags = key_and_tags(args, kwargs)
            return open_cache(namespace).get_or_set(
                cache_key, lambda: function(*args, **kwargs), ttl, call_tags
            )

        return wrapper

    return decorate
