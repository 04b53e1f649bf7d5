"""One WebSocket connection: authentication, subscriptions, publishing, a bounded send queue,
heartbeats and the idle timeout.

Memory per connection stays bounded whatever the client does: frames wait in a queue of at most
`live_send_queue_bytes`; a client that reads slower than its subscriptions produce fills it, and is
then closed with `CLOSE_SLOW_CONSUMER` (4008) and, when it fits the close reason, the last id sent per
subscription. A client resumes from the last id it *received* (each event carries it).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from typing import Any

import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect

from orchestration.gateway.live import protocol
from orchestration.gateway.live.hub import Batch, LiveHub, Subscription
from orchestration.gateway.live.protocol import ProtocolError
from orchestration.kernel.principals import Principal, ScopeError
from orchestration.settings import JunctionSettings
from resources.event_stream import EventStreamUnavailable, StreamNotFound

CLOSE_TIMEOUT_S = 5


class SendQueue:
    """What waits to be sent to one client, bounded in bytes (a WebSocket's frames, an SSE response's
    messages): `put` refuses, and empties the queue, once the client is that far behind."""

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.items: deque[tuple[Any, int]] = deque()
        self.size = 0
        self.wake = asyncio.Event()

    def put(self, item: Any, size: int, *, always: bool = False) -> bool:
        """Queue `item`; False (and the queue dropped) when it would pass the bound, unless `always`."""
        if not always and self.size + size > self.limit_bytes:
            self.items.clear()
            self.size = 0
            return False
        self.items.append((item, size))
        self.size += size
        self.wake.set()
        return True

    async def get(self) -> Any:
        while not self.items:
            self.wake.clear()
            await self.wake.wait()
        item, size = self.items.popleft()
        self.size -= size
        return item


class ConnectionLimits:
    """Open connections per principal in this process (WebSocket and SSE together)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.open: Counter[str] = Counter()

    def acquire(self, principal: str) -> bool:
        if self.open[principal] >= self.limit:
            return False
        self.open[principal] += 1
        return True

    def release(self, principal: str) -> None:
        self.open[principal] -= 1
        if self.open[principal] <= 0:
            del self.open[principal]


def scope_problem(
    principal: Principal, action: str, stream: str, ref: dict[str, str]
) -> ProtocolError | None:
    """None when `principal` may `action` (`read`, `publish`) the stream; else the error to answer."""
    required = f"events:{action}:{stream}"
    try:
        allowed = principal.allows(required)
    except ScopeError:
        return ProtocolError("not-found", f"no stream named {stream!r}", field="stream", **ref)
    if allowed:
        return None
    return ProtocolError("forbidden", f"this needs the scope '{required}'", field="stream", **ref)


@contextlib.contextmanager
def stream_errors(stream: str, ref: dict[str, str]):
    """The stream backend's refusals as the protocol's errors (as `api.streams.StreamCalls` for HTTP)."""
    try:
        yield
    except StreamNotFound:
        raise ProtocolError("not-found", f"no stream named {stream!r}", field="stream", **ref) from None
    except EventStreamUnavailable as exc:
        raise ProtocolError("stream-unavailable", str(exc), **ref) from None


class LiveConnection:
    def __init__(
        self,
        websocket: WebSocket,
        hub: LiveHub,
        principal: Principal,
        settings: JunctionSettings,
        stats: LiveStats,
    ):
        self.websocket, self.hub, self.principal, self.stats = websocket, hub, principal, stats
        self.heartbeat_s = settings.live_heartbeat_s
        self.idle_timeout_s = settings.live_idle_timeout_s
        self.queue = SendQueue(settings.live_send_queue_bytes)  # of (frame, subscription, last id)
        self.closing: tuple[int, str] | None = None
        self.done = asyncio.Event()
        self.subscriptions: dict[str, Subscription] = {}
        self.sent_positions: dict[str, str] = {}
        self.published: Counter[str] = Counter()
        self.last_heard = time.monotonic()

    # -- the send queue (called synchronously by the hub's tasks) ----------------------------------

    def enqueue(self, frame: str, subscription: str | None = None, last_id: str | None = None) -> None:
        if self.closing is not None:
            return
        if not self.queue.put((frame, subscription, last_id), len(frame)):
            self.stats.slow_consumers += 1
            self.close_soon(protocol.CLOSE_SLOW_CONSUMER, self._slow_reason())

    def send_message(self, message: dict[str, Any]) -> None:
        self.enqueue(protocol.encode(message))

    def send_events(self, subscription: Subscription, chosen: Batch, last_id: str) -> None:
        encoded = [item[1] for item in chosen]
        for start in range(0, len(encoded), protocol.MAX_FRAME_EVENTS):
            part = encoded[start : start + protocol.MAX_FRAME_EVENTS]
            self.enqueue(
                protocol.events_frame(subscription.id, subscription.stream, part), subscription.id, last_id
            )

    def send_lost(self, subscription: Subscription, from_id: str, to_id: str) -> None:
        self.send_message({"type": "events_lost", "sub": subscription.id, "from": from_id, "to": to_id})

    def stream_failed(self, subscription: Subscription, error: Exception) -> None:
        self.close_soon(protocol.CLOSE_STREAM_UNAVAILABLE, f"stream {subscription.stream}: {error}"[:120])

    def close_soon(self, code: int, reason: str) -> None:
        if self.closing is None:
            self.closing = (code, reason)
            self.done.set()

    def _slow_reason(self) -> str:
        reason = "slow consumer: resume from the last id received"
        if self.sent_positions:
            with_positions = orjson.dumps({"slow_consumer": True, "resume": self.sent_positions}).decode()
            if len(with_positions.encode()) <= 123:  # a close reason's limit
                return with_positions
        return reason

    # -- serving ------------------------------------------------------------------------------------

    async def serve(self) -> None:
        self.send_message(
            {
                "type": "welcome",
                "principal": self.principal.name,
                "heartbeat_s": self.heartbeat_s,
                "idle_timeout_s": self.idle_timeout_s,
                "send_queue_bytes": self.queue.limit_bytes,
            }
        )
        # Two tasks per connection (a task costs a few KB): heartbeats and the idle timeout are one
        # loop for every connection of the process (`Heartbeats`).
        tasks = [
            asyncio.create_task(self._write(), name="live writer"),
            asyncio.create_task(self._read(), name="live reader"),
        ]
        try:
            await self.done.wait()
        finally:
            for task in tasks:
                task.cancel()
            for subscription in self.subscriptions.values():
                self.hub.unsubscribe(subscription)
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.closing is not None and self.closing[0] is not None:
            code, reason = self.closing
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.websocket.close(code, reason), CLOSE_TIMEOUT_S)

    async def _write(self) -> None:
        send = self.websocket.send_text
        try:
            while True:
                frame, subscription, last_id = await self.queue.get()
                await send(frame)
                if subscription is not None:
                    self.sent_positions[subscription] = last_id
        except (WebSocketDisconnect, RuntimeError, OSError):
            self.closing = self.closing or (None, "")  # gone: nothing to close
            self.done.set()

    async def _read(self) -> None:
        try:
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    self.closing = self.closing or (None, "")
                    self.done.set()
                    return
                self.last_heard = time.monotonic()
                text = message.get("text")
                if text is None:
                    text = message.get("bytes") or b""
                await self.handle(text)
        except (WebSocketDisconnect, RuntimeError, OSError):
            self.closing = self.closing or (None, "")
            self.done.set()

    # -- messages -----------------------------------------------------------------------------------

    async def handle(self, text: str | bytes) -> None:
        try:
            message = protocol.parse_message(text)
            if isinstance(message, protocol.Subscribe):
                await self.subscribe(message)
            elif isinstance(message, protocol.Unsubscribe):
                self.unsubscribe(message)
            elif isinstance(message, protocol.Publish):
                await self.publish(message)
            elif isinstance(message, protocol.Auth):
                raise ProtocolError("invalid-message", "already authenticated", field="type")
        except ProtocolError as error:
            self.send_message(error.to_message())

    async def subscribe(self, message: protocol.Subscribe) -> None:
        ref = {"ref": message.id}
        if message.id in self.subscriptions:
            raise ProtocolError("validation", f"subscription {message.id!r} exists", field="id", **ref)
        if len(self.subscriptions) >= protocol.MAX_SUBSCRIPTIONS:
            raise ProtocolError(
                "validation", f"at most {protocol.MAX_SUBSCRIPTIONS} subscriptions per connection", **ref
            )
        problem = scope_problem(self.principal, "read", message.stream, ref)
        if problem is not None:
            raise problem
        try:
            filter_ = protocol.Filter.parse(message.filter)
            cursor = protocol.start_cursor(message.from_)
        except ProtocolError as error:
            error.ref = message.id
            raise
        subscription = Subscription(message.id, message.stream, filter_, self)
        with stream_errors(message.stream, ref):
            await self.hub.subscribe(subscription, cursor)
        self.subscriptions[message.id] = subscription
        position = subscription.position
        self.send_message(
            {
                "type": "subscribed",
                "id": message.id,
                "stream": message.stream,
                "position": str(position) if position is not None else None,
            }
        )

    def unsubscribe(self, message: protocol.Unsubscribe) -> None:
        subscription = self.subscriptions.pop(message.id, None)
        if subscription is None:
            raise ProtocolError("not-found", f"no subscription {message.id!r}", field="id", ref=message.id)
        self.hub.unsubscribe(subscription)
        self.send_message({"type": "unsubscribed", "id": message.id})

    async def publish(self, message: protocol.Publish) -> None:
        ref = {"ref": message.ref} if message.ref is not None else {}
        problem = scope_problem(self.principal, "publish", message.stream, ref)
        if problem is not None:
            raise problem
        with stream_errors(message.stream, ref):
            result = await self.hub.events.publish(
                message.stream, message.payload, idempotency_key=message.idempotency_key
            )
        if result.status == "rejected":
            raise ProtocolError("validation", result.reason or "rejected", field="payload", **ref)
        self.published[message.stream] += 1
        self.send_message({"type": "published", **ref, "status": result.status, "id": result.id})


class Heartbeats:
    """One loop for every WebSocket connection of the process: a `ping` to each every `heartbeat_s`,
    and a connection that sent nothing for `idle_timeout_s` closed with `CLOSE_IDLE`."""

    def __init__(self, heartbeat_s: float, idle_timeout_s: float):
        self.heartbeat_s, self.idle_timeout_s = heartbeat_s, idle_timeout_s
        self.connections: set[LiveConnection] = set()
        self.task = asyncio.create_task(self.run(), name="live heartbeats")

    async def run(self) -> None:
        tick = min(self.heartbeat_s, self.idle_timeout_s) / 2
        last_ping = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            ping = now - last_ping >= self.heartbeat_s
            if ping:
                last_ping = now
            for connection in list(self.connections):
                if now - connection.last_heard > self.idle_timeout_s:
                    connection.close_soon(
                        protocol.CLOSE_IDLE, f"nothing received for {self.idle_timeout_s:g} s"
                    )
                elif ping:
                    connection.send_message({"type": "ping"})


class LiveStats:
    """Counts of this process's live side, for /metrics and the stream's stats."""

    def __init__(self) -> None:
        self.connections = 0
        self.slow_consumers = 0
        self.connections_opened = 0


class SseSubscriber:
    """One Server-Sent Events response: a subscription whose events wait in a bounded queue.

    Each event is one SSE message (`id:` its event id, `data:` the event as JSON), so a browser's
    EventSource resumes by itself with `Last-Event-ID`. A reader too slow for the queue gets a final
    `error` message (`slow-consumer`, with the id to resume after) and the response ends.
    """

    def __init__(self, hub: LiveHub, stream: str, filter_: protocol.Filter, queue_limit: int):
        from sse_starlette import ServerSentEvent

        self.message = ServerSentEvent
        self.hub = hub
        self.subscription = Subscription("sse", stream, filter_, self)
        self.queue = SendQueue(queue_limit)
        self.final = None  # the last message, once the response must end
        self.sent_position: str | None = None

    def _put(self, message, size: int) -> None:
        if self.final is None and not self.queue.put(message, size):
            resume = {"code": "slow-consumer", "resume_after": self.sent_position}
            self._end(orjson.dumps(resume).decode())

    def _end(self, data: str) -> None:
        if self.final is None:
            self.final = self.message(data, event="error")
            self.queue.put(self.final, 0, always=True)

    def send_events(self, subscription: Subscription, chosen: Batch, last_id: str) -> None:
        for event, encoded in chosen:
            self._put(self.message(encoded.decode(), id=event.id), len(encoded))

    def send_lost(self, subscription: Subscription, from_id: str, to_id: str) -> None:
        data = orjson.dumps({"from": from_id, "to": to_id}).decode()
        self._put(self.message(data, event="events_lost", id=to_id), len(data))

    def stream_failed(self, subscription: Subscription, error: Exception) -> None:
        self._end(orjson.dumps({"code": "stream-unavailable", "message": str(error)}).decode())

    async def messages(self):
        try:
            while True:
                message = await self.queue.get()
                if message.id is not None:
                    self.sent_position = message.id
                yield message
                if message is self.final:
                    return
        finally:
            self.hub.unsubscribe(self.subscription)
