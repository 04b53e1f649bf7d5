"""The cache's layers, one class each behind one interface (cashews' backends are the model):
`MemoryLayer` (L1, this process), `RedisLayer` (L2, shared), `DatabaseLayer` (L3, the platform store).

Every layer stores the same `StoredEntry`: the encoded value (`serializers.py`), when it stops being
fresh, when it expires (fresh time plus the namespace's stale grace) and its tags. A layer that cannot
be reached raises `LayerUnavailable`; the cache above decides whether that degrades or fails.
"""

from __future__ import annotations

import struct
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cachetools import LRUCache


class LayerUnavailable(Exception):
    """The layer's service (Redis, the database) did not answer."""


NOT_DECODED = object()


@dataclass(frozen=True)
class StoredEntry:
    data: bytes
    fresh_until: float  # epoch seconds
    expires_at: float  # epoch seconds: fresh_until + the stale grace
    tags: tuple[str, ...] = ()
    # The value itself, kept by the memory layer beside its bytes so that a memory hit decodes
    # nothing (the bytes still count towards the byte bound). Other layers leave it NOT_DECODED.
    value: Any = field(default=NOT_DECODED, compare=False, repr=False)

    def is_expired(self, now: float) -> bool:
        return self.expires_at <= now

    def is_fresh(self, now: float) -> bool:
        return self.fresh_until > now


class Layer(ABC):
    name: str

    @abstractmethod
    def get(self, key: str) -> StoredEntry | None: ...

    @abstractmethod
    def set(self, key: str, entry: StoredEntry) -> bool:
        """Store the entry; False when this layer refuses it (too large for memory)."""

    def set_many(self, entries: dict[str, StoredEntry]) -> int:
        """Store several entries (as one round trip where the layer can); how many it kept."""
        return sum(self.set(key, entry) for key, entry in entries.items())

    @abstractmethod
    def delete(self, keys: Iterable[str]) -> None: ...

    @abstractmethod
    def delete_tags(self, tags: Iterable[str]) -> set[str]:
        """Drop every entry carrying one of `tags`; returns their keys."""

    def close(self) -> None:  # noqa: B027 - most layers hold nothing to close
        pass


# --- L1 ----------------------------------------------------------------------------------------------

# What an entry costs beyond its bytes in a CPython dict and the entry object (measured roughly with
# sys.getsizeof): counted so that a bound in bytes holds for many small values too.
ENTRY_OVERHEAD_BYTES = 200


class _BoundedLRU(LRUCache):
    """cachetools' LRU cache bounded in entries by `max_entries` and in bytes by `byte_bound` (which
    adaptive sizing moves below cachetools' fixed `maxsize`, the namespace's ceiling), telling its
    owner what it evicted.

    Not cachetools' TLRU cache: its reads cost 3.4 µs against the LRU's 0.7 µs (each read runs its
    timer twice), and every entry carries its own expiry, which the cache checks on each read anyway.
    An expired entry is a miss and is replaced by the next load; until then it counts towards the
    bounds like any other, so they hold."""

    def __init__(self, max_bytes: int, max_entries: int, on_evict):
        self.byte_bound = max_bytes
        super().__init__(maxsize=max_bytes, getsizeof=lambda entry: len(entry.data) + ENTRY_OVERHEAD_BYTES)
        self.max_entries = max_entries
        self.on_evict = on_evict

    def popitem(self):
        key, entry = super().popitem()
        self.on_evict(key, entry)
        return key, entry

    def __setitem__(self, key, value, cache_setitem=LRUCache.__setitem__):
        cache_setitem(self, key, value)
        while len(self) > self.max_entries or self.currsize > self.byte_bound:
            self.popitem()


class MemoryLayer(Layer):
    """L1: this process's memory, bounded in entries and bytes, least recently used out first
    (cachetools), each entry with its expiry."""

    name = "memory"

    def __init__(self, max_entries: int, max_bytes: int, max_value_bytes: int):
        self.max_value_bytes = max_value_bytes
        self.evictions = 0
        self._lock = threading.Lock()
        self._tags: dict[str, set[str]] = {}
        self._entries = _BoundedLRU(max_bytes, max_entries, self._evicted)

    def _evicted(self, key: str, entry: StoredEntry) -> None:
        self.evictions += 1
        self._untag(key, entry)

    def _untag(self, key: str, entry: StoredEntry) -> None:
        for tag in entry.tags:
            keys = self._tags.get(tag)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._tags[tag]

    @property
    def bytes(self) -> int:
        return int(self._entries.currsize)

    @property
    def byte_bound(self) -> int:
        return self._entries.byte_bound

    def resize(self, byte_bound: int) -> None:
        """Move the byte bound (at most the declared `max_bytes`), evicting down to it at once."""
        with self._lock:
            self._entries.byte_bound = min(byte_bound, int(self._entries.maxsize))
            while self._entries.currsize > self._entries.byte_bound:
                self._entries.popitem()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> StoredEntry | None:
        with self._lock:
            try:
                return self._entries[key]
            except KeyError:
                return None

    def set(self, key: str, entry: StoredEntry) -> bool:
        if len(entry.data) > self.max_value_bytes:
            return False
        with self._lock:
            previous = self._entries.get(key)
            if previous is not None:
                self._untag(key, previous)
            try:
                self._entries[key] = entry
            except ValueError:  # larger than the whole byte bound
                return False
            for tag in entry.tags:
                self._tags.setdefault(tag, set()).add(key)
        return True

    def delete(self, keys: Iterable[str]) -> None:
        with self._lock:
            for key in keys:
                entry = self._entries.pop(key, None)
                if entry is not None:
                    self._untag(key, entry)

    def delete_tags(self, tags: Iterable[str]) -> set[str]:
        with self._lock:
            keys = set().union(*(self._tags.pop(tag, set()) for tag in tags))
        self.delete(keys)
        return keys


# --- L2 ----------------------------------------------------------------------------------------------

_TIMES = struct.Struct("!dd")  # fresh_until, expires_at ahead of the value in Redis


class RedisLayer(Layer):
    """L2: Redis (one server, a cluster or a ring: `topology.py`). An entry is one string key
    `jc:{namespace}:v{version}:{<key>}` holding the two times and the value, expiring with the entry;
    each tag is a set of keys, expiring with its last entry. The load lock of a cold key is one more
    string key beside it, `jc:{namespace}:v{version}:lock:{<key>}`: the shared hash tag puts both on
    one cluster slot (and one ring server), so that one script reads the entry or takes the lock."""

    name = "redis"

    def __init__(self, topology: Any, prefix: str):
        self.topology = topology
        self.prefix = prefix

    def _key(self, key: str) -> str:
        return f"{self.prefix}{{{key}}}"

    def _tag(self, tag: str) -> str:
        return f"{self.prefix}tag:{tag}"

    def _lock(self, key: str) -> str:
        return f"{self.prefix}lock:{{{key}}}"

    def _call(self, function, *args, **kwargs):
        import redis

        try:
            return function(*args, **kwargs)
        except redis.RedisError as exc:
            raise LayerUnavailable(f"Redis: {exc}") from None

    def get(self, key: str) -> StoredEntry | None:
        name = self._key(key)
        return _stored(self._call(self.topology.client_for(name).get, name))

    def set(self, key: str, entry: StoredEntry, release_lock: str | None = None) -> bool:
        """Store the entry; `release_lock`: the load lock's token, released in the same round trip."""
        self._write({key: entry}, release_lock)
        return True

    def set_many(self, entries: dict[str, StoredEntry]) -> int:
        self._write(entries)
        return len(entries)

    def _write(self, entries: dict[str, StoredEntry], release_lock: str | None = None) -> None:
        """The entries and their tags, one pipeline per server (one round trip on one server)."""
        pipes: dict[int, Any] = {}

        def pipe_for(redis_key: str) -> Any:
            client = self.topology.client_for(redis_key)
            pipe = pipes.get(id(client))
            if pipe is None:
                pipe = pipes[id(client)] = client.pipeline(transaction=False)
            return pipe

        def write() -> None:
            now = time.time()
            for key, entry in entries.items():
                milliseconds = max(1, int((entry.expires_at - now) * 1000))
                name = self._key(key)
                pipe_for(name).set(
                    name, _TIMES.pack(entry.fresh_until, entry.expires_at) + entry.data, px=milliseconds
                )
                if release_lock is not None and self.topology.mode != "cluster":
                    pipe_for(name).eval(_RELEASE_LOCK, 1, self._lock(key), release_lock)
                for tag in entry.tags:
                    pipe = pipe_for(self._tag(tag))
                    pipe.sadd(self._tag(tag), key)
                    # A tag set lives as long as its longest-lived entry (NX for a new set, GT after).
                    pipe.pexpire(self._tag(tag), milliseconds, nx=True)
                    pipe.pexpire(self._tag(tag), milliseconds, gt=True)
            for pipe in pipes.values():
                pipe.execute()
            if release_lock is not None and self.topology.mode == "cluster":  # its pipelines run no scripts
                (key,) = entries
                self.release_lock(key, release_lock)

        self._call(write)

    def delete(self, keys: Iterable[str]) -> None:
        for client, names in self.topology.group_by_client(self._key(key) for key in keys):
            self._call(client.delete, *names)

    def delete_tags(self, tags: Iterable[str]) -> set[str]:
        found: set[str] = set()
        for tag in tags:
            client = self.topology.client_for(self._tag(tag))
            members = self._call(client.smembers, self._tag(tag))
            found.update(member.decode() if isinstance(member, bytes) else member for member in members)
            self._call(client.delete, self._tag(tag))
        self.delete(found)
        return found

    # The load lock of a cold key (cache.py): one holder across processes, expiring by itself.

    # A lock's client is its entry's (by the entry's name): on a ring both live on one server.

    def get_or_lock(self, key: str, token: str, timeout_ms: int) -> StoredEntry | bool:
        """The stored entry, else whether this caller now holds the key's load lock: the check for a
        value another process loaded meanwhile and the lock in one round trip (a script)."""
        name = self._key(key)
        reply = self._call(
            self.topology.client_for(name).eval, _GET_OR_LOCK, 2, name, self._lock(key), token, timeout_ms
        )
        if reply[0] == 1:
            return _stored(reply[1])
        return reply[0] == 2

    def acquire_lock(self, key: str, token: str, timeout_ms: int) -> bool:
        name = self._lock(key)
        return bool(
            self._call(self.topology.client_for(self._key(key)).set, name, token, nx=True, px=timeout_ms)
        )

    def lock_held(self, key: str) -> bool:
        return bool(self._call(self.topology.client_for(self._key(key)).exists, self._lock(key)))

    def release_lock(self, key: str, token: str) -> None:
        self._call(self.topology.client_for(self._key(key)).eval, _RELEASE_LOCK, 1, self._lock(key), token)


def _stored(raw: bytes | None) -> StoredEntry | None:
    """An entry from its Redis string: the two times, then the encoded value."""
    if raw is None:
        return None
    if len(raw) < _TIMES.size:
        return StoredEntry(b"", 0.0, 0.0)  # truncated: decodes as corrupt
    fresh_until, expires_at = _TIMES.unpack_from(raw)
    return StoredEntry(raw[_TIMES.size :], fresh_until, expires_at)


_RELEASE_LOCK = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
# KEYS: the entry, its lock; ARGV: the token, the lock's timeout (ms). {1, entry} | {2}: locked | {0}.
_GET_OR_LOCK = """
local stored = redis.call('get', KEYS[1])
if stored then return {1, stored} end
if redis.call('set', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2} end
return {0}
"""


# --- L3 ----------------------------------------------------------------------------------------------

# Expired rows are purged on one write in this many (reads ignore them anyway).
PURGE_EVERY_WRITES = 500


class DatabaseLayer(Layer):
    """L3: the platform store's `cache_entries` table (with `cache_entry_tags`), SQLite or PostgreSQL."""

    name = "database"

    def __init__(self, engine: Any, namespace: str, version: int):
        self.engine = engine
        self.namespace = namespace
        self.prefix = f"v{version}:"
        self._writes = 0

    def _session(self):
        from orchestration.store.db import session_scope

        return session_scope(self.engine)

    def _guard(self, function):
        import sqlalchemy as sa

        try:
            return function()
        except sa.exc.OperationalError as exc:
            raise LayerUnavailable(f"database: {str(exc.orig).strip().splitlines()[0]}") from None

    def get(self, key: str) -> StoredEntry | None:
        from orchestration.store.models import CacheEntry

        def read() -> StoredEntry | None:
            with self._session() as session:
                row = session.get(CacheEntry, (self.namespace, self.prefix + key))
                if row is None:
                    return None
                return StoredEntry(bytes(row.value), row.fresh_until, row.expires_at, tuple(row.tags or ()))

        return self._guard(read)

    def set(self, key: str, entry: StoredEntry) -> bool:
        return self.set_many({key: entry}) == 1

    def set_many(self, entries: dict[str, StoredEntry]) -> int:
        """The entries in one transaction."""
        from sqlalchemy import delete

        from orchestration.store.models import CacheEntry, CacheEntryTag

        purge = self._writes // PURGE_EVERY_WRITES != (self._writes + len(entries)) // PURGE_EVERY_WRITES
        self._writes += len(entries)

        def write() -> None:
            with self._session() as session:
                for key, entry in entries.items():
                    stored_key = self.prefix + key
                    session.execute(
                        delete(CacheEntryTag)
                        .where(CacheEntryTag.namespace == self.namespace)
                        .where(CacheEntryTag.key == stored_key)
                    )
                    session.merge(
                        CacheEntry(
                            namespace=self.namespace,
                            key=stored_key,
                            value=entry.data,
                            fresh_until=entry.fresh_until,
                            expires_at=entry.expires_at,
                            tags=list(entry.tags),
                        )
                    )
                    for tag in entry.tags:
                        session.add(CacheEntryTag(namespace=self.namespace, tag=tag, key=stored_key))
                if purge:
                    session.execute(
                        delete(CacheEntry)
                        .where(CacheEntry.namespace == self.namespace)
                        .where(CacheEntry.expires_at < time.time())
                    )

        self._guard(write)
        return len(entries)

    def delete(self, keys: Iterable[str]) -> None:
        from sqlalchemy import delete

        from orchestration.store.models import CacheEntry, CacheEntryTag

        stored = [self.prefix + key for key in keys]
        if not stored:
            return

        def remove() -> None:
            with self._session() as session:
                for start in range(0, len(stored), 500):
                    part = stored[start : start + 500]
                    for model in (CacheEntryTag, CacheEntry):
                        session.execute(
                            delete(model).where(model.namespace == self.namespace).where(model.key.in_(part))
                        )

        self._guard(remove)

    def delete_tags(self, tags: Iterable[str]) -> set[str]:
        from sqlalchemy import select

        from orchestration.store.models import CacheEntryTag

        tags = list(tags)

        def keys_of() -> set[str]:
            with self._session() as session:
                return set(
                    session.scalars(
                        select(CacheEntryTag.key)
                        .where(CacheEntryTag.namespace == self.namespace)
                        .where(CacheEntryTag.tag.in_(tags))
                    )
                )

        stored = self._guard(keys_of)
        keys = {key.removeprefix(self.prefix) for key in stored if key.startswith(self.prefix)}
        self.delete(keys)
        return keys
