"""The async face of an `EventStream`, for the gateway and WebSocket subscriptions.

`open_async(events)` gives:
- on Redis, `AsyncRedisEventStream`: publishing and reading (the hot paths of the gateway and of
  subscriptions, including blocking reads) run natively on redis.asyncio with the same Lua scripts,
  command queueing and reply parsing as the sync backend; the rarer operations (consumer groups,
  stats, trim) run the sync implementation in a worker thread.
- on SQL, `AsyncEventStream`: every call runs the sync implementation in a worker thread
  (`anyio.to_thread`; the store's drivers are sync). A blocking read holds a thread (anyio's default
  limiter: 40) for up to `block_ms`, so subscription handlers should use short blocks and loop.

Stream definitions come from the registry's cache, refreshed in a thread when stale.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import anyio.to_thread

from resources.event_stream.core import (
    ZERO_ID,
    BatchResult,
    ClaimResult,
    Event,
    EventId,
    EventStream,
    EventToPublish,
    PendingEvent,
    PublishResult,
    StreamStats,
    check_nothing_lost,
    combine_results,
    validate_batch,
)


class AsyncEventStream:
    def __init__(self, events: EventStream):
        self.sync = events

    async def _run(self, function, *args, **kwargs):
        return await anyio.to_thread.run_sync(functools.partial(function, *args, **kwargs))

    async def publish(
        self, stream: str, payload: Any, *, idempotency_key: str | None = None
    ) -> PublishResult:
        return await self._run(self.sync.publish, stream, payload, idempotency_key=idempotency_key)

    async def publish_batch(self, stream: str, events: Sequence[Any | EventToPublish]) -> BatchResult:
        return await self._run(self.sync.publish_batch, stream, events)

    async def read(
        self, stream: str, after_id: str | None = None, *, limit: int = 100, block_ms: int = 0
    ) -> list[Event]:
        return await self._run(self.sync.read, stream, after_id, limit=limit, block_ms=block_ms)

    async def read_range(
        self, stream: str, start_time: datetime, end_time: datetime, *, limit: int | None = None
    ) -> list[Event]:
        return await self._run(self.sync.read_range, stream, start_time, end_time, limit=limit)

    async def iter_events(
        self,
        stream: str,
        after_id: str | None = None,
        *,
        follow: bool = False,
        page_size: int = 500,
        block_ms: int = 1000,
    ) -> AsyncIterator[Event]:
        """Like `EventStream.iter_events`; each page is one thread call, so cancellation is prompt."""
        if after_id == "$":
            after_id = str(await self._last_id(stream))
        while True:
            events = await self.read(stream, after_id, limit=page_size, block_ms=block_ms if follow else 0)
            for event in events:
                yield event
            if events:
                after_id = events[-1].id
            elif not follow:
                return
            if not follow and len(events) < page_size:
                return

    async def last_id(self, stream: str) -> EventId:
        """The id of the newest event ever added to the declared `stream` (0-0 when empty)."""
        await self._run(self.sync.registry.get, stream)
        return await self._last_id(stream)

    async def _last_id(self, stream: str) -> EventId:
        return await self._run(self.sync._last_id, stream)

    async def create_group(self, stream: str, group: str, start_id: str = "$") -> bool:
        return await self._run(self.sync.create_group, stream, group, start_id)

    async def set_group_position(self, stream: str, group: str, last_delivered_id: str) -> None:
        await self._run(self.sync.set_group_position, stream, group, last_delivered_id)

    async def read_group(
        self, stream: str, group: str, consumer: str, *, limit: int = 100, block_ms: int = 0
    ) -> list[Event]:
        return await self._run(self.sync.read_group, stream, group, consumer, limit=limit, block_ms=block_ms)

    async def ack(self, stream: str, group: str, ids: Sequence[str]) -> int:
        return await self._run(self.sync.ack, stream, group, ids)

    async def touch(self, stream: str, group: str, consumer: str, ids: Sequence[str]) -> int:
        return await self._run(self.sync.touch, stream, group, consumer, ids)

    async def dead_letter(
        self, stream: str, group: str, records: Mapping[str, Mapping[str, Any]]
    ) -> list[str]:
        return await self._run(self.sync.dead_letter, stream, group, records)

    async def delete_group(self, stream: str, group: str) -> bool:
        return await self._run(self.sync.delete_group, stream, group)

    async def pending(self, stream: str, group: str, *, limit: int = 100) -> list[PendingEvent]:
        return await self._run(self.sync.pending, stream, group, limit=limit)

    async def claim_stale(
        self,
        stream: str,
        group: str,
        consumer: str,
        *,
        min_idle_ms: int,
        limit: int = 100,
        max_deliveries: int | None = None,
    ) -> ClaimResult:
        return await self._run(
            self.sync.claim_stale,
            stream,
            group,
            consumer,
            min_idle_ms=min_idle_ms,
            limit=limit,
            max_deliveries=max_deliveries,
        )

    async def stats(self, stream: str) -> StreamStats:
        return await self._run(self.sync.stats, stream)

    async def trim(self, stream: str) -> int:
        return await self._run(self.sync.trim, stream)

    async def aclose(self) -> None:
        await self._run(self.sync.close)


class AsyncRedisEventStream(AsyncEventStream):
    """Publish and read natively on redis.asyncio; the same semantics as `RedisEventStream`."""

    def __init__(self, events):
        import redis.asyncio

        from resources.event_stream import redis_backend

        super().__init__(events)
        self._backend = redis_backend
        self.client = redis.asyncio.Redis.from_url(
            events.url, decode_responses=True, protocol=2, socket_connect_timeout=3
        )
        self._publish_script = self.client.register_script(redis_backend.PUBLISH)
        self._read_page_script = self.client.register_script(redis_backend.READ_PAGE)

    async def _definition(self, stream: str):
        return await self._run(self.sync.registry.get, stream)

    async def _call(self, awaitable):
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        try:
            return await awaitable
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise self._backend.unavailable_error(self.sync.url, exc) from None

    async def publish(
        self, stream: str, payload: Any, *, idempotency_key: str | None = None
    ) -> PublishResult:
        return (await self.publish_batch(stream, [EventToPublish(payload, idempotency_key)])).results[0]

    async def publish_batch(self, stream: str, events: Sequence[Any | EventToPublish]) -> BatchResult:
        definition = await self._definition(stream)
        rejected, valid = validate_batch(definition, events)
        appended = []
        if valid:
            replies = [
                await self._call(self._publish_script(keys=keys, args=args))
                for keys, args in self._backend.publish_calls(definition, valid)
            ]
            appended = self._backend.append_results(valid, replies)
        return combine_results(len(events), rejected, appended)

    async def read(
        self, stream: str, after_id: str | None = None, *, limit: int = 100, block_ms: int = 0
    ) -> list[Event]:
        await self._definition(stream)
        key = self._backend.stream_key(stream)
        if after_id == "$":
            after_id = str(await self._last_id(stream))
        after = EventId.parse(after_id) if after_id is not None else None
        deadline = anyio.current_time() + block_ms / 1000
        while True:
            reply = await self._call(
                self._read_page_script(**self._backend.read_page_call(stream, after, None, limit))
            )
            page = self._backend.page_from_reply(stream, reply)
            check_nothing_lost(stream, after, page)
            remaining_ms = int((deadline - anyio.current_time()) * 1000)
            if page.events or remaining_ms <= 0:
                return page.events
            wait_after = max(after or ZERO_ID, page.last_id)
            await self._call(self.client.xread({key: str(wait_after)}, count=1, block=max(1, remaining_ms)))

    async def _last_id(self, stream: str) -> EventId:
        from redis.exceptions import ResponseError

        try:
            info = await self._call(self.client.xinfo_stream(self._backend.stream_key(stream)))
        except ResponseError:
            return ZERO_ID
        return EventId.parse(info["last-generated-id"])

    async def aclose(self) -> None:
        await self.client.aclose()
        await super().aclose()


def open_async(events: EventStream) -> AsyncEventStream:
    """The async face of `events`: native redis.asyncio on Redis, worker threads on SQL."""
    return AsyncRedisEventStream(events) if events.backend == "redis" else AsyncEventStream(events)


__all__ = ["AsyncEventStream", "AsyncRedisEventStream", "open_async"]
