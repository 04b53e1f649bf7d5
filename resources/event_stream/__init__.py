"""The event stream resource: publish, read, replay and consume events of declared streams.

One interface (`EventStream`), two backends with the same semantics, proven by one contract suite
(`tests/streaming/test_contract.py`) on Redis, SQLite and PostgreSQL:

- `RedisEventStream` (`JUNCTION_REDIS_URL` set): Redis Streams.
- `SqlEventStream` (the embedded default): the platform store, SQLite or PostgreSQL.

Semantics
- Streams are declared (YAML in `JUNCTION_STREAMS_DIR`, or `StreamRegistry.upsert`); publishing to an
  undeclared stream raises `StreamNotFound`. Each has one owner, its origin (`api` or `yaml:<file>`),
  and only its owner changes it (`registry.py`).
- Ids are `ms-seq` on both backends (Redis's own form): comparable as (ms, seq), only increasing
  within a stream, and a reader that has seen id N never later finds a committed id below N
  (Redis appends in order; the SQL backend serialises a stream's publishers, see `sql.py`). An id is
  a resumable cursor; an event's publish time is its id's millisecond.
- Payloads are validated against the stream's JSON Schema (jsonschema-rs, compiled once); in a
  batch the valid events are stored and each invalid one is reported by index with the reason.
- An idempotency key makes a repeat within the stream's window a `duplicate` (with the original id).
- Retention keeps at least `max_count` events / everything younger than `max_age` (approximate while
  publishing, exact with `trim()`). A read whose cursor is below the highest id retention removed
  raises `EventsLost(stream, from_id, to_id)`; nothing is ever skipped silently.
- Consumer groups deliver each event to one consumer, keep it pending until acknowledged, let
  `claim_stale` take over what a dead consumer left, and dead-letter an event after N deliveries.
- An unreachable Redis raises `EventStreamUnavailable` (a `JunctionError`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from resources.event_stream.core import (
        BatchResult,
        ClaimResult,
        Event,
        EventId,
        EventsLost,
        EventStream,
        EventStreamError,
        EventStreamUnavailable,
        EventToPublish,
        GroupNotFound,
        GroupStats,
        InvalidEventId,
        PendingEvent,
        PublishResult,
        StreamNotFound,
        StreamStats,
        dead_letter_stream,
    )
    from resources.event_stream.registry import (
        StreamDefinition,
        StreamOwnedElsewhere,
        StreamRegistry,
        StreamSpec,
        load_stream_specs,
    )

# The registry (SQLAlchemy, jsonschema-rs, pydantic) loads on first use of one of its names, so a
# module that needs only `core` (the spec loader checks stream names with its pattern) stays cheap.
_REGISTRY_NAMES = {
    "StreamDefinition",
    "StreamOwnedElsewhere",
    "StreamRegistry",
    "StreamSpec",
    "load_stream_specs",
}


def __getattr__(name: str):
    if name in _REGISTRY_NAMES:
        from resources.event_stream import registry

        return getattr(registry, name)
    if name in __all__:
        from resources.event_stream import core

        return getattr(core, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BatchResult",
    "ClaimResult",
    "Event",
    "EventId",
    "EventStream",
    "EventStreamError",
    "EventStreamUnavailable",
    "EventToPublish",
    "EventsLost",
    "GroupNotFound",
    "GroupStats",
    "InvalidEventId",
    "PendingEvent",
    "PublishResult",
    "StreamDefinition",
    "StreamNotFound",
    "StreamOwnedElsewhere",
    "StreamRegistry",
    "StreamSpec",
    "StreamStats",
    "dead_letter_stream",
    "load_stream_specs",
    "open_event_stream",
]


def open_event_stream(redis_url: str | None = None, store_url: str | None = None) -> EventStream:
    """The platform's event stream: Redis when `redis_url` (default `JUNCTION_REDIS_URL`) is set, else SQL.

    The streams registry is always the platform store at `store_url` (default: the settings').
    """
    from orchestration.settings import get_settings
    from orchestration.store.db import get_engine
    from resources.event_stream.registry import StreamRegistry

    settings = get_settings()
    registry = StreamRegistry(get_engine(store_url or settings.store_url))
    redis_url = redis_url or settings.redis_url
    if redis_url:
        from resources.event_stream.redis_backend import RedisEventStream

        return RedisEventStream(redis_url, registry)
    from resources.event_stream.sql import SqlEventStream

    return SqlEventStream(registry.engine, registry)
