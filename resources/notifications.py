"""Notifications: send a rendered message to a named channel, with retries and a delivery record.

Channels are declared by name in `channels.yaml` (`settings.channels_file`); secrets are referenced
there by environment-variable name and read at send time. `send()` retries transient failures with
exponential backoff (tenacity) and ends every attempt sequence in exactly one row of
`notification_deliveries`: `delivered`, or `failed` and then `NotificationError` is raised.

Exactly-once senders (`send(..., dedupe_key=…)`): a sender that may run again after a crash — the
workflow run-failure sensor, whose cursor moves only after its tick — claims the delivery first: the
row is inserted in status `sending` under the unique key before anything is sent, then settled. A
second call with the key sends nothing and returns the settled record (`repeated=True`). A claim
found still `sending` is a send a crash interrupted: nobody knows whether the receiver got it. It is
sent again — at-least-once, as Dagster's own sensors and run keys are, because an alert lost
silently is worse than one received twice — with the same message id (the webhook's
`X-Junction-Delivery`, the e-mail's Message-ID, the outbox line's `id`), so the receiver can drop
the duplicate; the record counts it in `resends` and the resend is logged as a warning.

A new kind of channel (Slack, Teams, SMS, PagerDuty) is one subclass of `NotificationChannel`: a
`kind`, a pydantic `Spec` for its block in channels.yaml, `deliver()` and, if its client library
has exceptions of its own, `is_transient()`. Subclasses register themselves by `kind`.

Webhook signatures: `X-Junction-Signature: v1=<hex HMAC-SHA256 of "<timestamp>.<body>">` with the
Unix timestamp in `X-Junction-Timestamp`; receivers check both with `verify_signature()`, which
rejects a timestamp outside the tolerance so a captured request cannot be replayed later.

Module-level imports are kept light (no Dagster, no SQLAlchemy models, no httpx — imported by the
webhook channel when it sends, not by every run worker loading the code location): the gateway and
the CLI use `send()` too. `NotificationsResource`, the Dagster resource, is built on first access.

The `outbox` kind delivers nowhere: it appends each message as one JSON line to a local file (like
Django's file-based e-mail backend), so the shipped workflows run on a fresh clone without a mail
server; `junction notifications outbox` reads it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import smtplib
import ssl
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit, urlunsplit

import tenacity
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from orchestration.errors import JunctionError
from orchestration.kernel.spec_errors import SpecError, SpecProblem, read_yaml, validate_spec

if TYPE_CHECKING:
    from sqlalchemy import Engine

__all__ = [
    "DeliveryFailure",
    "DeliveryRecord",
    "EmailChannel",
    "Message",
    "NotificationChannel",
    "NotificationError",
    "OutboxChannel",
    "RetryPolicy",
    "WebhookChannel",
    "WebhookSignatureError",
    "load_channels",
    "send",
    "sign_payload",
    "verify_signature",
]

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Junction-Signature"
TIMESTAMP_HEADER = "X-Junction-Timestamp"
DELIVERY_HEADER = "X-Junction-Delivery"
SIGNATURE_VERSION = "v1"
# Error and response texts kept in a delivery record: enough to diagnose, bounded row size.
_MAX_RECORDED_TEXT = 2000


# --- Errors ---------------------------------------------------------------------------------------


class NotificationError(JunctionError):
    """A notification was not delivered. `record` is its (failed) delivery record."""

    def __init__(self, message: str, record: DeliveryRecord | None = None):
        super().__init__(message)
        self.record = record


class WebhookSignatureError(JunctionError):
    """A webhook request's signature or timestamp did not verify."""


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

    def __post_init__(self) -> None:
        # A line break in a subject would end the email header (header injection) and is meaningless
        # in a title anyway.
        object.__setattr__(self, "subject", " ".join(self.subject.split()))
        if isinstance(self.recipients, str):
            object.__setattr__(self, "recipients", (self.recipients,))
        object.__setattr__(self, "recipients", tuple(self.recipients))


@dataclass(frozen=True)
class DeliveryRecord:
    """One row of `notification_deliveries`, as written."""

    id: int
    channel: str
    kind: str
    recipient: str
    subject: str
    status: Literal["delivered", "failed", "sending"]
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


class ChannelSpec(BaseModel):
    """What every channel's block has; each kind adds its own fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    description: str = ""
    retry: RetryPolicy = RetryPolicy()


class EmailSpec(ChannelSpec):
    kind: Literal["email"] = "email"
    host: str = Field(min_length=1)
    port: int = Field(default=587, ge=1, le=65535)
    security: Literal["starttls", "ssl", "none"] = Field(
        default="starttls", description="starttls (usually port 587), ssl (465) or none (a local relay)."
    )
    username: str | None = None
    password_env: EnvVarName | None = None
    ca_file: Path | None = Field(default=None, description="CA bundle for a relay with a private CA.")
    sender: str = Field(min_length=3)
    recipients: list[str] = Field(default_factory=list, description="Used when a message names none.")
    timeout_s: float = Field(default=30.0, gt=0)

    @field_validator("sender")
    @classmethod
    def _sender_is_an_address(cls, value: str) -> str:
        if "@" not in value:
            raise ValueError("must be an email address")
        return value

    @field_validator("recipients")
    @classmethod
    def _recipients_are_addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            if "@" not in address:
                raise ValueError(f"{address!r} is not an email address")
        return value

    @model_validator(mode="after")
    def _credentials_need_encryption(self) -> EmailSpec:
        if (self.username is None) != (self.password_env is None):
            raise ValueError("username and password_env go together")
        if self.username is not None and self.security == "none":
            raise ValueError("a password must not be sent unencrypted: use security starttls or ssl")
        return self


class WebhookSpec(ChannelSpec):
    kind: Literal["webhook"] = "webhook"
    url: str
    secret_env: EnvVarName = Field(description="Environment variable holding the HMAC signing secret.")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra headers (not secrets).")
    timeout_s: float = Field(default=10.0, gt=0)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("headers")
    @classmethod
    def _signature_headers_are_reserved(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if name.lower().startswith("x-junction-") or name.lower() == "content-type":
                raise ValueError(f"header {name!r} is set by Junction")
        return value


class OutboxSpec(ChannelSpec):
    kind: Literal["outbox"] = "outbox"
    path: Path | None = Field(
        default=None,
        description="JSON-lines file; relative paths are under JUNCTION_HOME. Default: outbox/<channel>.jsonl.",
    )
    recipients: list[str] = Field(default_factory=list, description="Used when a message names none.")


_CHANNEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")


class ChannelsFile(BaseModel):
    """channels.yaml: `channels: {name: {kind: email|webhook|outbox, ...}}`.

    Each channel's block is validated by the model of its kind (below, in `load_channels`): a pydantic
    discriminated union would put the tag into error locations (`channels.ops.email.port`), and the
    kernel's error format names fields of the user's document only.
    """

    SPEC_SHAPE: ClassVar[str] = "a channels file is a mapping: channels: {name: {kind: ..., ...}}"
    model_config = ConfigDict(extra="forbid")

    channels: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("channels")
    @classmethod
    def _names(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name in value:
            if not _CHANNEL_NAME.fullmatch(name):
                raise ValueError(f"channel name {name!r}: use letters, digits, '-', '_' or '.'")
        return value


# --- Channels -------------------------------------------------------------------------------------

_CHANNEL_KINDS: dict[str, type[NotificationChannel]] = {}


class NotificationChannel(ABC):
    """A named destination. Subclasses set `kind` and `Spec` and implement `deliver`."""

    kind: ClassVar[str]
    Spec: ClassVar[type[ChannelSpec]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            _CHANNEL_KINDS[cls.kind] = cls

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


def _secret(env_var: str) -> str:
    value = os.environ.get(env_var)
    if not value:
        # Permanent: waiting will not set the variable.
        raise DeliveryFailure(
            f"environment variable {env_var} (the channel's secret) is not set", transient=False
        )
    return value


class EmailChannel(NotificationChannel):
    """Email over SMTP: plain text, with an HTML alternative when the message has one."""

    kind = "email"
    Spec = EmailSpec
    spec: EmailSpec

    def recipients_of(self, message: Message) -> list[str]:
        return list(message.recipients or self.spec.recipients)

    def recipient(self, message: Message) -> str:
        return ", ".join(self.recipients_of(message))

    def build(self, message: Message) -> EmailMessage:
        recipients = self.recipients_of(message)
        if not recipients:
            raise DeliveryFailure(
                "no recipients: the message names none and the channel has no default", transient=False
            )
        email = EmailMessage()
        email["Subject"] = message.subject
        email["From"] = self.spec.sender
        email["To"] = ", ".join(recipients)
        email["Date"] = formatdate(localtime=True)
        email["Message-ID"] = f"<{message.id}@{self.spec.sender.rpartition('@')[2]}>"
        email.set_content(message.body)
        if message.html is not None:
            email.add_alternative(message.html, subtype="html")
        return email

    def deliver(self, message: Message) -> str:
        spec = self.spec
        email = self.build(message)
        recipients = self.recipients_of(message)
        password = _secret(spec.password_env) if spec.password_env else None
        tls = ssl.create_default_context(cafile=str(spec.ca_file) if spec.ca_file else None)
        if spec.security == "ssl":
            connection: smtplib.SMTP = smtplib.SMTP_SSL(
                spec.host, spec.port, timeout=spec.timeout_s, context=tls
            )
        else:
            connection = smtplib.SMTP(spec.host, spec.port, timeout=spec.timeout_s)
        with connection:
            if spec.security == "starttls":
                connection.starttls(context=tls)
            if spec.username is not None and password is not None:
                connection.login(spec.username, password)
            refused = connection.send_message(email, from_addr=spec.sender, to_addrs=recipients)
        summary = f"accepted by {spec.host}:{spec.port} for {len(recipients) - len(refused)} recipient(s)"
        if refused:
            summary += "; refused: " + ", ".join(
                f"{address} ({code})" for address, (code, _) in refused.items()
            )
        return summary

    def is_transient(self, exc: BaseException) -> bool:
        if isinstance(exc, smtplib.SMTPRecipientsRefused):
            return all(400 <= code < 500 for code, _ in exc.recipients.values())
        if isinstance(exc, smtplib.SMTPResponseException):
            return 400 <= exc.smtp_code < 500  # 4xx: try again later; 5xx: permanent
        if isinstance(exc, smtplib.SMTPServerDisconnected):
            return True
        if isinstance(exc, smtplib.SMTPNotSupportedError | ssl.SSLCertVerificationError):
            return False  # configuration: STARTTLS/AUTH not offered, certificate not trusted
        if isinstance(exc, OSError):
            return True  # connection refused or reset, timeout, DNS
        return super().is_transient(exc)

    def describe_error(self, exc: BaseException) -> str:
        if isinstance(exc, smtplib.SMTPRecipientsRefused):
            return "all recipients refused: " + ", ".join(
                f"{address} ({code} {_text(reply)})" for address, (code, reply) in exc.recipients.items()
            )
        if isinstance(exc, smtplib.SMTPResponseException):
            return f"SMTP {exc.smtp_code}: {_text(exc.smtp_error)}"
        return super().describe_error(exc)


def _text(reply: bytes | str) -> str:
    return reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)


class WebhookChannel(NotificationChannel):
    """A JSON POST, signed (see the module doc), to any HTTP endpoint."""

    kind = "webhook"
    Spec = WebhookSpec
    spec: WebhookSpec

    def recipient(self, message: Message) -> str:
        # The URL without its query or credentials: those often carry tokens.
        parts = urlsplit(self.spec.url)
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    def payload(self, message: Message) -> dict[str, Any]:
        return {
            "id": message.id,
            "channel": self.name,
            "subject": message.subject,
            "body": message.body,
            "html": message.html,
            "recipients": list(message.recipients),
            "metadata": dict(message.metadata),
            "sent_at": datetime.now(UTC).isoformat(),
        }

    def deliver(self, message: Message) -> str:
        secret = _secret(self.spec.secret_env)
        body = json.dumps(
            self.payload(message), ensure_ascii=False, separators=(",", ":"), default=str
        ).encode()
        # Signed at each attempt: a retry after a long backoff carries a fresh timestamp.
        timestamp = int(time.time())
        headers = {
            **self.spec.headers,
            "Content-Type": "application/json",
            DELIVERY_HEADER: message.id,
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: sign_payload(secret, timestamp, body),
        }
        import httpx

        with httpx.Client(timeout=self.spec.timeout_s) as client:
            response = client.post(self.spec.url, content=body, headers=headers)
        answer = f"HTTP {response.status_code}: {response.text[:500]}".rstrip(": ")
        if response.is_success:
            return answer
        status = response.status_code
        transient = status in (408, 429) or status >= 500
        retry_after = retry_after_seconds(response.headers.get("Retry-After")) if transient else None
        if retry_after is not None and retry_after > self.retry.max_backoff_s:
            reason = f"{answer} (asked to retry after {retry_after:g} s, more than max_backoff_s)"
            raise DeliveryFailure(reason, transient=False)
        raise DeliveryFailure(answer, transient=transient, retry_after_s=retry_after)

    def is_transient(self, exc: BaseException) -> bool:
        import httpx

        if isinstance(exc, httpx.UnsupportedProtocol | httpx.LocalProtocolError):
            return False  # the request itself is wrong
        if isinstance(exc, httpx.TransportError):
            return True  # connect/read errors and timeouts, a server that dropped the connection
        return super().is_transient(exc)


class OutboxChannel(NotificationChannel):
    """Appends each message as one JSON line to a local file: for development and the shipped examples.

    One `write()` on a descriptor opened with O_APPEND: the kernel places every line at the end of the
    file whole, so several threads or processes sending at once never interleave their lines.
    """

    kind = "outbox"
    Spec = OutboxSpec
    spec: OutboxSpec

    @property
    def path(self) -> Path:
        """Resolved at send time: JUNCTION_HOME may differ between loading and sending."""
        from orchestration.settings import get_settings

        configured = self.spec.path or Path("outbox") / f"{self.name}.jsonl"
        return get_settings().home_dir / configured.expanduser()  # an absolute path replaces the home

    def recipients_of(self, message: Message) -> list[str]:
        return list(message.recipients or self.spec.recipients)

    def recipient(self, message: Message) -> str:
        return ", ".join(self.recipients_of(message)) or f"outbox {self.path}"

    def line(self, message: Message) -> bytes:
        entry = {
            "time": datetime.now(UTC).isoformat(),
            "id": message.id,
            "channel": self.name,
            "subject": message.subject,
            "body": message.body,
            "html": message.html,
            "recipients": self.recipients_of(message),
            "metadata": dict(message.metadata),
        }
        return (json.dumps(entry, ensure_ascii=False, separators=(",", ":"), default=str) + "\n").encode()

    def deliver(self, message: Message) -> str:
        path = self.path
        data = self.line(message)
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(descriptor, data)
        finally:
            os.close(descriptor)
        if written != len(data):
            # Disk full or a quota hit. Not retried: each retry could leave another fragment behind.
            raise DeliveryFailure(f"only {written} of {len(data)} bytes written to {path}", transient=False)
        return f"appended to {path}"


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


# --- Webhook signatures ---------------------------------------------------------------------------


def sign_payload(secret: str | bytes, timestamp: int | str, body: bytes) -> str:
    """The `X-Junction-Signature` value: `v1=` + hex HMAC-SHA256 of `<timestamp>.<body>`."""
    key = secret.encode() if isinstance(secret, str) else secret
    digest = hmac.new(key, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"{SIGNATURE_VERSION}={digest}"


def verify_signature(
    secret: str | bytes,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_s: float = 300,
    now: float | None = None,
) -> None:
    """Check a received webhook; raise `WebhookSignatureError` saying why it is not authentic.

    Raises rather than returning a bool, so a receiver cannot ignore the answer by mistake.
    `headers` may be any mapping (case-insensitive ones are not required). The signature header
    may list several comma-separated signatures (a sender rotating secrets): one match suffices.
    """
    timestamp_text = _header(headers, TIMESTAMP_HEADER)
    signatures = _header(headers, SIGNATURE_HEADER)
    if timestamp_text is None or signatures is None:
        raise WebhookSignatureError(f"missing {TIMESTAMP_HEADER} or {SIGNATURE_HEADER} header")
    try:
        timestamp = int(timestamp_text)
    except ValueError:
        raise WebhookSignatureError(f"{TIMESTAMP_HEADER} is not a Unix timestamp") from None
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance_s:
        raise WebhookSignatureError(
            f"timestamp is {now - timestamp:+.0f} s off (tolerance {tolerance_s:g} s)"
        )
    expected = sign_payload(secret, timestamp_text, body)
    # compare_digest on every candidate: the time taken does not reveal how much of one matched.
    if not any(hmac.compare_digest(expected, candidate.strip()) for candidate in signatures.split(",")):
        raise WebhookSignatureError("signature does not match the body")


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    wanted = name.lower()
    return next((value for key, value in headers.items() if key.lower() == wanted), None)


# --- Loading channels -----------------------------------------------------------------------------


def load_channels(path: str | Path | None = None) -> dict[str, NotificationChannel]:
    """The channels declared in `path` (default: `settings.channels_file`), every problem reported."""
    if path is None:
        from orchestration.settings import get_settings

        path = get_settings().channels_file
    path = _as_shown(Path(path))
    # Unlike a spec, an empty channels file is meaningful: no channels are declared yet.
    declared = validate_spec(read_yaml(path) or {}, ChannelsFile, path)
    channels: dict[str, NotificationChannel] = {}
    problems: list[SpecProblem] = []
    for name, config in declared.channels.items():
        kind = config.get("kind")
        channel_class = _CHANNEL_KINDS.get(kind) if isinstance(kind, str) else None
        if channel_class is None:
            known = ", ".join(sorted(_CHANNEL_KINDS))
            reason = f"must be one of: {known}" if kind is not None else f"missing (one of: {known})"
            problems.append(SpecProblem(f"channels.{name}.kind", reason, str(path)))
            continue
        try:
            channels[name] = channel_class(name, **config)
        except SpecError as exc:
            problems.extend(exc.within(("channels", name), path).problems)
    if problems:
        raise SpecError(problems)
    return channels


def _as_shown(path: Path) -> Path:
    """Relative to the working directory when inside it: errors read `resources/channels.yaml: ...`."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


# --- Sending --------------------------------------------------------------------------------------


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
) -> DeliveryRecord:
    """Deliver `message` through `channel` (a name in the channels file, or a channel), retrying
    transient failures. Returns the delivery record; on failure writes a `failed` record and raises
    `NotificationError` carrying it. `origin` says who sent it (a run id, an alert name).

    `dedupe_key`: one delivery per key, claimed before sending (see the module doc); a key already
    claimed returns its record (`repeated=True`) without sending."""
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
            return _as_record(row)
    except IntegrityError:
        pass  # claimed before: by an earlier tick, settled or interrupted
    with session_scope(engine) as session:
        row = session.scalars(
            select(NotificationDelivery).where(NotificationDelivery.dedupe_key == dedupe_key)
        ).one()
        if row.status != SENDING:
            return _as_record(row, repeated=True)
        taken = session.execute(
            update(NotificationDelivery)
            .where(NotificationDelivery.id == row.id)
            .where(NotificationDelivery.status == SENDING)
            .where(NotificationDelivery.resends == row.resends)
            .values(resends=row.resends + 1)
        ).rowcount
        session.refresh(row)
        if not taken:
            return _as_record(row, repeated=True)
    logger.warning(
        "notification %r to channel %r was claimed at %s but never settled (a crash interrupted the "
        "send): sending it again with the same message id %s (resend %d)",
        dedupe_key,
        channel,
        row.created_at.isoformat(),
        row.message_id,
        row.resends,
    )
    return _as_record(row)


def _as_record(row: Any, *, repeated: bool = False) -> DeliveryRecord:
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
        "last_error": last_error[:_MAX_RECORDED_TEXT] if last_error else last_error,
        "response": response[:_MAX_RECORDED_TEXT] if response else response,
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
            return _as_record(row)
        row = NotificationDelivery(**values)
        session.add(row)
        session.flush()
        return DeliveryRecord(id=row.id, **values)


# --- The Dagster resource -------------------------------------------------------------------------


def _build_notifications_resource() -> type:
    import dagster as dg

    class NotificationsResource(dg.ConfigurableResource):
        """Templated notifications for workflow Notification steps and alerts.

        `send("ops", "Refund {{ inputs.id }} failed", "...", context)` renders the templates with
        `context` (sandboxed, strict: a missing variable is an error) and sends through the channel.
        """

        channels_file: str | None = None

        def send(
            self,
            channel: str,
            subject_template: str,
            body_template: str,
            context: Mapping[str, Any],
            *,
            html_template: str | None = None,
            recipients: Sequence[str] = (),
            metadata: Mapping[str, Any] | None = None,
            origin: str = "",
            max_attempts: int | None = None,
            dedupe_key: str | None = None,
        ) -> DeliveryRecord:
            from orchestration.kernel.templates import render, render_html

            message = Message(
                subject=render(subject_template, context),
                body=render(body_template, context),
                html=render_html(html_template, context) if html_template is not None else None,
                recipients=tuple(render(recipient, context) for recipient in recipients),
                metadata=dict(metadata or {}),
            )
            return send(
                channel,
                message,
                origin=origin,
                max_attempts=max_attempts,
                channels_file=self.channels_file,
                dedupe_key=dedupe_key,
            )

    # Defined in a function only to defer importing Dagster; it is this module's attribute.
    NotificationsResource.__module__ = __name__
    NotificationsResource.__qualname__ = "NotificationsResource"
    return NotificationsResource


def __getattr__(name: str) -> Any:
    if name == "NotificationsResource":
        resource_class = _build_notifications_resource()
        globals()[name] = resource_class
        return resource_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
