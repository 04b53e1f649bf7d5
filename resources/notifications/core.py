"""The channel interface every kind implements, the message it sends and the record it leaves.

A new kind of channel is one module beside this one: a subclass of `NotificationChannel` with a
`kind`, a pydantic `Spec` for its block in channels.yaml, `deliver()` and, if its client library has
exceptions of its own, `is_transient()`. Subclasses register themselves by `kind` (`CHANNEL_KINDS`).
"""

from __future__ import annotations

import os
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from orchestration.errors import JunctionError
from orchestration.kernel.spec_errors import validate_spec
from orchestration.kernel.times import DurationText

Severity = Literal["critical", "error", "warning", "info"]
SEVERITIES: tuple[Severity, ...] = ("critical", "error", "warning", "info")

# Error and response texts kept in a delivery record: enough to diagnose, bounded row size.
MAX_RECORDED_TEXT = 2000


# --- Errors ---------------------------------------------------------------------------------------


class NotificationError(JunctionError):
    """A notification was not delivered. `record` is its (failed) delivery record."""

    def __init__(self, message: str, record: DeliveryRecord | None = None):
        super().__init__(message)
        self.record = record


class DeliveryFailure(Exception):
    """A failed attempt that the channel has classified: retry it (`transient`) or give up.

    `retry_after_s` is the wait the receiver asked for (HTTP `Retry-After`); it replaces the backoff.
    """

    def __init__(self, reason: str, *, transient: bool, retry_after_s: float | None = None):
        super().__init__(reason)
        self.transient = transient
        self.retry_after_s = retry_after_s


# --- Messages and records -------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """A rendered message. `recipients` empty: the channel's default recipients.

    `id` stays the same across the retries of one message, so receivers can drop duplicates (it is
    the webhook's `X-Junction-Delivery` header and the email's Message-ID).
    """

    subject: str
    body: str
    html: str | None = None
    recipients: Sequence[str] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # What chat and incident channels show beside the text (Slack fields, a Teams FactSet, PagerDuty
    # custom details): short label → value.
    facts: Mapping[str, str] = field(default_factory=dict)
    severity: Severity | None = None
    # An alert's group: PagerDuty's dedup_key, so its resolve closes the incident its trigger opened.
    group_key: str | None = None
    resolved: bool = False
    links: Sequence[tuple[str, str]] = ()  # (text, URL)

    def __post_init__(self) -> None:
        # A line break in a subject would end the email header (header injection) and is meaningless
        # in a title anyway.
        object.__setattr__(self, "subject", " ".join(self.subject.split()))
        if isinstance(self.recipients, str):
            object.__setattr__(self, "recipients", (self.recipients,))
        object.__setattr__(self, "recipients", tuple(self.recipients))
        object.__setattr__(self, "facts", {str(k): str(v) for k, v in self.facts.items()})
        object.__setattr__(self, "links", tuple(tuple(link) for link in self.links))


@dataclass(frozen=True)
class DeliveryRecord:
    """One row of `notification_deliveries`, as written."""

    id: int
    channel: str
    kind: str
    recipient: str
    subject: str
    status: Literal["delivered", "failed", "sending", "held", "digested"]
    attempts: int
    last_error: str | None
    response: str | None
    origin: str
    created_at: datetime
    delivered_at: datetime | None
    dedupe_key: str | None = None
    message_id: str | None = None
    resends: int = 0
    # True when this call sent nothing: the delivery of its dedupe key was already claimed.
    repeated: bool = False


# --- Channel specs (channels.yaml) ----------------------------------------------------------------


def _is_env_var_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        raise ValueError(
            "must be the NAME of an environment variable holding the secret, not the secret itself"
        )
    return value


EnvVarName = Annotated[str, AfterValidator(_is_env_var_name)]


class RetryPolicy(BaseModel):
    """Transient failures are retried after initial_backoff_s, then twice as long each time (plus up
    to initial_backoff_s of jitter), never longer than max_backoff_s, until max_attempts in all."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_attempts: int = Field(default=4, ge=1, le=20)
    initial_backoff_s: float = Field(default=1.0, ge=0)
    max_backoff_s: float = Field(default=30.0, ge=0)


class ThrottlePolicy(BaseModel):
    """At most `max_messages` deliveries per `per` (e.g. 1h); beyond it messages are held, not dropped,
    and go out together as one digest once the window has room."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_messages: int = Field(ge=1)
    per: DurationText


class DigestPolicy(BaseModel):
    """Messages are held and sent as one digest per `interval` (the first held message opens it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    interval: DurationText


class ChannelSpec(BaseModel):
    """What every channel's block has; each kind adds its own fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    description: str = ""
    retry: RetryPolicy = RetryPolicy()
    throttle: ThrottlePolicy | None = None
    digest: DigestPolicy | None = None


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL")
    return value


HttpUrl = Annotated[str, AfterValidator(_http_url)]


# --- Channels -------------------------------------------------------------------------------------

CHANNEL_KINDS: dict[str, type[NotificationChannel]] = {}


class NotificationChannel(ABC):
    """A named destination. Subclasses set `kind` and `Spec` and implement `deliver`."""

    kind: ClassVar[str]
    Spec: ClassVar[type[ChannelSpec]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            CHANNEL_KINDS[cls.kind] = cls

    def __init__(self, name: str, **config: Any):
        """`EmailChannel("ops", host=..., sender=...)`; invalid config raises `SpecError`."""
        self.name = name
        self.spec = validate_spec({"kind": self.kind, **config}, self.Spec)

    @property
    def retry(self) -> RetryPolicy:
        return self.spec.retry

    @abstractmethod
    def deliver(self, message: Message) -> str:
        """Send `message` once; return a short summary of the receiver's answer, raise on failure."""

    def recipient(self, message: Message) -> str:
        """Who the delivery record names as the recipient."""
        return ", ".join(message.recipients)

    def is_transient(self, exc: BaseException) -> bool:
        """Whether a failed attempt may succeed if repeated (the default: network trouble)."""
        if isinstance(exc, DeliveryFailure):
            return exc.transient
        return isinstance(exc, ConnectionError | TimeoutError)

    def describe_error(self, exc: BaseException) -> str:
        return str(exc) if isinstance(exc, DeliveryFailure) else f"{type(exc).__name__}: {exc}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def secret_from_env(env_var: str) -> str:
    value = os.environ.get(env_var)
    if not value:
        # Permanent: waiting will not set the variable.
        raise DeliveryFailure(
            f"environment variable {env_var} (the channel's secret) is not set", transient=False
        )
    return value


def retry_after_seconds(value: str | None) -> float | None:
    """`Retry-After` as seconds: either a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
