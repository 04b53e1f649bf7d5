"""The audit log: append-only, every entry hash-chained to the one before it.

Each entry's hash is SHA-256 over a canonical JSON of (prev_hash, time, actor, action, target, origin,
details); the first entry's prev_hash is 64 zeros. Editing, deleting or reordering any entry but the
newest breaks the chain at a place `verify_chain` names. The newest entries can only be vouched for
against a head hash recorded elsewhere: `verify_chain` returns it for that purpose.

Appends are serialised so that concurrent writers never fork the chain:

* the database forbids a fork outright: `prev_hash` is UNIQUE, so of two writers that read the same
  head only one can insert after it; the other gets an IntegrityError, re-reads the head and retries
  (a bounded number of times);
* on SQLite the append runs under BEGIN IMMEDIATE (`session_scope(write_lock=True)`), which takes the
  database's single write lock before the head is read, so a conflict cannot even happen;
* on PostgreSQL the transaction first takes a transaction-scoped advisory lock. Without it, N writers
  racing on one head would make N-1 of them fail and retry on every round (a retry storm that grows
  with contention); with it they queue and each reads the head its predecessor committed. The lock
  is released at commit, after the new row is visible, and the UNIQUE constraint remains the guarantee
  for any writer that does not take it.

A feature that changes state and audits the change uses `run_audited`, so that the change and its
audit entry commit in one transaction (or neither does).
"""

from __future__ import annotations

import hashlib
import json
import random
import time as time_module
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Engine, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from orchestration.errors import JunctionError
from orchestration.store.db import get_engine, session_scope
from orchestration.store.models import AuditEntry

GENESIS_HASH = "0" * 64
# Any constant works as long as every appending process uses the same one: this is b"junction" read as
# a big-endian integer (it fits PostgreSQL's signed 64-bit advisory lock keys).
AUDIT_ADVISORY_LOCK_KEY = 0x6A756E6374696F6E
MAX_APPEND_ATTEMPTS = 20
VERIFY_PAGE_SIZE = 500

ResultT = TypeVar("ResultT")


class AuditError(JunctionError):
    """The audit log could not be written (after retries) or its input is unusable."""


@dataclass(frozen=True)
class AuditEvent:
    """What happened, before it is chained: the input of an append."""

    action: str
    actor: str
    target: str = ""
    origin: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditRecord:
    """One stored entry of the chain."""

    id: int
    time: datetime
    actor: str
    action: str
    target: str
    origin: str
    details: dict[str, Any]
    prev_hash: str
    entry_hash: str

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": format_time(self.time),
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "origin": self.origin,
            "details": self.details,
            "prev_hash": self.prev_hash,
            "entry_hash": self.entry_hash,
        }


@dataclass(frozen=True)
class ChainVerification:
    """The outcome of `verify_chain`.

    `entries` counts the entries read: all of them when `ok`, else up to and including the first bad
    one. `head_hash` is the newest entry's hash (or the genesis hash of an empty log) when `ok`.
    """

    ok: bool
    entries: int
    head_hash: str | None
    first_bad_id: int | None
    reason: str | None


def as_utc(moment: datetime) -> datetime:
    """Aware UTC. SQLite hands back naive datetimes: everything this module stores is UTC."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def format_time(moment: datetime) -> str:
    return as_utc(moment).isoformat(timespec="microseconds")


def canonical_details(details: dict[str, Any] | None) -> dict[str, Any]:
    """The details as they will read back from the JSON column (tuples become lists, and so on)."""
    if details is None:
        return {}
    if not isinstance(details, dict):
        raise AuditError(f"audit details must be a JSON object, not {type(details).__name__}")
    try:
        return json.loads(json.dumps(details, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise AuditError(f"audit details must be JSON-serialisable: {exc}") from None


def entry_hash(
    *,
    prev_hash: str,
    time: datetime,
    actor: str,
    action: str,
    target: str,
    origin: str,
    details: dict[str, Any],
) -> str:
    """SHA-256 (hex) of the canonical JSON of an entry: sorted keys, no whitespace, UTF-8."""
    canonical = json.dumps(
        {
            "prev_hash": prev_hash,
            "time": format_time(time),
            "actor": actor,
            "action": action,
            "target": target,
            "origin": origin,
            "details": details,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _record(row: AuditEntry) -> AuditRecord:
    return AuditRecord(
        id=row.id,
        time=row.occurred_at,
        actor=row.actor,
        action=row.action,
        target=row.target,
        origin=row.origin,
        details=row.details,
        prev_hash=row.prev_hash,
        entry_hash=row.entry_hash,
    )


def _validated(event: AuditEvent) -> AuditEvent:
    if not event.action or not event.action.strip():
        raise AuditError("an audit entry needs an action")
    if not event.actor or not event.actor.strip():
        raise AuditError("an audit entry needs an actor")
    return AuditEvent(
        action=event.action,
        actor=event.actor,
        target=event.target or "",
        origin=event.origin or "",
        details=canonical_details(event.details),
    )


def _take_append_lock(session: Session) -> None:
    """PostgreSQL: queue appenders behind one advisory lock (SQLite's BEGIN IMMEDIATE already did)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": AUDIT_ADVISORY_LOCK_KEY})


def _chain_head(session: Session) -> str:
    head = session.scalar(select(AuditEntry.entry_hash).order_by(AuditEntry.id.desc()).limit(1))
    return head or GENESIS_HASH


def _insert_entry(session: Session, event: AuditEvent) -> AuditEntry:
    prev_hash = _chain_head(session)
    occurred_at = datetime.now(UTC)
    row = AuditEntry(
        occurred_at=occurred_at,
        actor=event.actor,
        action=event.action,
        target=event.target,
        origin=event.origin,
        details=event.details,
        prev_hash=prev_hash,
        entry_hash=entry_hash(
            prev_hash=prev_hash,
            time=occurred_at,
            actor=event.actor,
            action=event.action,
            target=event.target,
            origin=event.origin,
            details=event.details,
        ),
    )
    session.add(row)
    session.flush()
    return row


class _ChainConflict(Exception):
    """Another writer appended after the head this transaction read."""


def run_audited(
    work: Callable[[Session], tuple[ResultT, AuditEvent]], *, engine: Engine | None = None
) -> tuple[ResultT, AuditRecord]:
    """Run `work(session)` and append the event it returns, in one serialised transaction.

    `work` makes its changes in the session and returns (result, event). Its own errors (an
    IntegrityError of its own rows included) propagate unchanged; only a conflict on the chain head
    re-runs the whole transaction, so `work` must only touch the database through `session`.
    """
    engine = engine or get_engine()
    for attempt in range(1, MAX_APPEND_ATTEMPTS + 1):
        try:
            with session_scope(engine, write_lock=True) as session:
                _take_append_lock(session)
                result, event = work(session)
                session.flush()
                event = _validated(event)
                try:
                    row = _insert_entry(session, event)
                except IntegrityError as exc:
                    raise _ChainConflict from exc
                return result, _record(row)
        except _ChainConflict:
            if attempt == MAX_APPEND_ATTEMPTS:
                break
            # Another writer appended after the head we read; back off a little and re-read it.
            time_module.sleep(random.uniform(0, 0.005 * attempt))
    raise AuditError(
        f"could not append to the audit log: the chain head kept moving ({MAX_APPEND_ATTEMPTS} tries)"
    )


def append(
    action: str,
    *,
    actor: str,
    target: str = "",
    origin: str = "",
    details: dict[str, Any] | None = None,
    engine: Engine | None = None,
) -> AuditRecord:
    """Append one entry to the chain and return it as stored."""
    event = AuditEvent(action=action, actor=actor, target=target, origin=origin, details=details or {})
    _, record = run_audited(lambda _session: (None, event), engine=engine)
    return record


def query(
    *,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 100,
    before_id: int | None = None,
    engine: Engine | None = None,
) -> list[AuditRecord]:
    """Entries matching every given filter, newest first.

    `since` is inclusive, `until` exclusive (naive datetimes are UTC). Page backwards by passing the
    smallest id of a page as the next call's `before_id`.
    """
    if limit < 1:
        raise AuditError("limit must be at least 1")
    statement = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if actor is not None:
        statement = statement.where(AuditEntry.actor == actor)
    if action is not None:
        statement = statement.where(AuditEntry.action == action)
    if target is not None:
        statement = statement.where(AuditEntry.target == target)
    if since is not None:
        statement = statement.where(AuditEntry.occurred_at >= as_utc(since))
    if until is not None:
        statement = statement.where(AuditEntry.occurred_at < as_utc(until))
    if before_id is not None:
        statement = statement.where(AuditEntry.id < before_id)
    with session_scope(engine) as session:
        return [_record(row) for row in session.scalars(statement)]


def iter_entries(engine: Engine | None = None, *, page_size: int = VERIFY_PAGE_SIZE) -> Iterator[AuditRecord]:
    """Every entry in id order, read in pages so memory stays bounded however long the log is."""
    engine = engine or get_engine()
    last_id = 0
    while True:
        statement = select(AuditEntry).where(AuditEntry.id > last_id).order_by(AuditEntry.id).limit(page_size)
        with session_scope(engine) as session:
            page = [_record(row) for row in session.scalars(statement)]
        yield from page
        if len(page) < page_size:
            return
        last_id = page[-1].id


def verify_chain(engine: Engine | None = None) -> ChainVerification:
    """Walk the chain in id order and report the first entry that breaks it, and why.

    An edited entry no longer matches its own hash; a deleted, inserted or reordered entry makes the
    next entry's prev_hash differ from the hash of the entry before it; an edited entry whose hash
    was recomputed (a forgery) breaks the link to the entry after it.
    """
    expected_prev = GENESIS_HASH
    count = 0
    for record in iter_entries(engine):
        count += 1
        if record.prev_hash != expected_prev:
            return ChainVerification(
                ok=False,
                entries=count,
                head_hash=None,
                first_bad_id=record.id,
                reason=(
                    "its prev_hash does not match the hash of the entry before it "
                    "(an entry was deleted, inserted, reordered or rewritten before it)"
                ),
            )
        recomputed = entry_hash(
            prev_hash=record.prev_hash,
            time=record.time,
            actor=record.actor,
            action=record.action,
            target=record.target,
            origin=record.origin,
            details=record.details,
        )
        if recomputed != record.entry_hash:
            return ChainVerification(
                ok=False,
                entries=count,
                head_hash=None,
                first_bad_id=record.id,
                reason="its contents do not match its hash (the entry was edited)",
            )
        expected_prev = record.entry_hash
    return ChainVerification(ok=True, entries=count, head_hash=expected_prev, first_bad_id=None, reason=None)
