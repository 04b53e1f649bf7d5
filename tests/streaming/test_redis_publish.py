"""Publishing on Redis costs one round trip per publish (per thousand events of a batch)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.connection import AbstractConnection

from orchestration.store import get_engine, upgrade
from resources.event_stream import EventToPublish, StreamRegistry, StreamSpec
from resources.event_stream.redis_backend import RedisEventStream

COMMAND_NAME = re.compile(rb"\*\d+\r\n\$\d+\r\n([A-Za-z]+)\r\n")


@pytest.fixture
def redis_stream(clean_redis_url: str, junction_home: Path) -> Iterator[RedisEventStream]:
    store_url = f"sqlite:///{junction_home / 'platform.db'}"
    upgrade(store_url)
    stream = RedisEventStream(clean_redis_url, StreamRegistry(get_engine(store_url)))
    yield stream
    stream.close()


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The commands redis-py sends from now on, one list per write to the socket (a round trip)."""
    writes: list[list[str]] = []
    original = AbstractConnection.send_packed_command

    def recording(self, command, check_health=True):
        data = command if isinstance(command, bytes) else b"".join(command)
        writes.append([name.decode().upper() for name in COMMAND_NAME.findall(data)])
        return original(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", recording)
    return writes


def test_each_publish_is_one_script_call_with_retention_and_keys(
    redis_stream: RedisEventStream, sent: list[list[str]]
):
    redis_stream.registry.upsert(StreamSpec(name="orders", retention={"max_count": 5, "max_age": "1d"}))
    redis_stream.publish("orders", {"n": 0})  # a server that does not know the script yet loads it once
    sent.clear()

    assert redis_stream.publish("orders", {"n": 1}).status == "accepted"
    assert redis_stream.publish("orders", {"n": 1}, idempotency_key="k1").status == "accepted"
    batch = redis_stream.publish_batch(
        "orders", [EventToPublish({"n": 1}, "k1"), *({"n": n} for n in range(150))]
    )
    assert [r.status for r in batch.results[:2]] == ["duplicate", "accepted"]
    assert sent == [["EVALSHA"]] * 3

    sent.clear()
    assert len(redis_stream.publish_batch("orders", [{"n": n} for n in range(2500)]).accepted) == 2500
    assert sent == [["EVALSHA"]] * 3, "one call per thousand events"

    stats = redis_stream.stats("orders")
    assert stats.length == 5, "the publishes applied the retention themselves"
    assert stats.events_added == 1 + 2 + 150 + 2500
    assert stats.rate_1m > 0
