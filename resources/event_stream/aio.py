"""The async face of an `EventStream`, for the gateway and WebSocket subscriptions.

Every call runs the sync implementation in a worker thread (`anyio.to_thread`). One implementation
of the semantics (ids, gap detection, Lua scripts, commit-order locking) serves both faces, so the
contract suite proves the async API too; the price is a thread per in-flight call, bounded by
anyio's default limiter (40) — a blocking read holds one for up to `block_ms`, so subscription
handlers should use short blocks and loop. A native redis.asyncio path can replace a method here
without changing its signature.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

import anyio.to_thread

from resources.event_stream.core import (
    BatchResult,
    ClaimResult,
    Event,
    EventStream,
    EventToPublish,
    PendingEvent,
    PublishResult,
    StreamStats,
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
            after_id = str(await self._run(self.sync._last_id, stream))
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

    async def create_group(self, stream: str, group: str, start_id: str = "$") -> bool:
        return await self._run(self.sync.create_group, stream, group, start_id)

    async def read_group(
        self, stream: str, group: str, consumer: str, *, limit: int = 100, block_ms: int = 0
    ) -> list[Event]:
        return await self._run(self.sync.read_group, stream, group, consumer, limit=limit, block_ms=block_ms)

    async def ack(self, stream: str, group: str, ids: Sequence[str]) -> int:
        return await self._run(self.sync.ack, stream, group, ids)

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


__all__ = ["AsyncEventStream"]
