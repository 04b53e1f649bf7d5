"""Throttling and digests: messages a channel holds, then sends together as one digest.

A channel with `digest: {interval: 10m}` holds every message and sends what it holds as one message
per interval (the first held message opens the interval). A channel with
`throttle: {max_messages: 5, per: 1h}` sends while it has sent fewer than 5 in the last hour and holds
the rest; once the window has room, the held messages go out as one digest. Both may be set. Nothing
is dropped: a held message has its own delivery record (`held`, then `digested` naming the digest's
record), and the counts add up.

`flush_held()` sends what is due. The `notification_digests` sensor runs it every 30 s; a send to a
channel runs it for that channel first, so held messages are not overtaken; `junction notifications
flush` runs it by hand. A flush claims the messages of a digest (`digest_key`) before sending and
sends under that key as `send()`'s dedupe key, so two flushers, or a flusher that crashed and runs
again, deliver one digest. A digest that fails after its retries is unclaimed and tried again at the
next flush; its failure is in the delivery records and the metrics.

The throttle counts the channel's deliveries in the store, so it holds across processes; two
processes sending in the same instant may each send one message past the limit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from orchestration.kernel.times import duration_seconds
from resources.notifications.core import (
    SEVERITIES,
    DeliveryRecord,
    Message,
    NotificationChannel,
    NotificationError,
)

if TYPE_CHECKING:
    from sqlalchemy import Engine

logger = logging.getLogger(__name__)

HELD = "held"
DIGESTED = "digested"
# A digest claimed this long ago and never settled was interrupted by a crash: it is sent again.
STALE_CLAIM = timedelta(minutes=5)
# Messages per digest: one message must stay readable; the rest wait for the next one.
DIGEST_LIMIT = 200
BODY_PREVIEW = 300


def holds(channel: NotificationChannel) -> bool:
    return channel.spec.digest is not None or channel.spec.throttle is not None


def _window(text: str) -> timedelta:
    return timedelta(seconds=duration_seconds(text))  # validated by the channel's spec


def sent_recently(engine: Engine | None, channel: str, since: datetime) -> int:
    """Messages the channel sent (or is sending) since `since`; held ones are not sent."""
    from sqlalchemy import func, select

    from orchestration.store import session_scope
    from orchestration.store.models import NotificationDelivery

    with session_scope(engine) as session:
        return session.scalar(
            select(func.count())
            .select_from(NotificationDelivery)
            .where(NotificationDelivery.channel == channel)
            .where(NotificationDelivery.status.in_(("delivered", "sending")))
            .where(NotificationDelivery.created_at >= since)
        )


def _waiting(engine: Engine | None, channel: str) -> list[Any]:
    from sqlalchemy import select

    from orchestration.store import session_scope
    from orchestration.store.models import HeldNotification

    with session_scope(engine) as session:
        rows = session.scalars(
            select(HeldNotification)
            .where(HeldNotification.channel == channel)
            .where(HeldNotification.released_at.is_(None))
            .order_by(HeldNotification.id)
        ).all()
        session.expunge_all()
        return list(rows)


def hold_reason(engine: Engine | None, channel: NotificationChannel, now: datetime) -> str | None:
    """Why a new message for `channel` must be held, or None to send it now."""
    spec = channel.spec
    if spec.digest is not None:
        return "digest"
    throttle = spec.throttle
    if throttle is None:
        return None
    if _waiting(engine, channel.name):
        return "throttle"  # older held messages go first, in their digest
    if sent_recently(engine, channel.name, now - _window(throttle.per)) >= throttle.max_messages:
        return "throttle"
    return None


def message_to_json(message: Message) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(message), default=str))


def message_from_json(data: Mapping[str, Any]) -> Message:
    return Message(**{**data, "recipients": tuple(data.get("recipients") or ())})


def hold(
    engine: Engine | None,
    channel: NotificationChannel,
    message: Message,
    reason: str,
    *,
    claim: DeliveryRecord | None,
    origin: str,
    created_at: datetime,
) -> DeliveryRecord:
    """Keep `message` for the channel's next digest: its delivery record (`held`) and the message, in
    one transaction."""
    from orchestration.store import session_scope
    from orchestration.store.models import HeldNotification, NotificationDelivery
    from resources.notifications.delivery import as_record

    with session_scope(engine) as session:
        if claim is not None:
            row = session.get(NotificationDelivery, claim.id)
        else:
            row = NotificationDelivery(created_at=created_at)
            session.add(row)
        row.channel = channel.name[:200]
        row.kind = channel.kind
        row.recipient = channel.recipient(message)
        row.subject = message.subject
        row.status = HELD
        row.attempts = 0
        row.origin = origin[:200]
        row.response = f"held by the channel's {reason}"
        session.flush()
        session.add(
            HeldNotification(
                channel=channel.name[:200],
                delivery_id=row.id,
                reason=reason,
                message=message_to_json(message),
                held_at=created_at,
            )
        )
        session.flush()
        return as_record(row)


def due(engine: Engine | None, channel: NotificationChannel, waiting: list[Any], now: datetime) -> bool:
    spec = channel.spec
    if not waiting:
        return False
    if spec.digest is not None and waiting[0].held_at + _window(spec.digest.interval) > now:
        return False
    if spec.throttle is not None:
        since = now - _window(spec.throttle.per)
        if sent_recently(engine, channel.name, since) >= spec.throttle.max_messages:
            return False
    return True


def digest_message(channel: str, items: list[Message], held_at: list[datetime]) -> Message:
    """One message for several: each one's subject and the start of its body, the worst severity."""
    if len(items) == 1:
        return items[0]
    lines = []
    for item in items:
        lines.append(f"• {item.subject}")
        if item.body:
            preview = item.body if len(item.body) <= BODY_PREVIEW else item.body[: BODY_PREVIEW - 1] + "…"
            lines.extend(f"  {line}" for line in preview.splitlines())
    severities = [item.severity for item in items if item.severity]
    severity = min(severities, key=SEVERITIES.index) if severities else None
    recipients = tuple(dict.fromkeys(recipient for item in items for recipient in item.recipients))
    return Message(
        subject=f"{len(items)} notifications on {channel}: {items[0].subject}",
        body="\n".join(lines),
        recipients=recipients,
        severity=severity,
        facts={
            "messages": str(len(items)),
            "first held": min(held_at).isoformat(timespec="seconds"),
            "last held": max(held_at).isoformat(timespec="seconds"),
        },
        metadata={"digest": [item.id for item in items]},
    )


def _claim_digest(engine: Engine | None, ids: list[int], key: str, now: datetime) -> bool:
    from sqlalchemy import update

    from orchestration.store import session_scope
    from orchestration.store.models import HeldNotification

    with session_scope(engine) as session:
        taken = session.execute(
            update(HeldNotification)
            .where(HeldNotification.id.in_(ids))
            .where(HeldNotification.digest_key.is_(None))
            .values(digest_key=key, claimed_at=now)
        ).rowcount
        if taken != len(ids):
            session.rollback()  # another flusher took some of them: this one takes none
            return False
    return True


def _settle_digest(engine: Engine | None, key: str, record: DeliveryRecord | None, now: datetime) -> None:
    """Delivered: the held messages are released and their records name the digest's. Failed
    (`record` None): they are unclaimed, for the next flush."""
    from sqlalchemy import select, update

    from orchestration.store import session_scope
    from orchestration.store.models import HeldNotification, NotificationDelivery

    with session_scope(engine) as session:
        rows = session.scalars(select(HeldNotification).where(HeldNotification.digest_key == key)).all()
        if record is None:
            for row in rows:
                row.digest_key = None
                row.claimed_at = None
            return
        for row in rows:
            row.released_at = now
        session.execute(
            update(NotificationDelivery)
            .where(NotificationDelivery.id.in_([row.delivery_id for row in rows]))
            .values(
                status=DIGESTED, delivered_at=record.delivered_at, response=f"sent in delivery {record.id}"
            )
        )


def _send_digest(
    engine: Engine | None, channel: NotificationChannel, key: str, rows: list[Any], now: datetime
) -> DeliveryRecord | None:
    from resources.notifications.delivery import send

    message = digest_message(
        channel.name, [message_from_json(row.message) for row in rows], [row.held_at for row in rows]
    )
    try:
        record = send(
            channel, message, origin=f"digest of {len(rows)}", engine=engine, dedupe_key=key, hold=False
        )
    except NotificationError as exc:
        logger.warning(
            "digest of %d message(s) to channel %r failed, kept for the next flush: %s",
            len(rows),
            channel.name,
            exc,
        )
        _settle_digest(engine, key, None, now)
        return None
    if record.status != "delivered":  # a key settled as failed by an earlier attempt
        _settle_digest(engine, key, None, now)
        return None
    _settle_digest(engine, key, record, now)
    return record


def flush_channel(
    engine: Engine | None, channel: NotificationChannel, now: datetime | None = None
) -> list[DeliveryRecord]:
    """Send the channel's due digests; the delivered digests' records."""
    now = now or datetime.now(UTC)
    waiting = _waiting(engine, channel.name)
    sent: list[DeliveryRecord] = []
    # Digests a crash interrupted between claim and settle.
    interrupted: dict[str, list[Any]] = {}
    for row in waiting:
        if row.digest_key is not None and row.claimed_at is not None and row.claimed_at + STALE_CLAIM <= now:
            interrupted.setdefault(row.digest_key, []).append(row)
    for key, rows in interrupted.items():
        if (record := _send_digest(engine, channel, key, rows, now)) is not None:
            sent.append(record)
    unclaimed = [row for row in waiting if row.digest_key is None]
    while unclaimed and due(engine, channel, unclaimed, now):
        batch, unclaimed = unclaimed[:DIGEST_LIMIT], unclaimed[DIGEST_LIMIT:]
        key = f"digest:{channel.name}:{batch[0].id}-{batch[-1].id}:{uuid.uuid4().hex[:12]}"
        if not _claim_digest(engine, [row.id for row in batch], key, now):
            break
        record = _send_digest(engine, channel, key, batch, now)
        if record is None:
            break
        sent.append(record)
    return sent


def flush_held(
    engine: Engine | None = None,
    channels: Mapping[str, NotificationChannel] | Iterable[NotificationChannel] | None = None,
    now: datetime | None = None,
) -> list[DeliveryRecord]:
    """Send every due digest of the channels (default: every channel of the channels file that
    holds messages)."""
    if channels is None:
        from resources.notifications.channels_file import load_channels

        channels = load_channels()
    found = channels.values() if isinstance(channels, Mapping) else channels
    sent: list[DeliveryRecord] = []
    for channel in found:
        if holds(channel):
            sent.extend(flush_channel(engine, channel, now))
    return sent


def held_counts(engine: Engine | None = None) -> dict[str, int]:
    """Messages waiting per channel (for the metrics and `junction notifications flush`)."""
    from sqlalchemy import func, select

    from orchestration.store import session_scope
    from orchestration.store.models import HeldNotification

    with session_scope(engine) as session:
        return dict(
            session.execute(
                select(HeldNotification.channel, func.count())
                .where(HeldNotification.released_at.is_(None))
                .group_by(HeldNotification.channel)
            ).all()
        )
