"""The event stream interface: ids, events, results, errors, and the semantics both backends share.

`EventStream` implements everything that does not depend on the storage — schema validation, the
id cursor semantics, gap detection, blocking reads, time ranges, iteration — on top of a few
primitives each backend provides (`_append`, `_read_page`, `_wait_for_new`, groups, stats, trim).
"""

from __future__ import annotations

import json
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple

import orjson

from orchestration.errors import ConfigurationError, JunctionError

# Larger than any sequence number either backend hands out; the seq of a "just before" cursor.
MAX_SEQ = 2**63 - 1
DEAD_LETTER_SUFFIX = ":dead-letter"
# A declared stream's name (the registry and the pipeline spec's `triggers:` check it).
STREAM_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,149}$"
_ID_TEXT = re.compile(r"^\d+(-\d+)?$")


def dead_letter_stream(stream: str) -> str:
    """The stream that receives the events a group of `stream` gave up on (`orders:dead-letter`)."""
    return stream + DEAD_LETTER_SUFFIX


# --- errors -----------------------------------------------------------------------------------------


class EventStreamError(JunctionError):
    """A problem with an event stream the caller can act on."""


class StreamNotFound(EventStreamError):
    def __init__(self, stream: str):
        self.stream = stream
        super().__init__(f"stream {stream!r} is not declared (declare it in the streams folder or the API)")


class GroupNotFound(EventStreamError):
    def __init__(self, stream: str, group: str):
        super().__init__(f"stream {stream!r} has no consumer group {group!r}")


class InvalidEventId(EventStreamError):
    pass


class EventStreamUnavailable(ConfigurationError):
    """The backend cannot be reached: nothing was published (never a silent drop)."""


class EventsLost(EventStreamError):
    """Retention removed events after the reader's cursor before it read them.

    `from_id`..`to_id` (inclusive) is the range that may have held lost events; resume after `to_id`
    (`read(stream, after_id=exc.to_id)`) to accept the loss and go on.
    """

    def __init__(self, stream: str, from_id: str, to_id: str):
        self.stream, self.from_id, self.to_id = stream, from_id, to_id
        super().__init__(
            f"stream {stream!r}: events {from_id} .. {to_id} were removed by retention before they were read"
        )


# --- ids --------------------------------------------------------------------------------------------


class EventId(NamedTuple):
    """`ms-seq`: milliseconds since the epoch and a sequence within that millisecond (Redis's shape).

    Ids compare as (ms, seq) tuples; a stream's ids only ever increase, so an id is a resumable cursor.
    """

    ms: int
    seq: int

    @classmethod
    def looks_like(cls, text: str) -> bool:
        return bool(_ID_TEXT.match(text.strip()))

    @classmethod
    def parse(cls, text: str | EventId) -> EventId:
        """`1700000000000-3`, or `1700000000000` (sequence 0)."""
        if isinstance(text, EventId):
            return text
        ms, sep, seq = str(text).strip().partition("-")
        try:
            parsed = cls(int(ms), int(seq) if sep else 0)
        except ValueError:
            raise InvalidEventId(f"{text!r} is not an event id (ms-seq, e.g. 1700000000000-0)") from None
        if parsed.ms < 0 or parsed.seq < 0 or parsed.seq > MAX_SEQ:
            raise InvalidEventId(f"{text!r} is not an event id (ms-seq, e.g. 1700000000000-0)")
        return parsed

    @classmethod
    def just_before(cls, moment: datetime) -> EventId:
        """The cursor whose next event is the first one at or after `moment`."""
        ms = to_ms(moment)
        return cls(ms - 1, MAX_SEQ) if ms > 0 else cls(0, 0)

    @classmethod
    def last_at(cls, moment: datetime) -> EventId:
        """The highest id an event published at `moment` (to the millisecond) can have."""
        return cls(to_ms(moment), MAX_SEQ)

    def previous(self) -> EventId:
        """The cursor whose next event is this one (`read(after_id=x.previous())` includes x)."""
        if self.seq > 0:
            return EventId(self.ms, self.seq - 1)
        return EventId(self.ms - 1, MAX_SEQ) if self.ms > 0 else ZERO_ID

    def next(self) -> EventId:
        return EventId(self.ms, self.seq + 1) if self.seq < MAX_SEQ else EventId(self.ms + 1, 0)

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"


ZERO_ID = EventId(0, 0)
# Ids beyond this are far past any publish time and beyond what the stores' 64-bit columns hold.
MAX_ID_MS = 2**53


def position_id(text: str, kind: Literal["after", "first", "last"] = "after") -> str:
    """An event id, or the id an ISO 8601 time stands for: the cursor just before it (`after`: read
    the events at or after that time), or the first or last id an event published then can have
    (a replay's inclusive bounds). `InvalidEventId` when it is neither."""
    text = text.strip()
    if EventId.looks_like(text):
        try:
            parsed = EventId.parse(text)
        except InvalidEventId:
            parsed = None
        if parsed is not None and parsed.ms <= MAX_ID_MS:
            return str(parsed)
    else:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            pass
        else:
            if kind == "last":
                return str(EventId.last_at(moment))
            before = EventId.just_before(moment)
            return str(before.next() if kind == "first" else before)
    raise InvalidEventId(f"{text!r} is neither an event id (ms-seq) nor an ISO 8601 time")


def to_ms(moment: datetime) -> int:
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return int(aware.timestamp() * 1000)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


RATE_WINDOWS_S = (60, 300)


# --- values -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One event as read back. `time` is the publish time encoded in the id (millisecond precision)."""

    stream: str
    id: str
    payload: Any

    @property
    def event_id(self) -> EventId:
        return EventId.parse(self.id)

    @property
    def time(self) -> datetime:
        return datetime.fromtimestamp(self.event_id.ms / 1000, UTC)

    def to_json(self) -> dict[str, Any]:
        return {"stream": self.stream, "id": self.id, "time": self.time.isoformat(), "payload": self.payload}


@dataclass(frozen=True)
class EventToPublish:
    payload: Any
    idempotency_key: str | None = None


class ValidEvent(NamedTuple):
    """An event that passed validation: its index in the batch, payload and its JSON text (UTF-8).

    A tuple, not a dataclass: one is built per event published, and a frozen dataclass costs twice
    as much to build."""

    index: int
    payload: Any
    encoded: bytes
    idempotency_key: str | None


@dataclass(frozen=True)
class PublishResult:
    """The outcome of one event: `accepted` (new id), `duplicate` (id of the original) or `rejected`."""

    index: int
    status: Literal["accepted", "duplicate", "rejected"]
    id: str | None = None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class BatchResult:
    results: list[PublishResult]

    @property
    def accepted(self) -> list[PublishResult]:
        return [r for r in self.results if r.status == "accepted"]

    @property
    def duplicates(self) -> list[PublishResult]:
        return [r for r in self.results if r.status == "duplicate"]

    @property
    def rejected(self) -> list[PublishResult]:
        return [r for r in self.results if r.status == "rejected"]


@dataclass(frozen=True)
class PendingEvent:
    id: str
    consumer: str
    idle_ms: int
    deliveries: int


@dataclass(frozen=True)
class ClaimResult:
    """What `claim_stale` did: events now owned by the claimer, ids dead-lettered, ids trimmed away."""

    events: list[Event]
    dead_lettered: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class GroupStats:
    name: str
    pending: int
    last_delivered_id: str
    lag: int | None  # events not yet delivered to the group; None when Redis cannot tell after trims


@dataclass(frozen=True)
class StreamStats:
    stream: str
    length: int  # events retained now
    events_added: int  # events ever published (a counter: Prometheus derives the publish rate from it)
    first_id: str | None
    last_id: str | None
    max_deleted_id: str
    groups: list[GroupStats]
    dead_lettered: int
    # Events per second published over the last minute / five minutes (to ~10 s on Redis, which counts
    # in 10 s buckets; on SQL, the retained events whose id falls in the window).
    rate_1m: float = 0.0
    rate_5m: float = 0.0

    def to_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["groups"] = [dict(group.__dict__) for group in self.groups]
        return data


@dataclass(frozen=True)
class Page:
    """A backend's answer to one read: the events and the stream's state at the same instant."""

    events: list[Event]
    max_deleted: EventId
    last_id: EventId


Payload = Any


# --- the interface ----------------------------------------------------------------------------------


class EventStream(ABC):
    """Publish, read and consume events of declared streams (see the package docstring).

    Cursor (`after_id`) semantics, the same on every backend:
    - `None`: from the oldest retained event; nothing counts as lost.
    - `"$"`: only events published after the call.
    - an id: events after it; if retention already removed events after it, `EventsLost`.
    """

    backend: str

    def __init__(self, registry):
        from resources.event_stream.registry import StreamRegistry

        self.registry: StreamRegistry = registry

    # -- publishing ------------------------------------------------------------------------------

    def publish(self, stream: str, payload: Payload, *, idempotency_key: str | None = None) -> PublishResult:
        return self.publish_batch(stream, [EventToPublish(payload, idempotency_key)]).results[0]

    def publish_batch(self, stream: str, events: Sequence[Payload | EventToPublish]) -> BatchResult:
        """Validate every event, append the valid ones in one round trip / transaction, in order."""
        definition = self.registry.get(stream)
        rejected, valid = validate_batch(definition, events)
        appended = self._append(definition, valid) if valid else []
        return combine_results(len(events), rejected, appended)

    # -- reading ---------------------------------------------------------------------------------

    def read(
        self, stream: str, after_id: str | None = None, *, limit: int = 100, block_ms: int = 0
    ) -> list[Event]:
        """Up to `limit` events after the cursor, in id order; waits up to `block_ms` for the first one."""
        self.registry.get(stream)
        if after_id == "$":
            after_id = str(self._last_id(stream))
        after = EventId.parse(after_id) if after_id is not None else None
        return self._read_blocking(stream, after, None, limit, block_ms)

    def read_range(
        self, stream: str, start_time: datetime, end_time: datetime, *, limit: int | None = None
    ) -> list[Event]:
        """Events published from `start_time` to `end_time` inclusive (to the millisecond)."""
        events = self.iter_events(
            stream, after_id=str(EventId.just_before(start_time)), until_id=str(EventId.last_at(end_time))
        )
        return [event for _, event in zip(range(limit), events, strict=False)] if limit else list(events)

    def iter_events(
        self,
        stream: str,
        after_id: str | None = None,
        *,
        until_id: str | None = None,
        follow: bool = False,
        page_size: int = 500,
        block_ms: int = 1000,
    ) -> Iterator[Event]:
        """Every event after the cursor (up to `until_id` inclusive), page by page.

        Without `follow` it ends at the end of the stream; with it, it waits for new events forever.
        """
        self.registry.get(stream)
        if after_id == "$":
            after_id = str(self._last_id(stream))
        after = EventId.parse(after_id) if after_id is not None else None
        until = EventId.parse(until_id) if until_id is not None else None
        while True:
            events = self._read_blocking(stream, after, until, page_size, block_ms if follow else 0)
            yield from events
            if events:
                after = events[-1].event_id
            if not follow and len(events) < page_size:
                return
            if until is not None and after is not None and after >= until:
                return

    def _read_blocking(
        self, stream: str, after: EventId | None, until: EventId | None, limit: int, block_ms: int
    ) -> list[Event]:
        deadline = time.monotonic() + block_ms / 1000
        while True:
            page = self._read_page(stream, after, until, limit)
            check_nothing_lost(stream, after, page)
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if page.events or remaining_ms <= 0:
                return page.events
            self._wait_for_new(stream, max(after or ZERO_ID, page.last_id), remaining_ms)

    # -- backend primitives ----------------------------------------------------------------------

    @abstractmethod
    def _append(self, definition, events: list[ValidEvent]) -> list[PublishResult]:
        """Append validated events in order (duplicates by idempotency key skipped), applying retention."""

    @abstractmethod
    def _read_page(self, stream: str, after: EventId | None, until: EventId | None, limit: int) -> Page:
        """Events after `after` (None: from the oldest) up to `until`, with max-deleted read atomically."""

    @abstractmethod
    def _wait_for_new(self, stream: str, after: EventId, timeout_ms: int) -> None:
        """Return when an event after `after` may exist, or after `timeout_ms`."""

    @abstractmethod
    def _last_id(self, stream: str) -> EventId:
        """The id of the newest event ever added (0-0 for an empty stream)."""

    # -- consumer groups -------------------------------------------------------------------------

    @abstractmethod
    def create_group(self, stream: str, group: str, start_id: str = "$") -> bool:
        """Create a group reading after `start_id` ("$": new events only, "0": all). False if it exists."""

    @abstractmethod
    def set_group_position(self, stream: str, group: str, last_delivered_id: str) -> None:
        """Move the group's cursor (e.g. past a range reported by `EventsLost`)."""

    def read_group(
        self, stream: str, group: str, consumer: str, *, limit: int = 100, block_ms: int = 0
    ) -> list[Event]:
        """New events for `consumer`, each pending until acknowledged; waits up to `block_ms`.

        `EventsLost` if retention removed events the group had not been delivered yet.
        """
        self.registry.get(stream)
        deadline = time.monotonic() + block_ms / 1000
        while True:
            events, last_id = self._read_group_page(stream, group, consumer, limit)
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if events or remaining_ms <= 0:
                return events
            self._wait_for_new(stream, last_id, remaining_ms)

    @abstractmethod
    def _read_group_page(
        self, stream: str, group: str, consumer: str, limit: int
    ) -> tuple[list[Event], EventId]:
        """New events for the consumer (marked pending) and the stream's last id, without waiting."""

    @abstractmethod
    def ack(self, stream: str, group: str, ids: Sequence[str]) -> int:
        """Acknowledge events; returns how many were pending."""

    @abstractmethod
    def touch(self, stream: str, group: str, consumer: str, ids: Sequence[str]) -> int:
        """Reset the idle time of `consumer`'s pending events (it is still working on them, so no
        `claim_stale` takes them over); returns how many it holds. Their delivery count is unchanged."""

    @abstractmethod
    def dead_letter(self, stream: str, group: str, records: Mapping[str, Mapping[str, Any]]) -> list[str]:
        """Acknowledge each pending event (id -> its dead-letter record) and append its record to
        `dead_letter_stream(stream)`, together: a crash in between neither loses nor doubles one.
        Returns the ids moved (those still pending)."""

    @abstractmethod
    def delete_group(self, stream: str, group: str) -> bool:
        """Remove the group, its position and its pending events; False if it did not exist."""

    @abstractmethod
    def pending(self, stream: str, group: str, *, limit: int = 100) -> list[PendingEvent]:
        """The group's unacknowledged events, oldest first."""

    @abstractmethod
    def claim_stale(
        self,
        stream: str,
        group: str,
        consumer: str,
        *,
        min_idle_ms: int,
        limit: int = 100,
        max_deliveries: int | None = None,
    ) -> ClaimResult:
        """Take over events pending longer than `min_idle_ms` (a consumer died holding them).

        An event already delivered `max_deliveries` times is moved to `dead_letter_stream(stream)`
        (with its group, id, delivery count and payload) and acknowledged instead of redelivered.
        """

    # -- operations ------------------------------------------------------------------------------

    @abstractmethod
    def stats(self, stream: str) -> StreamStats: ...

    @abstractmethod
    def trim(self, stream: str) -> int:
        """Apply the stream's retention exactly now; returns how many events were removed."""

    @abstractmethod
    def close(self) -> None:
        """Release connections (the stream object must not be used afterwards)."""

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def validate_batch(
    definition, events: Sequence[Payload | EventToPublish]
) -> tuple[list[PublishResult], list[ValidEvent]]:
    """Each event checked against the stream's schema and encoded: (rejections with reasons, events to
    append). The hot path of every publish: one pass, no object per event beyond its `ValidEvent`."""
    rejected: list[PublishResult] = []
    valid: list[ValidEvent] = []
    validation_error = definition.validation_error
    for index, item in enumerate(events):
        if isinstance(item, EventToPublish):
            payload, key = item.payload, item.idempotency_key
        else:
            payload, key = item, None
        reason = validation_error(payload)
        if reason is None and key is not None and not (isinstance(key, str) and 0 < len(key) <= 200):
            reason = "idempotency key must be a string of 1 to 200 characters"
        if reason is None:
            try:
                valid.append(ValidEvent(index, payload, encode_payload(payload), key))
                continue
            except (TypeError, ValueError) as exc:
                reason = f"payload is not JSON: {exc}"
        rejected.append(PublishResult(index, "rejected", reason=reason))
    return rejected, valid


def combine_results(count: int, *parts: list[PublishResult]) -> BatchResult:
    """The results of every event in index order (each part is in index order already)."""
    nonempty = [part for part in parts if part]
    if len(nonempty) == 1 and len(nonempty[0]) == count:  # all accepted, or all rejected: as they are
        return BatchResult(nonempty[0])
    by_index = {result.index: result for part in nonempty for result in part}
    return BatchResult([by_index[index] for index in range(count)])


def check_nothing_lost(stream: str, after: EventId | None, page: Page) -> None:
    """`EventsLost` if retention removed events after the cursor (the page's max deleted id is above it)."""
    if after is not None and page.max_deleted > after:
        raise EventsLost(stream, str(after.next()), str(page.max_deleted))


# orjson encodes about ten times faster than the stdlib, but writes NaN and ±Infinity as `null` (the
# stdlib refuses them: JSON has no such numbers) and refuses integers beyond 64 bits and non-string
# keys (the stdlib writes them). So a text holding `null`, or a payload orjson refuses, is encoded
# again by the stdlib, whose answer (or error) stands. Datetimes, dataclasses and subclasses of
# str/int/dict/list pass through to that fallback, so they fare as before; only UUIDs and plain enums,
# which the stdlib refuses, orjson writes (as their text and their value).
_ORJSON_AS_STDLIB = (
    orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_SUBCLASS
)
# One stdlib encoder: `json.dumps` with options builds a new encoder per call (~2 µs).
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode_payload(payload: Any) -> bytes:
    """The payload as compact UTF-8 JSON; `TypeError`/`ValueError` if it is not JSON."""
    try:
        encoded = orjson.dumps(payload, option=_ORJSON_AS_STDLIB)
    except TypeError:
        return _ENCODER.encode(payload).encode()
    if b"null" in encoded:
        return _ENCODER.encode(payload).encode()
    return encoded


def decode_payload(text: str | bytes) -> Any:
    return json.loads(text)


def dead_letter_record(
    stream: str, group: str, event_id: str, consumer: str, deliveries: int, payload: Any
) -> Mapping[str, Any]:
    return {
        "stream": stream,
        "group": group,
        "event_id": event_id,
        "consumer": consumer,
        "deliveries": deliveries,
        "payload": payload,
    }
