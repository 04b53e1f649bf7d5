"""The SQL backend (the embedded default): events in the platform store, SQLite or PostgreSQL.

Ids are `ms-seq` generated exactly as Redis does: the current millisecond, or the last id's
millisecond with the next sequence number when the clock has not moved on (or went back).

Commit order: every publisher of a stream locks the stream's `stream_heads` row (SELECT ... FOR
UPDATE) before it assigns ids and holds the lock until it commits, so a stream's ids commit in the
order they were assigned: a reader that has seen id N never later finds a committed id below N.
A sequence or autoincrement would not give that on PostgreSQL (values are handed out at insert and
commit in any order). A counter row rather than `pg_advisory_xact_lock` because the row is needed
anyway (last id, max deleted id, events added) and the same code then serialises on SQLite, where
`session_scope(write_lock=True)` (BEGIN IMMEDIATE) takes the database's write lock.

Reads run in one snapshot (REPEATABLE READ on PostgreSQL, a read transaction in WAL on SQLite), so
the events and the stream's max deleted id they are checked against belong to the same instant.
Blocking reads poll the head row with exponential backoff (5 ms doubling to 200 ms).

Retention while publishing is approximate like Redis's `~`: the publish transaction trims when the
stream's event counter crosses a multiple of `TRIM_EVERY`, so at least `max_count` events (and
every event younger than `max_age`) are always kept; `trim()` is exact.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, delete, func, or_, select, tuple_, update
from sqlalchemy.orm import Session

from orchestration.store.db import session_scope, upsertable_insert
from orchestration.store.models import (
    StreamConsumerGroup,
    StreamEvent,
    StreamHead,
    StreamIdempotencyKey,
    StreamPendingEvent,
)
from resources.event_stream.core import (
    MAX_SEQ,
    RATE_WINDOWS_S,
    ZERO_ID,
    ClaimResult,
    Event,
    EventId,
    EventsLost,
    EventStream,
    GroupNotFound,
    GroupStats,
    Page,
    PendingEvent,
    PublishResult,
    StreamStats,
    ValidEvent,
    dead_letter_record,
    dead_letter_stream,
    encode_payload,
    now_ms,
)
from resources.event_stream.registry import StreamDefinition, StreamRegistry

TRIM_EVERY = 100
_POLL_FIRST_S, _POLL_MAX_S = 0.005, 0.2
_EVENT_ID = tuple_(StreamEvent.ms, StreamEvent.seq)


def _id_tuple(event_id: EventId):
    return tuple_(event_id.ms, event_id.seq)


class SqlEventStream(EventStream):
    backend = "sql"

    def __init__(self, engine: Engine, registry: StreamRegistry | None = None):
        super().__init__(registry or StreamRegistry(engine))
        self.engine = engine
        self._snapshot_engine = (
            engine.execution_options(isolation_level="REPEATABLE READ")
            if engine.dialect.name == "postgresql"
            else engine
        )

    def close(self) -> None:
        """Nothing to release: the engine is the process-wide engine of the platform store."""

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    # -- helpers ---------------------------------------------------------------------------------

    def _insert(self, model):
        return upsertable_insert(self.engine, model)

    def _locked_head(self, session: Session, stream: str) -> StreamHead:
        """The stream's head row, locked until the transaction ends (created on first use)."""
        head = session.get(StreamHead, stream, with_for_update=True)
        if head is None:
            session.execute(
                self._insert(StreamHead)
                .values(
                    stream=stream, last_ms=0, last_seq=0, max_deleted_ms=0, max_deleted_seq=0, events_added=0
                )
                .on_conflict_do_nothing()
            )
            head = session.get(StreamHead, stream, with_for_update=True, populate_existing=True)
        return head

    # -- publishing ------------------------------------------------------------------------------

    def _append(self, definition: StreamDefinition, events: list[ValidEvent]) -> list[PublishResult]:
        with session_scope(self.engine, write_lock=True) as session:
            return self._append_locked(session, definition, events)

    def _append_locked(
        self, session: Session, definition: StreamDefinition, events: list[ValidEvent]
    ) -> list[PublishResult]:
        stream = definition.name
        head = self._locked_head(session, stream)
        now = datetime.now(UTC)
        keys = {event.idempotency_key for event in events if event.idempotency_key}
        known: dict[str, EventId] = {}
        if keys:
            rows = session.scalars(
                select(StreamIdempotencyKey).where(
                    StreamIdempotencyKey.stream == stream, StreamIdempotencyKey.key.in_(keys)
                )
            ).all()
            for row in rows:
                if row.expires_at > now:
                    known[row.key] = EventId(row.event_ms, row.event_seq)
                else:
                    session.delete(row)
            session.flush()
        results: list[PublishResult] = []
        event_rows: list[dict] = []
        key_rows: list[dict] = []
        last = EventId(head.last_ms, head.last_seq)
        expires_at = now + timedelta(seconds=definition.idempotency_window_s)
        for event in events:
            key = event.idempotency_key
            if key and key in known:
                results.append(PublishResult(event.index, "duplicate", id=str(known[key])))
                continue
            millis = now_ms()
            last = EventId(millis, 0) if millis > last.ms else EventId(last.ms, last.seq + 1)
            event_rows.append(
                {
                    "stream": stream,
                    "ms": last.ms,
                    "seq": last.seq,
                    "payload": event.payload,
                    "idempotency_key": key,
                    "published_at": now,
                }
            )
            if key:
                known[key] = last
                key_rows.append(
                    {
                        "stream": stream,
                        "key": key,
                        "event_ms": last.ms,
                        "event_seq": last.seq,
                        "expires_at": expires_at,
                    }
                )
            results.append(PublishResult(event.index, "accepted", id=str(last)))
        if event_rows:
            session.execute(StreamEvent.__table__.insert(), event_rows)
            if key_rows:
                session.execute(StreamIdempotencyKey.__table__.insert(), key_rows)
            before = head.events_added
            head.last_ms, head.last_seq = last
            head.events_added = before + len(event_rows)
            if head.events_added // TRIM_EVERY != before // TRIM_EVERY:
                self._trim_locked(session, definition, head)
        return results

    # -- retention -------------------------------------------------------------------------------

    def _append_records(
        self, session: Session, definition: StreamDefinition, records: Sequence[Mapping[str, Any]]
    ) -> None:
        """Append records the platform wrote (dead letters: no schema to check) in this transaction."""
        self._append_locked(
            session,
            definition,
            [ValidEvent(index, record, encode_payload(record), None) for index, record in enumerate(records)],
        )

    def _trim_locked(self, session: Session, definition: StreamDefinition, head: StreamHead) -> int:
        stream = definition.name
        cutoffs: list[EventId] = []
        if definition.max_count:
            newest_dropped = session.execute(
                select(StreamEvent.ms, StreamEvent.seq)
                .where(StreamEvent.stream == stream)
                .order_by(StreamEvent.ms.desc(), StreamEvent.seq.desc())
                .offset(definition.max_count)
                .limit(1)
            ).first()
            if newest_dropped is not None:
                cutoffs.append(EventId(*newest_dropped))
        if definition.max_age_s:
            cutoffs.append(EventId(now_ms() - definition.max_age_s * 1000 - 1, MAX_SEQ))
        if not cutoffs:
            return 0
        cutoff = max(cutoffs)
        highest = session.execute(
            select(StreamEvent.ms, StreamEvent.seq)
            .where(StreamEvent.stream == stream, _EVENT_ID <= _id_tuple(cutoff))
            .order_by(StreamEvent.ms.desc(), StreamEvent.seq.desc())
            .limit(1)
        ).first()
        if highest is None:
            return 0
        removed = session.execute(
            delete(StreamEvent).where(StreamEvent.stream == stream, _EVENT_ID <= _id_tuple(cutoff))
        ).rowcount
        deleted = max(EventId(head.max_deleted_ms, head.max_deleted_seq), EventId(*highest))
        head.max_deleted_ms, head.max_deleted_seq = deleted
        return removed

    def trim(self, stream: str) -> int:
        definition = self.registry.get(stream)
        with session_scope(self.engine, write_lock=True) as session:
            head = self._locked_head(session, stream)
            session.execute(
                delete(StreamIdempotencyKey).where(
                    StreamIdempotencyKey.stream == stream,
                    StreamIdempotencyKey.expires_at <= datetime.now(UTC),
                )
            )
            return self._trim_locked(session, definition, head)

    # -- reading ---------------------------------------------------------------------------------

    def _read_page(self, stream: str, after: EventId | None, until: EventId | None, limit: int) -> Page:
        query = select(StreamEvent.ms, StreamEvent.seq, StreamEvent.payload).where(
            StreamEvent.stream == stream
        )
        if after is not None:
            query = query.where(_EVENT_ID > _id_tuple(after))
        if until is not None:
            query = query.where(_EVENT_ID <= _id_tuple(until))
        query = query.order_by(StreamEvent.ms, StreamEvent.seq).limit(limit)
        with self._snapshot_engine.connect() as connection, connection.begin():
            rows = connection.execute(query).all()
            head = connection.execute(
                select(
                    StreamHead.max_deleted_ms,
                    StreamHead.max_deleted_seq,
                    StreamHead.last_ms,
                    StreamHead.last_seq,
                ).where(StreamHead.stream == stream)
            ).first()
        events = [Event(stream, f"{ms}-{seq}", payload) for ms, seq, payload in rows]
        if head is None:
            return Page(events, ZERO_ID, ZERO_ID)
        return Page(events, EventId(head[0], head[1]), EventId(head[2], head[3]))

    def _last_id(self, stream: str) -> EventId:
        with self.engine.connect() as connection:
            row = connection.execute(
                select(StreamHead.last_ms, StreamHead.last_seq).where(StreamHead.stream == stream)
            ).first()
        return EventId(*row) if row else ZERO_ID

    def _wait_for_new(self, stream: str, after: EventId, timeout_ms: int) -> None:
        deadline = time.monotonic() + timeout_ms / 1000
        interval = _POLL_FIRST_S
        while (remaining := deadline - time.monotonic()) > 0:
            time.sleep(min(interval, remaining))
            if self._last_id(stream) > after:
                return
            interval = min(interval * 2, _POLL_MAX_S)

    # -- consumer groups -------------------------------------------------------------------------

    def _locked_group(self, session: Session, stream: str, group: str) -> StreamConsumerGroup:
        row = session.get(StreamConsumerGroup, (stream, group), with_for_update=True)
        if row is None:
            raise GroupNotFound(stream, group)
        return row

    def create_group(self, stream: str, group: str, start_id: str = "$") -> bool:
        self.registry.get(stream)
        with session_scope(self.engine, write_lock=True) as session:
            if start_id == "$":
                head = session.get(StreamHead, stream)
                start = EventId(head.last_ms, head.last_seq) if head else ZERO_ID
            else:
                start = EventId.parse(start_id)
            result = session.execute(
                self._insert(StreamConsumerGroup)
                .values(
                    stream=stream,
                    name=group,
                    last_delivered_ms=start.ms,
                    last_delivered_seq=start.seq,
                    created_at=datetime.now(UTC),
                )
                .on_conflict_do_nothing()
            )
            return result.rowcount == 1

    def set_group_position(self, stream: str, group: str, last_delivered_id: str) -> None:
        position = EventId.parse(last_delivered_id)
        with session_scope(self.engine, write_lock=True) as session:
            row = self._locked_group(session, stream, group)
            row.last_delivered_ms, row.last_delivered_seq = position

    def _read_group_page(
        self, stream: str, group: str, consumer: str, limit: int
    ) -> tuple[list[Event], EventId]:
        with session_scope(self.engine, write_lock=True) as session:
            row = self._locked_group(session, stream, group)
            delivered = EventId(row.last_delivered_ms, row.last_delivered_seq)
            head = session.get(StreamHead, stream)
            if head is None:
                return [], ZERO_ID
            max_deleted = EventId(head.max_deleted_ms, head.max_deleted_seq)
            if max_deleted > delivered:
                raise EventsLost(stream, str(delivered.next()), str(max_deleted))
            rows = session.execute(
                select(StreamEvent.ms, StreamEvent.seq, StreamEvent.payload)
                .where(StreamEvent.stream == stream, _EVENT_ID > _id_tuple(delivered))
                .order_by(StreamEvent.ms, StreamEvent.seq)
                .limit(limit)
            ).all()
            if rows:
                now = datetime.now(UTC)
                session.execute(
                    StreamPendingEvent.__table__.insert(),
                    [
                        {
                            "stream": stream,
                            "group_name": group,
                            "ms": ms,
                            "seq": seq,
                            "consumer": consumer,
                            "delivered_at": now,
                            "deliveries": 1,
                        }
                        for ms, seq, _ in rows
                    ],
                )
                row.last_delivered_ms, row.last_delivered_seq = rows[-1][0], rows[-1][1]
            return [Event(stream, f"{ms}-{seq}", payload) for ms, seq, payload in rows], EventId(
                head.last_ms, head.last_seq
            )

    def ack(self, stream: str, group: str, ids: Sequence[str]) -> int:
        parsed = [EventId.parse(event_id) for event_id in ids]
        if not parsed:
            return 0
        with session_scope(self.engine) as session:
            return session.execute(
                delete(StreamPendingEvent).where(
                    StreamPendingEvent.stream == stream,
                    StreamPendingEvent.group_name == group,
                    or_(
                        *(
                            and_(StreamPendingEvent.ms == i.ms, StreamPendingEvent.seq == i.seq)
                            for i in parsed
                        )
                    ),
                )
            ).rowcount

    def touch(self, stream: str, group: str, consumer: str, ids: Sequence[str]) -> int:
        parsed = [EventId.parse(event_id) for event_id in ids]
        if not parsed:
            return 0
        with session_scope(self.engine) as session:
            return session.execute(
                update(StreamPendingEvent)
                .where(
                    StreamPendingEvent.stream == stream,
                    StreamPendingEvent.group_name == group,
                    StreamPendingEvent.consumer == consumer,
                    tuple_(StreamPendingEvent.ms, StreamPendingEvent.seq).in_([tuple(i) for i in parsed]),
                )
                .values(delivered_at=datetime.now(UTC))
            ).rowcount

    def dead_letter(self, stream: str, group: str, records: Mapping[str, Mapping[str, Any]]) -> list[str]:
        dead_definition = self.registry.get(dead_letter_stream(stream))
        moved: list[str] = []
        with session_scope(self.engine, write_lock=True) as session:
            appended: list[Mapping[str, Any]] = []
            for event_id, record in records.items():
                parsed = EventId.parse(event_id)
                row = session.get(
                    StreamPendingEvent, (stream, group, parsed.ms, parsed.seq), with_for_update=True
                )
                if row is None:
                    continue
                session.delete(row)
                appended.append(record)
                moved.append(event_id)
            if appended:
                self._append_records(session, dead_definition, appended)
        return moved

    def delete_group(self, stream: str, group: str) -> bool:
        with session_scope(self.engine, write_lock=True) as session:
            session.execute(
                delete(StreamPendingEvent).where(
                    StreamPendingEvent.stream == stream, StreamPendingEvent.group_name == group
                )
            )
            return (
                session.execute(
                    delete(StreamConsumerGroup).where(
                        StreamConsumerGroup.stream == stream, StreamConsumerGroup.name == group
                    )
                ).rowcount
                == 1
            )

    def pending(self, stream: str, group: str, *, limit: int = 100) -> list[PendingEvent]:
        now = datetime.now(UTC)
        with session_scope(self.engine) as session:
            if session.get(StreamConsumerGroup, (stream, group)) is None:
                raise GroupNotFound(stream, group)
            rows = session.scalars(
                select(StreamPendingEvent)
                .where(StreamPendingEvent.stream == stream, StreamPendingEvent.group_name == group)
                .order_by(StreamPendingEvent.ms, StreamPendingEvent.seq)
                .limit(limit)
            ).all()
            return [
                PendingEvent(
                    f"{row.ms}-{row.seq}",
                    row.consumer,
                    max(0, int((now - row.delivered_at).total_seconds() * 1000)),
                    row.deliveries,
                )
                for row in rows
            ]

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
        dead_definition = self.registry.get(dead_letter_stream(stream)) if max_deliveries else None
        now = datetime.now(UTC)
        claimed: list[Event] = []
        dead: list[str] = []
        deleted: list[str] = []
        with session_scope(self.engine, write_lock=True) as session:
            self._locked_group(session, stream, group)
            rows = session.scalars(
                select(StreamPendingEvent)
                .where(
                    StreamPendingEvent.stream == stream,
                    StreamPendingEvent.group_name == group,
                    StreamPendingEvent.delivered_at < now - timedelta(milliseconds=min_idle_ms),
                )
                .order_by(StreamPendingEvent.ms, StreamPendingEvent.seq)
                .limit(limit)
                .with_for_update()
            ).all()
            dead_letters = []
            for row in rows:
                event_id = f"{row.ms}-{row.seq}"
                event = session.get(StreamEvent, (stream, row.ms, row.seq))
                if event is None:
                    session.delete(row)
                    deleted.append(event_id)
                elif max_deliveries is not None and row.deliveries >= max_deliveries:
                    dead_letters.append(
                        dead_letter_record(
                            stream, group, event_id, row.consumer, row.deliveries, event.payload
                        )
                    )
                    session.delete(row)
                    dead.append(event_id)
                else:
                    row.consumer, row.delivered_at, row.deliveries = consumer, now, row.deliveries + 1
                    claimed.append(Event(stream, event_id, event.payload))
            if dead_letters and dead_definition is not None:
                self._append_records(session, dead_definition, dead_letters)
        return ClaimResult(claimed, dead, deleted)

    # -- operations ------------------------------------------------------------------------------

    def stats(self, stream: str) -> StreamStats:
        self.registry.get(stream)
        with self._snapshot_engine.connect() as connection, connection.begin():
            length = connection.scalar(select(func.count()).where(StreamEvent.stream == stream))
            ordered = select(StreamEvent.ms, StreamEvent.seq).where(StreamEvent.stream == stream)
            first = connection.execute(ordered.order_by(StreamEvent.ms, StreamEvent.seq).limit(1)).first()
            last = connection.execute(
                ordered.order_by(StreamEvent.ms.desc(), StreamEvent.seq.desc()).limit(1)
            ).first()
            head = connection.execute(select(StreamHead).where(StreamHead.stream == stream)).first()
            groups = []
            for group in connection.execute(
                select(StreamConsumerGroup)
                .where(StreamConsumerGroup.stream == stream)
                .order_by(StreamConsumerGroup.name)
            ).all():
                delivered = EventId(group.last_delivered_ms, group.last_delivered_seq)
                pending = connection.scalar(
                    select(func.count()).where(
                        StreamPendingEvent.stream == stream, StreamPendingEvent.group_name == group.name
                    )
                )
                lag = connection.scalar(
                    select(func.count()).where(StreamEvent.stream == stream, _EVENT_ID > _id_tuple(delivered))
                )
                groups.append(GroupStats(group.name, pending, str(delivered), lag))
            dead = connection.scalar(
                select(func.count()).where(StreamEvent.stream == dead_letter_stream(stream))
            )
            now = now_ms()
            recent = [
                connection.scalar(
                    select(func.count()).where(
                        StreamEvent.stream == stream, StreamEvent.ms > now - window * 1000
                    )
                )
                for window in RATE_WINDOWS_S
            ]
        return StreamStats(
            stream=stream,
            length=length,
            events_added=head.events_added if head else 0,
            first_id=f"{first[0]}-{first[1]}" if first else None,
            last_id=f"{last[0]}-{last[1]}" if last else None,
            max_deleted_id=str(EventId(head.max_deleted_ms, head.max_deleted_seq)) if head else str(ZERO_ID),
            groups=groups,
            dead_lettered=dead,
            rate_1m=round(recent[0] / RATE_WINDOWS_S[0], 3),
            rate_5m=round(recent[1] / RATE_WINDOWS_S[1], 3),
        )
