"""The publish buffer, the async API and the Dagster resource, on every backend."""

from __future__ import annotations

import time

import anyio
import dagster as dg
import pytest

from resources.event_stream import EventsLost, EventStream
from resources.event_stream.aio import AsyncRedisEventStream, open_async
from resources.event_stream.buffer import PublishBuffer
from resources.event_stream.resource import EventStreamResource


def payloads(event_stream: EventStream, stream: str = "orders") -> list:
    return [event.payload for event in event_stream.read(stream, limit=1000)]


def test_buffer_flushes_on_size_time_and_close(event_stream: EventStream, declare):
    declare("orders", payload_schema={"type": "object", "required": ["n"]})
    with PublishBuffer(event_stream, "orders", max_events=3, max_delay_s=0.2) as buffer:
        for n in range(3):
            buffer.add({"n": n})
        assert payloads(event_stream) == [{"n": 0}, {"n": 1}, {"n": 2}], "a full batch is sent at once"

        buffer.add({"n": 3})
        assert len(payloads(event_stream)) == 3
        deadline = time.monotonic() + 5
        while len(payloads(event_stream)) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert payloads(event_stream)[-1] == {"n": 3}, "the oldest waiting event is sent after max_delay_s"

        buffer.add({"wrong": True})
        buffer.add({"n": 5}, idempotency_key="five")
    assert payloads(event_stream)[-1] == {"n": 5}, "closing flushes what is left"
    rejected = [result for batch in buffer.results for result in batch.rejected]
    assert [(r.index, r.reason) for r in rejected] == [(0, 'payload: "n" is a required property')]


def test_async_api(event_stream: EventStream, declare):
    declare("orders", retention={"max_count": 3})
    events = open_async(event_stream)
    assert isinstance(events, AsyncRedisEventStream) == (event_stream.backend == "redis")

    async def scenario() -> None:
        first = await events.publish("orders", {"n": 0})
        await events.publish_batch("orders", [{"n": n} for n in range(1, 5)])
        assert [e.payload["n"] for e in await events.read("orders", limit=2)] == [0, 1]

        async with anyio.create_task_group() as tasks:
            received = []

            async def wait_for_one() -> None:
                received.extend(await events.read("orders", after_id="$", block_ms=5000))

            tasks.start_soon(wait_for_one)
            await anyio.sleep(0.2)
            await events.publish("orders", {"n": 5})
        assert [e.payload for e in received] == [{"n": 5}]

        assert [e.payload["n"] async for e in events.iter_events("orders")] == list(range(6))
        once = await events.publish("orders", {"n": 6}, idempotency_key="six")
        twice = await events.publish("orders", {"n": 6}, idempotency_key="six")
        assert (once.status, twice.status, twice.id) == ("accepted", "duplicate", once.id)
        await events.publish_batch("orders", [{"n": n} for n in range(7, 200)])
        assert 3 <= (await events.stats("orders")).length < 200, "publishing applies the retention"
        await events.trim("orders")
        with pytest.raises(EventsLost):
            await events.read("orders", after_id=first.id)
        assert (await events.stats("orders")).length == 3

        assert await events.create_group("orders", "g", "0") is True
        with pytest.raises(EventsLost):
            await events.read_group("orders", "g", "c")
        await events.aclose()

    anyio.run(scenario)


def test_dagster_resource_in_an_op(store_url: str, monkeypatch: pytest.MonkeyPatch):
    from orchestration.store import get_engine
    from resources.event_stream import StreamRegistry, StreamSpec

    StreamRegistry(get_engine(store_url)).upsert(StreamSpec(name="orders"))

    @dg.op
    def publish_and_read(events: EventStreamResource) -> list:
        stream = events.get_stream()
        stream.publish("orders", {"from": "op"})
        return [event.payload for event in stream.read("orders")]

    @dg.job
    def events_job():
        publish_and_read()

    result = events_job.execute_in_process(resources={"events": EventStreamResource()})
    assert result.success
    assert result.output_for_node("publish_and_read") == [{"from": "op"}]
    with EventStreamResource().open() as stream:
        assert stream.backend == "sql"
