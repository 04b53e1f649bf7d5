"""SQLAlchemy models of the platform store. Each table's migration is in `migrations/versions`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator):
    """Timestamps stored in UTC and always read back timezone-aware.

    PostgreSQL keeps the zone; SQLite drops it and returns naive values, which would then be
    serialised without an offset (not RFC 3339) and compare wrongly with aware ones.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime}


class AuditEntry(Base):
    """One append-only audit entry, hash-chained to the previous one.

    `prev_hash` is unique: two writers that read the same chain head cannot both append after it,
    so the database itself forbids a fork and the loser retries on the new head.
    """

    __tablename__ = "audit_log"
    __table_args__ = (UniqueConstraint("prev_hash", name="uq_audit_log_prev_hash"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, index=True)
    actor: Mapped[str] = mapped_column(String(200), nullable=False, index=True)
    action: Mapped[str] = mapped_column(String(200), nullable=False, index=True)
    target: Mapped[str] = mapped_column(String(500), nullable=False, default="")
    origin: Mapped[str] = mapped_column(String(200), nullable=False, default="")
    details: Mapped[dict] = mapped_column(JSON, nullable=False, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    entry_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)


class ApiKey(Base):
    """An API key: only a salted hash of its secret is stored; the key itself is shown once."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False, unique=True)
    principal: Mapped[str] = mapped_column(String(200), nullable=False, index=True)
    groups: Mapped[list] = mapped_column(JSON, nullable=False, default=list)
    scopes: Mapped[list] = mapped_column(JSON, nullable=False, default=list)
    salt: Mapped[str] = mapped_column(String(64), nullable=False)
    secret_hash: Mapped[str] = mapped_column(String(128), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    created_by: Mapped[str] = mapped_column(String(200), nullable=False, default="")
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class NotificationDelivery(Base):
    """The record of one notification sent (or attempted) through a channel.

    With a `dedupe_key` the row is written before sending, as a claim in status `sending`, and
    settled afterwards (`resources/notifications/delivery.py`, migration `0007_notification_dedupe`)."""

    __tablename__ = "notification_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    channel: Mapped[str] = mapped_column(String(200), nullable=False, index=True)
    kind: Mapped[str] = mapped_column(String(50), nullable=False)
    recipient: Mapped[str] = mapped_column(Text, nullable=False, default="")
    subject: Mapped[str] = mapped_column(Text, nullable=False, default="")
    status: Mapped[str] = mapped_column(String(20), nullable=False, index=True)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    response: Mapped[str | None] = mapped_column(Text, nullable=True)
    origin: Mapped[str] = mapped_column(String(200), nullable=False, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, index=True)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    dedupe_key: Mapped[str | None] = mapped_column(String(400), nullable=True, unique=True)
    message_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    resends: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")


class HeldNotification(Base):
    """A message a throttled or digesting channel holds until it goes out in a digest
    (`resources/notifications/held.py`, migration `0012_held_notifications`). `digest_key` is set
    when a flush claims it into a digest, `released_at` when that digest was delivered."""

    __tablename__ = "notification_held"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    channel: Mapped[str] = mapped_column(String(200), nullable=False, index=True)
    delivery_id: Mapped[int] = mapped_column(Integer, nullable=False)
    reason: Mapped[str] = mapped_column(String(20), nullable=False)
    message: Mapped[dict] = mapped_column(JSON, nullable=False)
    held_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    digest_key: Mapped[str | None] = mapped_column(String(400), nullable=True, index=True)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True, index=True)


class SystemAlert(Base):
    """One alert of a rule (`sensors/alerts/`): a rule's signal for one set of labels, pending while
    its condition has held for less than the rule's `for`, then firing, then resolved."""

    __tablename__ = "system_alerts"

    fingerprint: Mapped[str] = mapped_column(String(64), primary_key=True)
    rule: Mapped[str] = mapped_column(String(200), nullable=False, index=True)
    labels: Mapped[dict] = mapped_column(JSON, nullable=False)
    severity: Mapped[str] = mapped_column(String(20), nullable=False)
    status: Mapped[str] = mapped_column(String(20), nullable=False, index=True)
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    summary: Mapped[str] = mapped_column(Text, nullable=False, default="")
    active_since: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    fired_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True, index=True)
    # When its value or summary last changed (a steady alert is not rewritten every evaluation).
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    # Why a firing alert was not notified at the last evaluation: a silence's id or "inhibited".
    muted_by: Mapped[str | None] = mapped_column(String(100), nullable=True)
    group_key: Mapped[str] = mapped_column(String(64), nullable=False, index=True)


class AlertGroup(Base):
    """A rule's alerts sharing the `group_by` labels: what was last notified, and when."""

    __tablename__ = "alert_groups"

    group_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    rule: Mapped[str] = mapped_column(String(200), nullable=False, index=True)
    labels: Mapped[dict] = mapped_column(JSON, nullable=False)
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    last_notified_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # The firing fingerprints the last notification named: a change re-notifies at group_interval.
    notified: Mapped[list] = mapped_column(JSON, nullable=False)
    # Notifications sent: the dedupe key of the next one is `alert:<group_key>:<sequence>:<channel>`.
    sequence: Mapped[int] = mapped_column(Integer, nullable=False, default=0)


class AlertSilence(Base):
    """A silence: firing alerts whose labels match every matcher are not notified until `ends_at`."""

    __tablename__ = "alert_silences"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    matchers: Mapped[list] = mapped_column(JSON, nullable=False)
    starts_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    ends_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, index=True)
    comment: Mapped[str] = mapped_column(Text, nullable=False)
    created_by: Mapped[str] = mapped_column(String(200), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class RunPerformance(Base):
    """One finished Dagster run's figures (`sensors/performance.py`, migration `0014_run_performance`):
    queue wait, duration, rows and each step's time, kept `performance_retention_days`."""

    __tablename__ = "run_performance"

    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job: Mapped[str] = mapped_column(String(200), nullable=False, index=True)
    status: Mapped[str] = mapped_column(String(20), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, index=True)
    queued_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    rows: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    rows_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    # {step key: {"seconds": …, "attempts": …, "status": …}}
    steps: Mapped[dict] = mapped_column(JSON, nullable=False)


class ApiRequestStats(Base):
    """Gateway requests aggregated per minute, route, method, principal and gateway instance."""

    __tablename__ = "api_request_stats"
    __table_args__ = (
        UniqueConstraint(
            "minute", "instance", "route", "method", "principal", name="uq_api_request_stats_bucket"
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    minute: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, index=True)
    instance: Mapped[str] = mapped_column(String(200), nullable=False)
    route: Mapped[str] = mapped_column(String(500), nullable=False)
    method: Mapped[str] = mapped_column(String(10), nullable=False)
    principal: Mapped[str] = mapped_column(String(200), nullable=False)
    requests: Mapped[int] = mapped_column(Integer, nullable=False)
    status_2xx: Mapped[int] = mapped_column(Integer, nullable=False)
    status_3xx: Mapped[int] = mapped_column(Integer, nullable=False)
    status_4xx: Mapped[int] = mapped_column(Integer, nullable=False)
    status_5xx: Mapped[int] = mapped_column(Integer, nullable=False)
    latency_sum_ms: Mapped[float] = mapped_column(Float, nullable=False)
    latency_p50_ms: Mapped[float] = mapped_column(Float, nullable=False)
    latency_p95_ms: Mapped[float] = mapped_column(Float, nullable=False)
    latency_p99_ms: Mapped[float] = mapped_column(Float, nullable=False)


# --- Event streams (issue 5): the registry, and the SQL backend of the event stream resource ---------


class EventStreamDefinition(Base):
    """A declared event stream: its payload schema and retention (YAML in the streams folder, or the API)."""

    __tablename__ = "event_streams"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    description: Mapped[str] = mapped_column(Text, nullable=False, default="")
    payload_schema: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    retention_max_count: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    retention_max_age_seconds: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    idempotency_window_seconds: Mapped[int] = mapped_column(BigInteger, nullable=False)
    # Its owner: `api`, or `yaml:<file>` of the streams folder (only the owner changes it).
    origin: Mapped[str] = mapped_column(String(300), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class StreamHead(Base):
    """Per-stream counter row of the SQL backend, locked FOR UPDATE by every publisher.

    Holding this row's lock from id assignment to commit serialises a stream's publishers, so ids
    commit in the order they were assigned (a PostgreSQL sequence would not: its values commit out of
    order). `max_deleted_*` is the highest id retention removed, for gap detection.
    """

    __tablename__ = "stream_heads"

    stream: Mapped[str] = mapped_column(String(200), primary_key=True)
    last_ms: Mapped[int] = mapped_column(BigInteger, nullable=False)
    last_seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
    max_deleted_ms: Mapped[int] = mapped_column(BigInteger, nullable=False)
    max_deleted_seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
    events_added: Mapped[int] = mapped_column(BigInteger, nullable=False)


class StreamEvent(Base):
    """One event of the SQL backend; its id is `ms-seq`, as on Redis Streams."""

    __tablename__ = "stream_events"

    stream: Mapped[str] = mapped_column(String(200), primary_key=True)
    ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    payload: Mapped[Any] = mapped_column(JSON, nullable=False)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    published_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class StreamIdempotencyKey(Base):
    """An idempotency key seen on a stream, until `expires_at` (the stream's idempotency window)."""

    __tablename__ = "stream_idempotency_keys"
    __table_args__ = (Index("ix_stream_idempotency_keys_expires_at", "expires_at"),)

    stream: Mapped[str] = mapped_column(String(200), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    event_ms: Mapped[int] = mapped_column(BigInteger, nullable=False)
    event_seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class EventSubscription(Base):
    """A durable webhook subscription: its declaration (YAML in the subscriptions folder, or the API)
    and, for one ordered per key, which dispatcher holds it (`lease_*`, epoch seconds)."""

    __tablename__ = "event_subscriptions"

    name: Mapped[str] = mapped_column(String(150), primary_key=True)
    stream: Mapped[str] = mapped_column(String(200), nullable=False)
    spec: Mapped[dict] = mapped_column(JSON, nullable=False)
    # Its owner: `api`, or `yaml:<file>` of the subscriptions folder (only the owner changes it).
    origin: Mapped[str] = mapped_column(String(300), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    lease_holder: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class StreamConsumerGroup(Base):
    """A consumer group of the SQL backend: the id of the last event delivered to it."""

    __tablename__ = "stream_consumer_groups"

    stream: Mapped[str] = mapped_column(String(200), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    last_delivered_ms: Mapped[int] = mapped_column(BigInteger, nullable=False)
    last_delivered_seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class StreamPendingEvent(Base):
    """An event delivered to a group's consumer and not yet acknowledged (Redis's PEL)."""

    __tablename__ = "stream_pending_events"

    stream: Mapped[str] = mapped_column(String(200), primary_key=True)
    group_name: Mapped[str] = mapped_column(String(200), primary_key=True)
    ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    consumer: Mapped[str] = mapped_column(String(200), nullable=False)
    delivered_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    deliveries: Mapped[int] = mapped_column(Integer, nullable=False)


# --- Workflow parking (issue 6): checkpoints of parked executions, approval requests and decisions ---


class WorkflowCheckpoint(Base):
    """One workflow execution's checkpoint: its inputs and the states of the steps it completed.

    `state` is `running` while a run of the execution works, `waiting` once a step parked it; the
    resume sensor launches the next run when `wake_at` has passed (or `waiting_on_run_id` has
    finished) and `parked_run_id` has finished.
    """

    __tablename__ = "workflow_checkpoints"

    execution_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    workflow: Mapped[str] = mapped_column(String(200), nullable=False, index=True)
    inputs: Mapped[dict] = mapped_column(JSON, nullable=False)
    step_outputs: Mapped[dict] = mapped_column(JSON, nullable=False)
    state: Mapped[str] = mapped_column(String(20), nullable=False, index=True)
    parked_step: Mapped[str | None] = mapped_column(String(200), nullable=True)
    parked_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # A run the parked step waits for (a Sync step's child run); the sensor resumes once it finished.
    waiting_on_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    wake_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class ApprovalRequest(Base):
    """An Approval step's request: who may decide, how many must approve, and what happens on timeout."""

    __tablename__ = "approval_requests"
    __table_args__ = (UniqueConstraint("execution_id", "step_id", name="uq_approval_requests_step"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    execution_id: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    workflow: Mapped[str] = mapped_column(String(200), nullable=False)
    step_id: Mapped[str] = mapped_column(String(200), nullable=False)
    message: Mapped[str] = mapped_column(Text, nullable=False)
    approver_principals: Mapped[list] = mapped_column(JSON, nullable=False)
    approver_groups: Mapped[list] = mapped_column(JSON, nullable=False)
    required_approvals: Mapped[int] = mapped_column(Integer, nullable=False)
    timeout_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    on_timeout: Mapped[str] = mapped_column(String(10), nullable=False)
    form_inputs: Mapped[dict] = mapped_column(JSON, nullable=False)
    forbid_self_approval: Mapped[bool] = mapped_column(Boolean, nullable=False)
    requester: Mapped[str] = mapped_column(String(200), nullable=False)
    status: Mapped[str] = mapped_column(String(20), nullable=False, index=True)
    resolution: Mapped[str | None] = mapped_column(String(20), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class ApprovalDecision(Base):
    """One principal's decision on an approval request (at most one each)."""

    __tablename__ = "approval_decisions"
    __table_args__ = (UniqueConstraint("request_id", "principal", name="uq_approval_decisions_principal"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("approval_requests.id", ondelete="CASCADE"), nullable=False, index=True
    )
    principal: Mapped[str] = mapped_column(String(200), nullable=False)
    decision: Mapped[str] = mapped_column(String(10), nullable=False)
    comment: Mapped[str] = mapped_column(Text, nullable=False)
    inputs: Mapped[dict] = mapped_column(JSON, nullable=False)
    decided_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class CacheEntry(Base):
    """The cache's database layer (L3): one encoded value per namespace and versioned key."""

    __tablename__ = "cache_entries"

    namespace: Mapped[str] = mapped_column(String(100), primary_key=True)
    key: Mapped[str] = mapped_column(String(500), primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    fresh_until: Mapped[float] = mapped_column(Float, nullable=False)
    expires_at: Mapped[float] = mapped_column(Float, nullable=False, index=True)
    tags: Mapped[list] = mapped_column(JSON, nullable=False)


class CacheEntryTag(Base):
    """Which cache entries carry a tag (invalidation by tag)."""

    __tablename__ = "cache_entry_tags"

    namespace: Mapped[str] = mapped_column(String(100), primary_key=True)
    tag: Mapped[str] = mapped_column(String(200), primary_key=True)
    key: Mapped[str] = mapped_column(String(500), primary_key=True)


class CacheLease(Base):
    """Who holds a cache duty (a namespace's write-behind flusher) until when."""

    __tablename__ = "cache_leases"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    holder: Mapped[str] = mapped_column(String(100), nullable=False)
    expires_at: Mapped[float] = mapped_column(Float, nullable=False)


class CacheKeyHits(Base):
    """Sampled reads per cache key: the most read keys are the ones warming preloads."""

    __tablename__ = "cache_key_hits"
    __table_args__ = (Index("ix_cache_key_hits_namespace_hits", "namespace", "hits"),)

    namespace: Mapped[str] = mapped_column(String(100), primary_key=True)
    key: Mapped[str] = mapped_column(String(500), primary_key=True)
    hits: Mapped[int] = mapped_column(BigInteger, nullable=False)
    last_hit_at: Mapped[float] = mapped_column(Float, nullable=False)


class CacheProcessStats(Base):
    """One process's figures for one namespace, written every few seconds (analytics across processes)."""

    __tablename__ = "cache_process_stats"

    process_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    namespace: Mapped[str] = mapped_column(String(100), primary_key=True)
    host: Mapped[str] = mapped_column(String(255), nullable=False)
    pid: Mapped[int] = mapped_column(Integer, nullable=False)
    updated_at: Mapped[float] = mapped_column(Float, nullable=False, index=True)
    figures: Mapped[dict] = mapped_column(JSON, nullable=False)


# --- The reverse proxy (issue 13): routes and upstreams declared through the admin API ----------------


class ProxyObject(Base):
    """A route or upstream the admin API owns (`origin: api`); the routes file's own are read from the
    file. `updated_at` (epoch seconds) changes with every write: the gateways poll it to reload."""

    __tablename__ = "proxy_objects"

    kind: Mapped[str] = mapped_column(String(20), primary_key=True)  # route | upstream
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    spec: Mapped[dict] = mapped_column(JSON, nullable=False)
    updated_at: Mapped[float] = mapped_column(Float, nullable=False)
    updated_by: Mapped[str] = mapped_column(String(200), nullable=False)
