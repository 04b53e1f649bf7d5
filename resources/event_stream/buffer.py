"""A client-side publish buffer: events are sent in batches when enough accumulate or time passes.

`add()` only appends to memory; a batch is published when `max_events` are waiting (by the caller's
thread) or `max_delay_s` after the oldest waiting event (by a background thread). The buffer is
bounded: past `capacity` waiting events (the backend is down and flushes keep failing) `add()` raises
`BufferFull` instead of growing without limit. `close()` (also on leaving the `with` block and at
interpreter exit) flushes what is left. A failed flush keeps its events, in order, for the next try.

Results: each flushed batch's `BatchResult` goes to `on_result` (default: kept in `results`, so a
caller can check rejections); a flush error goes to `on_error` (default: logged).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from resources.event_stream.core import BatchResult, EventStream, EventStreamError, EventToPublish

logger = logging.getLogger(__name__)


class BufferFull(EventStreamError):
    pass


class PublishBuffer:
    def __init__(
        self,
        events: EventStream,
        stream: str,
        *,
        max_events: int = 500,
        max_delay_s: float = 0.5,
        capacity: int = 10_000,
        on_result: Callable[[BatchResult], None] | None = None,
        on_error: Callable[[Exception], None] | None = None,
    ):
        if not 1 <= max_events <= capacity:
            raise ValueError("need 1 <= max_events <= capacity")
        self.events, self.stream = events, stream
        self.max_events, self.max_delay_s, self.capacity = max_events, max_delay_s, capacity
        self.results: list[BatchResult] = []
        self._on_result = on_result or self.results.append
        self._on_error = on_error or (
            lambda exc: logger.warning("flushing events to %s failed: %s", stream, exc)
        )
        self._waiting: list[EventToPublish] = []
        self._oldest_at: float | None = None
        self._lock = threading.Lock()  # guards _waiting
        self._flush_lock = threading.Lock()  # one flush at a time keeps the order of events
        self._closed = threading.Event()
        self._timer = threading.Thread(
            target=self._flush_on_time, name=f"publish-buffer-{stream}", daemon=True
        )
        self._timer.start()
        atexit.register(_close_at_exit, weakref.ref(self))

    def add(self, payload: Any, *, idempotency_key: str | None = None) -> None:
        if self._closed.is_set():
            raise EventStreamError(f"the publish buffer of {self.stream!r} is closed")
        with self._lock:
            if len(self._waiting) >= self.capacity:
                raise BufferFull(
                    f"{len(self._waiting)} events to {self.stream!r} are waiting to be published "
                    f"(capacity {self.capacity}); the backend is not accepting them"
                )
            self._waiting.append(EventToPublish(payload, idempotency_key))
            if self._oldest_at is None:
                self._oldest_at = time.monotonic()
            full = len(self._waiting) >= self.max_events
        if full:
            self.flush(raise_errors=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._waiting)

    def flush(self, *, raise_errors: bool = True) -> None:
        """Publish everything waiting, `max_events` per batch."""
        with self._flush_lock:
            while True:
                with self._lock:
                    batch = self._waiting[: self.max_events]
                if not batch:
                    return
                try:
                    result = self.events.publish_batch(self.stream, batch)
                except Exception as exc:
                    if raise_errors:
                        raise
                    self._on_error(exc)
                    return
                with self._lock:
                    del self._waiting[: len(batch)]
                    self._oldest_at = time.monotonic() if self._waiting else None
                self._on_result(result)

    def _flush_on_time(self) -> None:
        while not self._closed.wait(min(self.max_delay_s / 4, 0.05) or 0.01):
            with self._lock:
                due = self._oldest_at is not None and time.monotonic() - self._oldest_at >= self.max_delay_s
            if due:
                self.flush(raise_errors=False)

    def close(self) -> None:
        """Stop the timer and publish what is left (raising if that fails: nothing is dropped silently)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._timer.join()
        self.flush()

    def __enter__(self) -> PublishBuffer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _close_at_exit(reference: weakref.ref) -> None:
    buffer = reference()
    if buffer is not None:
        try:
            buffer.close()
        except Exception as exc:  # noqa: BLE001 - at exit there is no caller left to raise to
            logger.error("events left in the publish buffer of %s: %d (%s)", buffer.stream, len(buffer), exc)
