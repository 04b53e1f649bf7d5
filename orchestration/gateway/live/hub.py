"""Fan-out of new events to live subscriptions: one reader per stream per gateway process.

A thousand subscribers of one stream cost one blocking read, not a thousand: the stream's `StreamTail`
reads every new event once, encodes it once, and offers the batch to each subscription, which keeps
what passes its filter and hands it to its connection.

Gap-free start from any position (the proof the tests pin):
1. A subscription registers with the tail first, *buffering* what the tail offers from then on; every
   event the tail will offer has an id above the tail's cursor at that moment.
2. It then catches up with reads of its own from its position, page by page; these reads start after
   the registration, so they see every event up to the tail's cursor and beyond.
3. When a read comes back short (the end of the stream), it delivers the buffered events whose id is
   above the last one it delivered and goes live, in one step with no await in between.
Ids only increase, so "above the last delivered id" removes the overlap: no gap, no duplicate. A
buffer that grows past `MAX_BUFFERED` during a long catch-up is dropped and the catch-up repeats from
where it got (the stream still holds those events). Retention removing events before they were read
is reported as `events_lost(from, to)`, never skipped silently.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Protocol

from orchestration.gateway.live.protocol import Filter, encode_event
from resources.event_stream import EventId, EventsLost
from resources.event_stream.aio import AsyncEventStream

logger = logging.getLogger("junction.gateway.live")
PAGE = 500
MAX_BUFFERED = 10_000
TAIL_BLOCK_MS = 1000
# A tail that cannot read (the backend is down) tries again after this long.
TAIL_RETRY_S = 1.0

Batch = list[tuple]  # (Event, its encoded JSON) pairs, in id order


class Sink(Protocol):
    """Where a subscription's events go (a WebSocket connection, an SSE response)."""

    def send_events(self, subscription: Subscription, chosen: Batch, last_id: str) -> None:
        """`chosen`: (event, encoded) pairs in id order; `last_id`: the subscription's position after them."""

    def send_lost(self, subscription: Subscription, from_id: str, to_id: str) -> None: ...

    def stream_failed(self, subscription: Subscription, error: Exception) -> None: ...


class Subscription:
    """One subscription of one client: its stream, filter and the last id it was handed."""

    def __init__(self, sub_id: str, stream: str, filter_: Filter, sink: Sink):
        self.id, self.stream, self.filter, self.sink = sub_id, stream, filter_, sink
        # The highest id delivered or filtered out; None: nothing yet, from the oldest retained.
        self.position: EventId | None = None
        self.live = False
        self.buffer: Batch | None = []
        self.buffer_dropped = False
        self.closed = False
        self.catch_up_task: asyncio.Task | None = None

    def offer(self, batch: Batch, selections: dict[bytes, Batch]) -> int:
        """The tail's new events: buffered while catching up, delivered when live (returns how many).
        `selections`: the batch's events per filter, shared by the subscriptions of this batch."""
        if self.closed:
            return 0
        if self.live:
            return self.deliver(batch, selections)
        if self.buffer is not None:
            if len(self.buffer) + len(batch) > MAX_BUFFERED:
                self.buffer, self.buffer_dropped = [], True
            else:
                self.buffer.extend(batch)
        return 0

    def deliver(self, batch: Batch, selections: dict[bytes, Batch] | None = None) -> int:
        """Hand the events above the position that pass the filter to the sink; advance the position.
        Returns how many were handed over."""
        if not batch:
            return 0
        position, matches = self.position, self.filter.matches
        if selections is not None and (position is None or batch[0][0].event_id > position):
            # The whole batch is past this subscription's position: the filter's selection is shared.
            chosen = selections.get(self.filter.key)
            if chosen is None:
                chosen = selections[self.filter.key] = [pair for pair in batch if matches(pair[0].payload)]
        else:
            chosen = [
                (event, encoded)
                for event, encoded in batch
                if (position is None or event.event_id > position) and matches(event.payload)
            ]
        last = batch[-1][0].event_id
        if position is None or last > position:
            self.position = last
        if chosen:
            self.sink.send_events(self, chosen, str(self.position))
        return len(chosen)

    def lost(self, from_id: str, to_id: str) -> None:
        self.position = EventId.parse(to_id)
        self.sink.send_lost(self, from_id, to_id)


class StreamTail:
    """The one reader of new events of a stream in this process, while it has subscriptions."""

    def __init__(self, hub: LiveHub, stream: str):
        self.hub, self.stream = hub, stream
        self.subscriptions: dict[int, Subscription] = {}
        self.cursor: EventId | None = None
        self.ready = asyncio.Event()
        self.running = True
        self.failure: Exception | None = None
        self.task = asyncio.create_task(self.run(), name=f"live tail {stream}")

    async def run(self) -> None:
        try:
            self.cursor = await self.hub.events.last_id(self.stream)
        except Exception as exc:  # noqa: BLE001 - reported to the subscriber that started the tail
            self.failure, self.running = exc, False
            self.ready.set()
            return
        self.ready.set()
        while True:
            try:
                events = await self.hub.events.read(
                    self.stream, str(self.cursor), limit=PAGE, block_ms=TAIL_BLOCK_MS
                )
            except EventsLost as lost:
                self.cursor = EventId.parse(lost.to_id)
                for subscription in list(self.subscriptions.values()):
                    if subscription.live:
                        subscription.lost(lost.from_id, lost.to_id)
                    else:  # its own catch-up reads will meet the loss: start them again
                        subscription.buffer, subscription.buffer_dropped = [], True
                continue
            except Exception as exc:  # noqa: BLE001 - e.g. the backend is unreachable: fail loudly
                logger.warning("live tail of %s cannot read: %s", self.stream, exc)
                self._fail_all(exc)
                break
            if events:
                self.cursor = events[-1].event_id
                batch = [(event, encode_event(event)) for event in events]
                self.hub.events_read[self.stream] += len(events)
                selections: dict[bytes, Batch] = {}
                delivered = 0
                for subscription in list(self.subscriptions.values()):
                    delivered += subscription.offer(batch, selections)
                self.hub.events_delivered[self.stream] += delivered
            if not self.subscriptions:  # checked after a read: the first subscriber registers meanwhile
                break
        self.running = False  # synchronously after the last check: a new subscriber starts a new tail

    def _fail_all(self, error: Exception) -> None:
        for subscription in list(self.subscriptions.values()):
            subscription.closed = True
            subscription.sink.stream_failed(subscription, error)
        self.subscriptions.clear()


class LiveHub:
    """Every live subscription of a gateway process, and one `StreamTail` per subscribed stream."""

    def __init__(self, events: AsyncEventStream):
        self.events = events
        self.tails: dict[str, StreamTail] = {}
        self.events_read: Counter[str] = Counter()
        self.events_delivered: Counter[str] = Counter()

    async def subscribe(self, subscription: Subscription, cursor: str | None) -> None:
        """Start `subscription` after `cursor` (None: the oldest retained; `$`: new events only).

        Raises the stream's errors (`StreamNotFound`, `EventStreamUnavailable`) before registering."""
        stream = subscription.stream
        tail = self.tails.get(stream)
        if tail is None or not tail.running:
            await self.events.last_id(stream)  # the stream is declared and the backend answers
            tail = self.tails.get(stream)
            if tail is None or not tail.running:
                tail = self.tails[stream] = StreamTail(self, stream)
        await tail.ready.wait()
        if tail.failure is not None:
            del self.tails[stream]
            raise tail.failure
        if cursor == "$":
            subscription.position = tail.cursor
            subscription.live, subscription.buffer = True, None
        else:
            subscription.position = EventId.parse(cursor) if cursor is not None else None
            subscription.catch_up_task = asyncio.create_task(
                self._catch_up(subscription), name=f"live catch-up {subscription.id}"
            )
        # Registered last, with no await after it: the caller's `subscribed` reply precedes any event.
        tail.subscriptions[id(subscription)] = subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        subscription.closed = True
        if subscription.catch_up_task is not None:
            subscription.catch_up_task.cancel()
        tail = self.tails.get(subscription.stream)
        if tail is not None:
            tail.subscriptions.pop(id(subscription), None)

    async def _catch_up(self, subscription: Subscription) -> None:
        stream = subscription.stream
        try:
            while not subscription.closed:
                subscription.buffer, subscription.buffer_dropped = [], False
                while True:
                    position = subscription.position
                    try:
                        events = await self.events.read(
                            stream, str(position) if position is not None else None, limit=PAGE
                        )
                    except EventsLost as lost:
                        subscription.lost(lost.from_id, lost.to_id)
                        continue
                    if subscription.closed:
                        return
                    self.events_delivered[stream] += subscription.deliver(
                        [(event, encode_event(event)) for event in events]
                    )
                    if len(events) < PAGE:
                        break
                if subscription.buffer_dropped:
                    continue
                buffered, subscription.buffer = subscription.buffer or [], None
                subscription.live = True
                self.events_delivered[stream] += subscription.deliver(buffered)
                return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the subscriber hears of it
            subscription.closed = True
            subscription.sink.stream_failed(subscription, exc)

    def stream_figures(self, stream: str) -> dict[str, int]:
        """This process's live side of `stream`: subscriptions now, events read and delivered so far."""
        tail = self.tails.get(stream)
        return {
            "subscriptions": len(tail.subscriptions) if tail is not None and tail.running else 0,
            "events_read": self.events_read[stream],
            "events_delivered": self.events_delivered[stream],
        }

    def streams(self) -> set[str]:
        return set(self.tails) | set(self.events_read) | set(self.events_delivered)

    async def aclose(self) -> None:
        for tail in self.tails.values():
            tail.subscriptions.clear()
            tail.task.cancel()
        self.tails.clear()
