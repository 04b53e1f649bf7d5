"""Fixtures of the event stream tests: the same contract on Redis, SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from resources.event_stream import EventStream, StreamRegistry, StreamSpec


@pytest.fixture(params=["redis", "sqlite", "postgres"])
def event_stream(request: pytest.FixtureRequest, junction_home) -> Iterator[EventStream]:
    """An event stream on each backend; the registry in a fresh store of the matching kind."""
    from orchestration.store import get_engine, upgrade

    if request.param == "postgres":
        store_url = request.getfixturevalue("clean_postgres_url")
    else:
        store_url = f"sqlite:///{junction_home / 'platform.db'}"
    upgrade(store_url)
    registry = StreamRegistry(get_engine(store_url))
    if request.param == "redis":
        from resources.event_stream.redis_backend import RedisEventStream

        stream: EventStream = RedisEventStream(request.getfixturevalue("clean_redis_url"), registry)
    else:
        from resources.event_stream.sql import SqlEventStream

        stream = SqlEventStream(registry.engine, registry)
    yield stream
    stream.close()


@pytest.fixture
def declare(event_stream: EventStream):
    """Declare a stream: declare("orders", payload_schema={...}, retention={"max_count": 10})."""

    def declare_stream(name: str, **fields) -> str:
        event_stream.registry.upsert(StreamSpec(name=name, **fields))
        return name

    return declare_stream
