"""Durable webhook subscriptions: a stream's events, filtered, POSTed signed to a URL, at least once.

Declared one per YAML file in `settings.subscriptions_dir` (`sensors/subscriptions/*.yaml`), or
through `PUT /gateway/v1/subscriptions/{name}`; kept in the platform store's `event_subscriptions`
with one owner each, as streams (`registry.py`): `api` or `yaml:<file>`, and only the owner changes
it (the API answers 409 naming the file; a file declaring an API subscription stops the sync).

Each subscription reads its stream through its own consumer group (`subscription:<name>`), so every
gateway process's dispatcher (`orchestration/gateway/live/dispatcher.py`) shares the work and one
that dies leaves its deliveries pending for another to claim. This module holds what the dispatcher
and `junction events subscriptions replay` share: the declaration, the registry, and one delivery
(the request, signed as the notification webhooks are, and what its answer means).

The request body:

    {"subscription": "orders-to-partner", "stream": "orders", "attempt": 1,
     "events": [{"id": "1700000000000-0", "delivery_id": "orders-to-partner:1700000000000-0",
                 "time": "...", "payload": {...}}]}

with `X-Junction-Delivery` (the event's delivery id; for a batch, the first and last joined by
`..`), `X-Junction-Timestamp` and `X-Junction-Signature` (`v1=` HMAC-SHA256 of `<timestamp>.<body>`).
A delivery id is the same on every redelivery: receivers dedupe on it.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import Engine, select, update

from orchestration.kernel.conditions import Condition, evaluate, lookup, parse_condition, validate_path
from orchestration.kernel.spec_errors import SpecError, SpecProblem, load_named_specs
from orchestration.kernel.times import DurationText, duration_seconds
from resources.event_stream.core import (
    Event,
    EventStreamError,
    EventStreamUnavailable,
    dead_letter_record,
    dead_letter_stream,
)
from resources.event_stream.registry import (
    API_ORIGIN,
    YAML_ORIGIN,
    check_name,
    origin_file,
    owner_kind,
    yaml_origin,
)

logger = logging.getLogger("junction.subscriptions")
GROUP_PREFIX = "subscription:"
REPLAY_GROUP_PREFIX = "replay:"
MAX_ANSWER_CHARS = 2000  # of a receiver's answer kept with a failure (the dead letter, the stats)


def consumer_name() -> str:
    """A process's consumer name in every group it reads (`<host>-<pid>-<random>`, unique per start,
    readable in `pending`)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def chunks(events: list, size: int) -> Iterator[list]:
    """`events` in consecutive lists of `size` (the last one shorter)."""
    for start in range(0, len(events), size):
        yield events[start : start + size]


def group_name(subscription: str) -> str:
    """The consumer group a subscription reads its stream through."""
    return GROUP_PREFIX + subscription


def delivery_id(subscription: str, event_id: str) -> str:
    """Stable across redeliveries of the event to this subscription: the receiver's dedupe key."""
    return f"{subscription}:{event_id}"


class SubscriptionOwnedElsewhere(EventStreamError):
    """A write to a subscription another owner declared (its `origin`: `api` or `yaml:<file>`)."""

    def __init__(self, name: str, owner: str):
        self.name, self.owner = name, owner
        if owner_kind(owner) == YAML_ORIGIN:
            message = (
                f"subscription {name!r} is declared in the subscriptions folder's file "
                f"{origin_file(owner)}; change it there (applied when the platform starts)"
            )
        else:
            message = (
                f"subscription {name!r} is declared through the API (PUT /gateway/v1/subscriptions/"
                f"{name}), which owns it; rename it in the file, or DELETE it through the API first"
            )
        super().__init__(message)

    @property
    def file(self) -> str | None:
        return origin_file(self.owner)


class SubscriptionNotFound(EventStreamError):
    def __init__(self, name: str):
        self.name = name
        super().__init__(f"no subscription named {name!r}")


class OrderingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    per_key: str = Field(
        description="Payload field (dotted path): events with equal values are delivered one after "
        "another, in stream order; different keys go in parallel."
    )

    @field_validator("per_key")
    @classmethod
    def _path(cls, value: str) -> str:
        problem = validate_path(value)
        if problem:
            raise ValueError(problem)
        return value


class SubscriptionSettings(BaseModel):
    """What a subscription is declared as, but its name (the API's request body: the name is the path's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = Field(default="", max_length=2000)
    stream: str = Field(description="The declared stream to deliver.")
    url: str = Field(description="Where each delivery is POSTed (http:// or https://).")
    filter: dict[str, Any] | None = Field(
        default=None, description="Only events whose payload matches this condition (the kernel's)."
    )
    secret_env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="NAME of the env var holding the signing secret; unset: deliveries are not signed.",
    )
    headers: dict[str, str] = Field(default_factory=dict, description="Extra request headers.")
    batch_size: int = Field(default=1, ge=1, le=500, description="Events per delivery.")
    max_deliveries: int = Field(
        default=10, ge=1, le=100, description="Attempts before the events go to the dead letter."
    )
    ordering: Literal["none"] | OrderingSpec = Field(
        default="none", description='"none", or {per_key: field}: in order per value of the field.'
    )
    concurrency: int = Field(default=4, ge=1, le=64, description="Deliveries in flight per dispatcher.")
    start: Literal["latest", "earliest"] = Field(
        default="latest", description="Where a new subscription starts: new events, or every retained one."
    )
    timeout: DurationText = Field(default="10s", description="Per request.")
    initial_backoff: DurationText = Field(default="1s", description="The wait after a first failure.")
    max_backoff: DurationText = Field(
        default="5m", description="Waits double up to this (and cap Retry-After)."
    )
    paused: bool = Field(default=False, description="Declared, reading nothing: events wait in the group.")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value

    @field_validator("filter")
    @classmethod
    def _filter(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            try:
                parse_condition(value)
            except SpecError as exc:
                raise ValueError(str(exc).replace("\n", "; ")) from None
        return value


class SubscriptionSpec(SubscriptionSettings):
    """One subscription (a YAML file of the subscriptions folder)."""

    name: str

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value)

    def to_stored(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"name"})


@dataclass(frozen=True)
class Subscription:
    """A subscription as the dispatcher uses it (the filter compiled once)."""

    spec: SubscriptionSpec
    origin: str = API_ORIGIN
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def stream(self) -> str:
        return self.spec.stream

    @property
    def group(self) -> str:
        return group_name(self.spec.name)

    @property
    def key_field(self) -> str | None:
        return self.spec.ordering.per_key if isinstance(self.spec.ordering, OrderingSpec) else None

    @property
    def destination(self) -> str:
        """The receiver's origin (scheme, host, port): one circuit breaker each."""
        parts = urlsplit(self.spec.url)
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"

    @property
    def shown_url(self) -> str:
        """The URL without query or credentials (they often carry tokens)."""
        parts = urlsplit(self.spec.url)
        return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))

    @cached_property
    def condition(self) -> Condition | None:
        return parse_condition(self.spec.filter) if self.spec.filter is not None else None

    def matches(self, payload: Any) -> bool:
        condition = self.condition
        return condition is None or (isinstance(payload, dict) and evaluate(condition, payload))

    def key_of(self, payload: Any) -> str:
        """The ordering key of an event (events without the field share the key `null`)."""
        value = lookup(payload, self.key_field) if isinstance(payload, dict) and self.key_field else None
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            **self.spec.model_dump(mode="json", exclude={"name"}),
            "group": self.group,
            "origin": self.origin,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
        }


# --- one delivery --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryAnswer:
    """What one POST came to: `ok` (2xx), else the status (None: no answer) and why."""

    ok: bool
    status: int | None
    detail: str
    retry_after_s: float | None = None

    @property
    def receiver_unhealthy(self) -> bool:
        """Counts against the destination's breaker: no answer, 5xx, 429 - not a 4xx about the body."""
        return self.status is None or self.status >= 500 or self.status == 429


def batch_delivery_id(subscription: str, events: list[Event]) -> str:
    first = delivery_id(subscription, events[0].id)
    return first if len(events) == 1 else f"{first}..{events[-1].id}"


def webhook_request(subscription: Subscription, events: list[Event], attempt: int) -> tuple[bytes, dict]:
    """The body and headers of a delivery of `events` (signed now: a retry carries a fresh time)."""
    from resources.notifications import DELIVERY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign_payload

    name = subscription.name
    body = orjson.dumps(
        {
            "subscription": name,
            "stream": subscription.stream,
            "attempt": attempt,
            "events": [
                {
                    "id": event.id,
                    "delivery_id": delivery_id(name, event.id),
                    "time": event.time.isoformat(),
                    "payload": event.payload,
                }
                for event in events
            ],
        }
    )
    timestamp = int(time.time())
    headers = {
        **subscription.spec.headers,
        "Content-Type": "application/json",
        "User-Agent": "junction-webhooks",
        DELIVERY_HEADER: batch_delivery_id(name, events),
        TIMESTAMP_HEADER: str(timestamp),
        "X-Junction-Attempt": str(attempt),
    }
    if subscription.spec.secret_env:
        secret = os.environ.get(subscription.spec.secret_env)
        if not secret:
            raise MissingSecret(subscription.spec.secret_env)
        headers[SIGNATURE_HEADER] = sign_payload(secret, timestamp, body)
    return body, headers


class MissingSecret(EventStreamError):
    def __init__(self, env_var: str):
        super().__init__(f"environment variable {env_var} (the subscription's signing secret) is not set")


async def deliver(client, subscription: Subscription, events: list[Event], attempt: int) -> DeliveryAnswer:
    """POST `events` once with `client` (an `httpx.AsyncClient`); never raises for the receiver."""
    import httpx

    from resources.notifications import retry_after_seconds

    try:
        body, headers = webhook_request(subscription, events, attempt)
    except MissingSecret as exc:
        return DeliveryAnswer(False, None, str(exc))
    try:
        response = await client.post(
            subscription.spec.url,
            content=body,
            headers=headers,
            timeout=duration_seconds(subscription.spec.timeout),
        )
    except httpx.HTTPError as exc:
        detail = f"{type(exc).__name__}: {exc}".rstrip(": ")
        return DeliveryAnswer(False, None, detail[:MAX_ANSWER_CHARS])
    detail = response.text[:MAX_ANSWER_CHARS]
    if response.is_success:
        return DeliveryAnswer(True, response.status_code, detail)
    return DeliveryAnswer(
        False, response.status_code, detail, retry_after_seconds(response.headers.get("Retry-After"))
    )


def dead_letter_entry(
    subscription: Subscription, event: Event, consumer: str, attempts: int, answer: DeliveryAnswer
) -> dict[str, Any]:
    """The dead-letter stream's record of an event the subscription gave up on (replayable)."""
    return {
        **dead_letter_record(
            subscription.stream, subscription.group, event.id, consumer, attempts, event.payload
        ),
        "subscription": subscription.name,
        "delivery_id": delivery_id(subscription.name, event.id),
        "url": subscription.shown_url,
        "last_status": answer.status,
        "last_answer": answer.detail,
        "dead_at": datetime.now(UTC).isoformat(),
    }


# --- the registry ------------------------------------------------------------------------------------


def load_subscription_specs(folder: str | Path | None = None) -> dict[Path, SubscriptionSpec]:
    """Every `*.yaml`/`*.yml` of the subscriptions folder, validated; a name declared twice is an error."""
    if folder is None:
        from orchestration.settings import get_settings

        folder = get_settings().subscriptions_dir
    return load_named_specs(folder, SubscriptionSpec, "subscription")


class SubscriptionRegistry:
    """Declared subscriptions in the platform store's `event_subscriptions` table."""

    def __init__(self, engine: Engine):
        self.engine = engine

    @classmethod
    def for_url(cls, store_url: str | None = None) -> SubscriptionRegistry:
        from orchestration.store.db import get_engine

        return cls(get_engine(store_url))

    def list(self) -> list[Subscription]:
        from orchestration.store.db import session_scope
        from orchestration.store.models import EventSubscription

        with session_scope(self.engine) as session:
            rows = session.scalars(select(EventSubscription).order_by(EventSubscription.name))
            return [_subscription(row) for row in rows]

    def get(self, name: str) -> Subscription:
        from orchestration.store.db import session_scope
        from orchestration.store.models import EventSubscription

        with session_scope(self.engine) as session:
            row = session.get(EventSubscription, name)
            if row is None:
                raise SubscriptionNotFound(name)
            return _subscription(row)

    def upsert(self, spec: SubscriptionSpec, origin: str = API_ORIGIN) -> tuple[Subscription, bool]:
        """Create or replace the declaration; (it, whether it is new). `SubscriptionOwnedElsewhere`
        when another owner declared it (a YAML subscription may move to another file)."""
        from orchestration.store.db import session_scope
        from orchestration.store.models import EventSubscription

        now = datetime.now(UTC)
        stored = spec.to_stored()
        with session_scope(self.engine, write_lock=True) as session:
            row = session.get(EventSubscription, spec.name, with_for_update=True)
            created = row is None
            if row is None:
                row = EventSubscription(
                    name=spec.name,
                    stream=spec.stream,
                    spec=stored,
                    origin=origin,
                    created_at=now,
                    updated_at=now,
                )
                session.add(row)
            elif owner_kind(row.origin) != owner_kind(origin):
                raise SubscriptionOwnedElsewhere(spec.name, row.origin)
            elif row.spec != stored or row.origin != origin or row.stream != spec.stream:
                row.stream, row.spec, row.origin, row.updated_at = spec.stream, stored, origin, now
            session.flush()
            return _subscription(row), created

    def delete(self, name: str, origin: str = API_ORIGIN) -> Subscription:
        """Remove an API subscription (`SubscriptionOwnedElsewhere` for a YAML one)."""
        from orchestration.store.db import session_scope
        from orchestration.store.models import EventSubscription

        with session_scope(self.engine, write_lock=True) as session:
            row = session.get(EventSubscription, name, with_for_update=True)
            if row is None:
                raise SubscriptionNotFound(name)
            if owner_kind(row.origin) != owner_kind(origin):
                raise SubscriptionOwnedElsewhere(name, row.origin)
            subscription = _subscription(row)
            session.delete(row)
            return subscription

    def declared_specs(self, folder: str | Path | None = None) -> dict[Path, SubscriptionSpec]:
        """The folder's declarations, checked against the owners in the store (nothing written):
        `SpecError` naming each file that declares a subscription the API owns."""
        specs = load_subscription_specs(folder)
        owners = {subscription.name: subscription.origin for subscription in self.list()}
        problems = [
            SpecProblem("name", str(SubscriptionOwnedElsewhere(spec.name, owners[spec.name])), str(path))
            for path, spec in specs.items()
            if spec.name in owners and owner_kind(owners[spec.name]) != YAML_ORIGIN
        ]
        if problems:
            raise SpecError(problems)
        return specs

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Hold (or renew) the subscription's lease for `ttl_s`: True when `holder` has it now."""
        from orchestration.store.models import EventSubscription

        now = time.time()
        free = (
            (EventSubscription.lease_holder.is_(None))
            | (EventSubscription.lease_holder == holder)
            | (EventSubscription.lease_expires_at < now)
        )
        with self.engine.begin() as connection:
            taken = connection.execute(
                update(EventSubscription)
                .where(EventSubscription.name == name, free)
                .values(lease_holder=holder, lease_expires_at=now + ttl_s)
            ).rowcount
        return taken == 1

    def release_lease(self, name: str, holder: str) -> None:
        from orchestration.store.models import EventSubscription

        with self.engine.begin() as connection:
            connection.execute(
                update(EventSubscription)
                .where(EventSubscription.name == name, EventSubscription.lease_holder == holder)
                .values(lease_holder=None, lease_expires_at=None)
            )


def _subscription(row) -> Subscription:
    return Subscription(
        SubscriptionSpec.model_validate({"name": row.name, **row.spec}),
        origin=row.origin,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def declare(events, registry: SubscriptionRegistry, spec: SubscriptionSpec, origin: str = API_ORIGIN):
    """Declare a subscription and create its consumer group (from the stream's end, or its start):
    (the subscription, whether it is new). The stream must be declared (`StreamNotFound`)."""
    events.registry.get(spec.stream)
    subscription, created = registry.upsert(spec, origin)
    create_group(events, subscription)
    return subscription, created


def sync_declared(events, registry: SubscriptionRegistry, folder: str | Path | None = None) -> list:
    """Declare every subscription of the folder as `yaml:<file>` (all checked before any is written:
    a file declaring an API-owned subscription, or naming an undeclared stream, is a `SpecError`)."""
    specs = registry.declared_specs(folder)
    known_streams = {definition.name for definition in events.registry.list()}
    problems = [
        SpecProblem(
            "stream", f"stream {spec.stream!r} is not declared (declare it in the streams folder)", str(path)
        )
        for path, spec in specs.items()
        if spec.stream not in known_streams
    ]
    if problems:
        raise SpecError(problems)
    declared = []
    for path, spec in specs.items():
        subscription, _ = registry.upsert(spec, yaml_origin(path))
        try:
            create_group(events, subscription)
        except EventStreamUnavailable:
            # Redis is down: the dispatcher creates the group when it can (its events wait in the stream).
            logger.warning("subscription %s: its consumer group could not be created yet", spec.name)
        declared.append(subscription)
    return declared


def create_group(events, subscription: Subscription) -> bool:
    """The subscription's consumer group, from the stream's end (`start: latest`) or its oldest event."""
    return events.create_group(
        subscription.stream, subscription.group, "$" if subscription.spec.start == "latest" else "0"
    )


# --- replaying the dead letter -----------------------------------------------------------------------


def replay_group_name(subscription: str) -> str:
    """The consumer group of the dead-letter stream that remembers what a replay has delivered."""
    return REPLAY_GROUP_PREFIX + subscription


@dataclass
class ReplayCounts:
    replayed: int = 0
    failed: int = 0  # left pending in the replay group: the next replay tries them first
    last_failure: str | None = None


async def replay_dead_letters(
    events, subscription: Subscription, consumer: str, *, progress=None, page_size: int = 200
) -> ReplayCounts:
    """Deliver the subscription's dead-lettered events again, one attempt each, to its URL now.

    The dead-letter stream is read through the subscription's replay group, so a record is replayed
    once: a delivery that succeeds is acknowledged there; one that fails stays pending and comes
    first next time. `events` is the (sync) event stream; `progress(counts)` is called per page.
    """
    import httpx

    dead = dead_letter_stream(subscription.stream)
    group = replay_group_name(subscription.name)
    events.create_group(dead, group, "0")
    counts = ReplayCounts()
    async with httpx.AsyncClient() as client:
        page = events.claim_stale(dead, group, consumer, min_idle_ms=0, limit=page_size).events
        retried = {record.id for record in page}
        while True:
            if not page:
                page = [
                    r
                    for r in events.read_group(dead, group, consumer, limit=page_size)
                    if r.id not in retried
                ]
                if not page:
                    return counts
            others = [r.id for r in page if not is_dead_letter_of(r.payload, subscription)]
            if others:
                events.ack(dead, group, others)
            mine = [r for r in page if is_dead_letter_of(r.payload, subscription)]
            for records in chunks(mine, subscription.spec.batch_size):
                originals = [
                    Event(subscription.stream, r.payload["event_id"], r.payload.get("payload"))
                    for r in records
                ]
                attempt = max(int(r.payload.get("deliveries") or 0) for r in records) + 1
                answer = await deliver(client, subscription, originals, attempt)
                if answer.ok:
                    events.ack(dead, group, [r.id for r in records])
                    counts.replayed += len(records)
                else:
                    counts.failed += len(records)
                    counts.last_failure = (
                        f"HTTP {answer.status}: {answer.detail}" if answer.status else answer.detail
                    )
            if progress is not None:
                progress(counts)
            page = []


def is_dead_letter_of(record: Any, subscription: Subscription) -> bool:
    return isinstance(record, dict) and record.get("group") == subscription.group and "event_id" in record
