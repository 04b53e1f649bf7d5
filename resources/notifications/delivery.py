"""Sending: retries with backoff and `Retry-After`, one delivery record per message, dedupe claims.

`send()` retries transient failures with exponential backoff (tenacity) and ends every attempt
sequence in exactly one row of `notification_deliveries`: `delivered`, or `failed` and then
`NotificationError` is raised.

Exactly-once senders (`send(..., dedupe_key=…)`): a sender that may run again after a crash — the
workflow run-failure sensor, whose cursor moves only after its tick, or the alert sensor — claims the
delivery first: the row is inserted in status `sending` under the unique key before anything is sent,
then settled. A second call with the key sends nothing and returns the settled record
(`repeated=True`). A claim found still `sending` is a send a crash interrupted: nobody knows whether
the receiver got it. It is sent again — at-least-once, as Dagster's own sensors and run keys are,
because an alert lost silently is worse than one received twice — with the same message id (the
webhook's `X-Junction-Delivery`, the e-mail's Message-ID, the outbox line's `id`), so the receiver can
drop the duplicate; the record counts it in `resends` and the resend is logged as a warning.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import tenacity

from resources.notifications.channels_file import load_channels
from resources.notifications.core import (
    MAX_RECORDED_TEXT,
    DeliveryRecord,
    Message,
    NotificationChannel,
    NotificationError,
)

if TYPE_CHECKING:
    from sqlalchemy import Engine

logger = logging.getLogger(__name__)


class _wait_retry_after_or(tenacity.wait.wait_base):  # noqa: N801 - tenacity's naming of wait strategies
    """The receiver's `Retry-After` when it sent one, otherwise the `fallback` backoff."""

    def __init__(self, fallback: tenacity.wait.wait_base):
        self.fallback = fallback

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        failure = retry_state.outcome.exception() if retry_state.outcome else None
        retry_after = getattr(failure, "retry_after_s", None)
        return retry_after if retry_after is not None else self.fallback(retry_state)


def send(
    channel: str | NotificationChannel,
    message: Message,
    *,
    origin: str = "",
    engine: Engine | None = None,
    max_attempts: int | None = None,
    channels_file: str | Path | None = None,
    dedupe_key: str | None = None,
    hold: bool = True,
) -> DeliveryRecord:
    """Deliver `message` through `channel` (a name in the channels file, or a channel), retrying
    transient failures. Returns the delivery record; on failure writes a `failed` record and raises
    `NotificationError` carrying it. `origin` says who sent it (a run id, an alert name).

    `dedupe_key`: one delivery per key, claimed before sending (see the module doc); a key already
    claimed returns its record (`repeated=True`) without sending.

    A channel with a `throttle` or `digest` holds the message (a `held` record) for its next digest
    (`held`); `hold=False` is the digest itself being sent."""
    import dataclasses

    created_at = datetime.now(UTC)
    claim: DeliveryRecord | None = None
    if dedupe_key is not None:
        channel_name = channel if isinstance(channel, str) else channel.name
        claim = _claim(engine, dedupe_key, message, channel_name, origin, created_at)
        if claim.repeated:
            return claim
        # A resend of an interrupted claim carries the first attempt's id: the receiver's dedupe key.
        message = dataclasses.replace(message, id=claim.message_id)
    if isinstance(channel, str):
        channels = load_channels(channels_file)
        if channel not in channels:
            known = ", ".join(sorted(channels)) or "none"
            reason = f"unknown notification channel {channel!r} (declared: {known})"
            record = _record(
                engine,
                claim=claim,
                channel=channel,
                kind="unknown",
                recipient=", ".join(message.recipients),
                subject=message.subject,
                status="failed",
                attempts=0,
                last_error=reason,
                response=None,
                origin=origin,
                created_at=created_at,
            )
            raise NotificationError(reason, record)
        channel = channels[channel]
    if hold:
        from resources.notifications import held

        if held.holds(channel):
            held.flush_channel(engine, channel, created_at)
            reason = held.hold_reason(engine, channel, created_at)
            if reason is not None:
                return held.hold(
                    engine, channel, message, reason, claim=claim, origin=origin, created_at=created_at
                )

    policy = channel.retry
    attempts = 0

    def attempt() -> str:
        nonlocal attempts
        attempts += 1
        return channel.deliver(message)

    def log_retry(retry_state: tenacity.RetryCallState) -> None:
        failure = retry_state.outcome.exception() if retry_state.outcome else None
        logger.warning(
            "notification to channel %r failed (attempt %d), retrying in %.2f s: %s",
            channel.name,
            retry_state.attempt_number,
            retry_state.upcoming_sleep,
            channel.describe_error(failure) if failure else "",
        )

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(max_attempts or policy.max_attempts),
        wait=_wait_retry_after_or(
            tenacity.wait_exponential_jitter(
                initial=policy.initial_backoff_s, max=policy.max_backoff_s, jitter=policy.initial_backoff_s
            )
        ),
        retry=tenacity.retry_if_exception(channel.is_transient),
        before_sleep=log_retry,
        reraise=True,
    )
    fields = {
        "channel": channel.name,
        "kind": channel.kind,
        "recipient": channel.recipient(message),
        "subject": message.subject,
        "origin": origin,
        "created_at": created_at,
    }
    try:
        response = retrying(attempt)
    except Exception as exc:  # noqa: BLE001 - whatever went wrong is recorded, then raised
        reason = channel.describe_error(exc)
        record = _record(
            engine,
            claim=claim,
            status="failed",
            attempts=attempts,
            last_error=reason,
            response=None,
            **fields,
        )
        raise NotificationError(
            f"notification to channel {channel.name!r} failed after {attempts} attempt(s): {reason}", record
        ) from exc
    return _record(
        engine,
        claim=claim,
        status="delivered",
        attempts=attempts,
        last_error=None,
        response=response,
        delivered_at=datetime.now(UTC),
        **fields,
    )


SENDING = "sending"


def _claim(
    engine: Engine | None, dedupe_key: str, message: Message, channel: str, origin: str, created_at: datetime
) -> DeliveryRecord:
    """Claim the delivery of `dedupe_key` (a `sending` row), or find who did.

    Returns the new claim; a settled delivery (`repeated=True`); or, for a claim a crash left
    `sending`, that claim taken over (`resends` + 1) — by compare-and-set on `resends`, so two
    takers cannot both resend."""
    from sqlalchemy import select, update
    from sqlalchemy.exc import IntegrityError

    from orchestration.store import session_scope
    from orchestration.store.models import NotificationDelivery

    try:
        with session_scope(engine) as session:
            row = NotificationDelivery(
                channel=channel[:200],
                kind="",
                recipient=", ".join(message.recipients),
                subject=message.subject,
                status=SENDING,
                attempts=0,
                origin=origin[:200],
                created_at=created_at,
                dedupe_key=dedupe_key,
                message_id=message.id,
                resends=0,
            )
            session.add(row)
            session.flush()
            return as_record(row)
    except IntegrityError:
        pass  # claimed before: by an earlier tick, settled or interrupted
    with session_scope(engine) as session:
        row = session.scalars(
            select(NotificationDelivery).where(NotificationDelivery.dedupe_key == dedupe_key)
        ).one()
        if row.status != SENDING:
            return as_record(row, repeated=True)
        taken = session.execute(
            update(NotificationDelivery)
            .where(NotificationDelivery.id == row.id)
            .where(NotificationDelivery.status == SENDING)
            .where(NotificationDelivery.resends == row.resends)
            .values(resends=row.resends + 1)
        ).rowcount
        session.refresh(row)
        if not taken:
            return as_record(row, repeated=True)
    logger.warning(
        "notification %r to channel %r was claimed at %s but never settled (a crash interrupted the "
        "send): sending it again with the same message id %s (resend %d)",
        dedupe_key,
        channel,
        row.created_at.isoformat(),
        row.message_id,
        row.resends,
    )
    return as_record(row)


def as_record(row: Any, *, repeated: bool = False) -> DeliveryRecord:
    return DeliveryRecord(
        id=row.id,
        channel=row.channel,
        kind=row.kind,
        recipient=row.recipient,
        subject=row.subject,
        status=row.status,
        attempts=row.attempts,
        last_error=row.last_error,
        response=row.response,
        origin=row.origin,
        created_at=row.created_at,
        delivered_at=row.delivered_at,
        dedupe_key=row.dedupe_key,
        message_id=row.message_id,
        resends=row.resends,
        repeated=repeated,
    )


def _record(
    engine: Engine | None,
    *,
    claim: DeliveryRecord | None = None,
    channel: str,
    kind: str,
    recipient: str,
    subject: str,
    status: Literal["delivered", "failed"],
    attempts: int,
    last_error: str | None,
    response: str | None,
    origin: str,
    created_at: datetime,
    delivered_at: datetime | None = None,
) -> DeliveryRecord:
    from orchestration.store import session_scope
    from orchestration.store.models import NotificationDelivery

    values = {
        # Bounded to the columns' sizes: PostgreSQL refuses longer values, SQLite would keep them.
        "channel": channel[:200],
        "kind": kind[:50],
        "recipient": recipient,
        "subject": subject,
        "status": status,
        "attempts": attempts,
        "last_error": last_error[:MAX_RECORDED_TEXT] if last_error else last_error,
        "response": response[:MAX_RECORDED_TEXT] if response else response,
        "origin": origin[:200],
        "created_at": created_at,
        "delivered_at": delivered_at,
    }
    with session_scope(engine) as session:
        if claim is not None:
            # Settle the claim: the same row, so the key keeps one record (and its claim time).
            row = session.get(NotificationDelivery, claim.id)
            for name, value in values.items():
                if name != "created_at":
                    setattr(row, name, value)
            session.flush()
            return as_record(row)
        row = NotificationDelivery(**values)
        session.add(row)
        session.flush()
        return DeliveryRecord(id=row.id, **values)
