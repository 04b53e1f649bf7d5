"""Write-behind: a namespace's writes are acknowledged once they are on an event stream, and one
flusher applies them to the origin in batches.

`Cache.set` / `Cache.delete` in a namespace with `write_behind` publish the write to the declared
stream first (the publish is the acknowledgement: a write the caller saw succeed is on the stream,
in Redis or in the platform store's SQL stream), then update the cache's layers, so reads see it at
once. The flusher reads the stream through the consumer group `junction-cache-flusher`, calls the
namespace's `writer` with a batch, and acknowledges the batch after the writer returned. So:

- **Nothing acknowledged is lost.** A process killed (SIGKILL) before or during a flush leaves its
  writes on the stream, unacknowledged; the next flusher — in any process that opens the namespace,
  or `junction cache flush NAMESPACE` — takes them over and applies them first.
- **In order per key.** One flusher at a time holds the namespace's lease (a row of `cache_leases`,
  renewed every pass, taken over once it expired: a killed holder delays the queue at most `lease`).
  It applies what an earlier holder left pending before anything newer, in stream order, and within
  a batch keeps only the newest write of each key (the ones before it would be overwritten anyway).
- **At least once.** A writer that fails leaves its batch pending and the flusher tries again next
  pass (logged, counted in `write_behind_failures`); a batch interrupted by a kill is applied again.
  Writers must be idempotent (an upsert by key), as dlt's and Kafka Connect's sinks are.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from resources.cache.config import WriteBehindSpec
from resources.event_stream.core import EventId, EventsLost

logger = logging.getLogger("junction.cache")
GROUP = "junction-cache-flusher"
CONSUMER = "flusher"


class WriteNotQueued(Exception):
    """The write could not be put on the stream: it was not acknowledged (and not applied)."""


@dataclass(frozen=True)
class QueuedWrite:
    """One write for the origin: `value` for a set, `deleted=True` (value None) for a delete."""

    key: str
    value: Any
    deleted: bool
    event_id: str


def _lease_acquired(engine: Any, name: str, holder: str, seconds: float) -> bool:
    """Take or renew the lease `name` for `holder`: True while nobody else holds an unexpired one."""
    from sqlalchemy import or_, update
    from sqlalchemy.exc import IntegrityError

    from orchestration.store.db import session_scope
    from orchestration.store.models import CacheLease

    now = time.time()
    with session_scope(engine) as session:
        taken = session.execute(
            update(CacheLease)
            .where(CacheLease.name == name)
            .where(or_(CacheLease.holder == holder, CacheLease.expires_at < now))
            .values(holder=holder, expires_at=now + seconds)
        ).rowcount
    if taken:
        return True
    try:
        with session_scope(engine) as session:
            session.add(CacheLease(name=name, holder=holder, expires_at=now + seconds))
        return True
    except IntegrityError:
        return False  # held by another flusher


def _lease_released(engine: Any, name: str, holder: str) -> None:
    from sqlalchemy import delete

    from orchestration.store.db import session_scope
    from orchestration.store.models import CacheLease

    with session_scope(engine) as session:
        session.execute(delete(CacheLease).where(CacheLease.name == name).where(CacheLease.holder == holder))


class WriteBehind:
    def __init__(self, namespace: str, spec: WriteBehindSpec, events: Any, engine: Any, holder: str):
        from orchestration.kernel.imports import resolve_callable

        self.namespace = namespace
        self.spec = spec
        self.events = events
        self.engine = engine
        self.holder = holder
        self.lease_name = f"write-behind:{namespace}"
        self.writer: Callable[[list[QueuedWrite]], Any] = resolve_callable(spec.writer)
        self.events.registry.get(spec.stream)  # StreamNotFound (naming the stream) if undeclared
        self.events.create_group(spec.stream, GROUP, start_id="0")
        self.queued = 0
        self.applied = 0
        self.failures = 0
        self.lost = 0
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the caller's side -------------------------------------------------------------------------

    def enqueue(self, key: str, value: Any, *, deleted: bool = False) -> str:
        """Put the write on the stream; its id once it is there (the acknowledgement)."""
        payload = {"namespace": self.namespace, "key": key, "op": "delete" if deleted else "set"}
        if not deleted:
            payload["value"] = value
        try:
            result = self.events.publish(self.spec.stream, payload)
        except Exception as exc:  # noqa: BLE001 - any failure: the write is not acknowledged
            raise WriteNotQueued(f"cache {self.namespace}: write of {key!r} not queued: {exc}") from exc
        if result.status != "accepted":
            raise WriteNotQueued(
                f"cache {self.namespace}: write of {key!r} refused by the stream: {result.reason}"
            )
        self.queued += 1
        return result.id

    # --- the flusher -------------------------------------------------------------------------------

    def flush(self) -> int:
        """One pass: if this process holds the lease, apply everything queued now; the writes applied."""
        with self._flush_lock:
            if not _lease_acquired(self.engine, self.lease_name, self.holder, self.spec.lease_s):
                return 0
            applied = 0
            # What an earlier holder (or a failed batch of ours) left pending comes first.
            while True:
                claim = self.events.claim_stale(
                    self.spec.stream, GROUP, CONSUMER, min_idle_ms=0, limit=self.spec.batch_size
                )
                if claim.deleted:
                    self._lost(len(claim.deleted), f"ids {claim.deleted[0]} to {claim.deleted[-1]}")
                claimed = claim.events
                if not claimed:
                    break
                if not self._apply(claimed):
                    return applied
                applied += len(claimed)
            while True:
                try:
                    fresh = self.events.read_group(
                        self.spec.stream, GROUP, CONSUMER, limit=self.spec.batch_size
                    )
                except EventsLost as lost:
                    self._lost(None, f"after {lost.from_id} up to {lost.to_id}")
                    self.events.set_group_position(self.spec.stream, GROUP, lost.to_id)
                    continue
                if not fresh:
                    return applied
                if not self._apply(fresh):
                    return applied
                applied += len(fresh)

    def _lost(self, count: int | None, which: str) -> None:
        """Queued writes the stream's retention removed before they were applied: said loudly."""
        self.lost += count or 1
        logger.error(
            "cache %s: %s queued writes (%s) were removed by the retention of stream %s before the "
            "flusher applied them; give the stream a retention longer than the flusher can be away",
            self.namespace,
            count if count is not None else "some",
            which,
            self.spec.stream,
        )

    def _apply(self, events: list[Any]) -> bool:
        events = sorted(events, key=lambda event: EventId.parse(event.id))
        newest: dict[str, QueuedWrite] = {}
        for event in events:
            payload = event.payload
            newest.pop(payload["key"], None)  # re-inserted: the batch stays in order of newest writes
            newest[payload["key"]] = QueuedWrite(
                payload["key"], payload.get("value"), payload.get("op") == "delete", event.id
            )
        try:
            self.writer(list(newest.values()))
        except Exception:  # noqa: BLE001 - the batch stays pending and is tried again next pass
            self.failures += 1
            logger.warning(
                "cache %s: the write-behind writer failed on %d writes; retried next pass",
                self.namespace,
                len(newest),
                exc_info=True,
            )
            return False
        self.events.ack(self.spec.stream, GROUP, [event.id for event in events])
        self.applied += len(events)
        # Renewed per batch: a long drain keeps its turn.
        _lease_acquired(self.engine, self.lease_name, self.holder, self.spec.lease_s)
        return True

    def pending(self) -> int:
        """Writes queued and not yet applied (delivered-and-unacknowledged plus not yet delivered)."""
        stats = self.events.stats(self.spec.stream)
        group = next((group for group in stats.groups if group.name == GROUP), None)
        return 0 if group is None else group.pending + (group.lag or 0)

    def start(self) -> None:
        """Flush every `flush_interval` in a daemon thread of this process."""
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.flush()
                except Exception:  # noqa: BLE001 - the stream or the store is away: next pass
                    logger.warning("cache %s: write-behind flush failed", self.namespace, exc_info=True)
                self._stop.wait(self.spec.flush_interval_s)

        self._thread = threading.Thread(target=loop, name=f"cache-flusher-{self.namespace}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        try:
            _lease_released(self.engine, self.lease_name, self.holder)
        except Exception:  # noqa: BLE001 - the lease then expires by itself
            pass

    def to_json(self) -> dict[str, Any]:
        return {
            "stream": self.spec.stream,
            "queued": self.queued,
            "applied": self.applied,
            "failures": self.failures,
            "lost": self.lost,
        }


def holder_id(process_id: str) -> str:
    return f"{socket.gethostname()}:{process_id[:12]}"
