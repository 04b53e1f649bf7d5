"""An unreachable Redis is a clear error: nothing is published or dropped silently."""

from __future__ import annotations

import pytest
from support import free_port

from orchestration.store import get_engine
from resources.event_stream import EventStreamUnavailable, StreamRegistry, StreamSpec
from resources.event_stream.buffer import BufferFull, PublishBuffer
from resources.event_stream.redis_backend import RedisEventStream


@pytest.fixture
def unreachable(store_url: str):
    registry = StreamRegistry(get_engine(store_url))
    registry.upsert(StreamSpec(name="orders"))
    stream = RedisEventStream(f"redis://:secret@127.0.0.1:{free_port()}/0", registry)
    yield stream
    stream.close()


def test_publish_to_an_unreachable_redis_raises(unreachable: RedisEventStream):
    with pytest.raises(
        EventStreamUnavailable, match=r"Redis at redis://:\*\*\*@127.0.0.1:\d+/0 is unreachable"
    ) as caught:
        unreachable.publish("orders", {"n": 1})
    assert "secret" not in str(caught.value)
    with pytest.raises(EventStreamUnavailable):
        unreachable.read("orders", after_id="0-0")


def test_the_buffer_is_bounded_while_redis_is_down(unreachable: RedisEventStream):
    buffer = PublishBuffer(
        unreachable, "orders", max_events=2, max_delay_s=60, capacity=4, on_error=lambda exc: None
    )
    for n in range(4):
        buffer.add({"n": n})
    with pytest.raises(BufferFull, match="4 events to 'orders' are waiting"):
        buffer.add({"n": 4})
    assert len(buffer) == 4, "failed flushes keep their events"
    with pytest.raises(EventStreamUnavailable):
        buffer.close()


def test_async_publish_to_an_unreachable_redis_raises(unreachable: RedisEventStream):
    import anyio

    from resources.event_stream.aio import open_async

    async def scenario() -> None:
        events = open_async(unreachable)
        with pytest.raises(EventStreamUnavailable, match="is unreachable"):
            await events.publish("orders", {"n": 1})
        with pytest.raises(EventStreamUnavailable, match="is unreachable"):
            await events.read("orders", block_ms=100)

    anyio.run(scenario)
