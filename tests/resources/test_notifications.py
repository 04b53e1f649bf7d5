"""Notification channels against real receivers: an aiosmtpd SMTP server and a local HTTP server.

Every `send` writes its delivery record to the platform store, so those tests run on both backends
(`store_url`: SQLite and the real PostgreSQL).
"""

from __future__ import annotations

import email
import email.policy
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import select
from support import free_port

from orchestration.kernel.spec_errors import SpecError
from orchestration.kernel.templates import TemplateRenderError
from orchestration.settings import PROJECT_ROOT, reset_settings_cache
from orchestration.store import session_scope
from orchestration.store.models import NotificationDelivery
from resources.notifications import (
    DeliveryRecord,
    EmailChannel,
    Message,
    NotificationError,
    OutboxChannel,
    WebhookChannel,
    WebhookSignatureError,
    load_channels,
    send,
    sign_payload,
    verify_signature,
)

SECRET_ENV = "JUNCTION_TEST_WEBHOOK_SECRET"
KINDS = "apprise, email, outbox, pagerduty, slack, sms, teams, webhook"
SECRET = "s3cret-for-tests"
FAST_RETRY = {"max_attempts": 3, "initial_backoff_s": 0.01, "max_backoff_s": 0.05}


def stored_deliveries() -> list[NotificationDelivery]:
    with session_scope() as session:
        return list(session.scalars(select(NotificationDelivery).order_by(NotificationDelivery.id)))


def assert_one_record_matching(record: DeliveryRecord) -> NotificationDelivery:
    """Exactly one row was written, and it is the record `send` returned or attached to its error."""
    rows = stored_deliveries()
    assert len(rows) == 1
    row = rows[0]
    assert (row.id, row.channel, row.kind, row.status, row.attempts) == (
        record.id,
        record.channel,
        record.kind,
        record.status,
        record.attempts,
    )
    assert (row.recipient, row.subject, row.last_error, row.response, row.origin) == (
        record.recipient,
        record.subject,
        record.last_error,
        record.response,
        record.origin,
    )
    assert row.created_at is not None
    assert (row.delivered_at is None) == (record.status == "failed")
    return row


# --- A real SMTP server -----------------------------------------------------------------------------


class SmtpRecorder:
    """aiosmtpd handler: keeps every message; `replies` are answered to DATA first (e.g. a 451)."""

    def __init__(self) -> None:
        self.envelopes: list = []
        self.replies: list[str] = []
        self.data_commands = 0

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802 - aiosmtpd's hook name
        self.data_commands += 1
        if self.replies:
            return self.replies.pop(0)
        self.envelopes.append(envelope)
        return "250 Message accepted for delivery"

    def messages(self) -> list[email.message.EmailMessage]:
        return [email.message_from_bytes(e.content, policy=email.policy.default) for e in self.envelopes]


@dataclass
class SmtpServer:
    port: int
    recorder: SmtpRecorder

    def channel(self, **overrides) -> EmailChannel:
        config = {
            "host": "127.0.0.1",
            "port": self.port,
            "security": "none",
            "sender": "junction@example.com",
            "recipients": ["ops@example.com"],
            "timeout_s": 5,
            "retry": FAST_RETRY,
        }
        return EmailChannel("ops-email", **{**config, **overrides})


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    recorder = SmtpRecorder()
    controller = Controller(recorder, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield SmtpServer(controller.port, recorder)
    finally:
        controller.stop()


# --- A real HTTP receiver ---------------------------------------------------------------------------


@dataclass
class ReceivedRequest:
    path: str
    headers: dict[str, str]
    body: bytes
    verified: str  # "ok" or the reason verify_signature gave


@dataclass
class WebhookReceiver:
    url: str
    requests: list[ReceivedRequest] = field(default_factory=list)
    # (status, headers, body) answered in order; then 200.
    script: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)

    def channel(self, **overrides) -> WebhookChannel:
        config = {
            "url": self.url + "/hooks/junction?token=abc",
            "secret_env": SECRET_ENV,
            "retry": FAST_RETRY,
        }
        return WebhookChannel("billing-hook", **{**config, **overrides})


@pytest.fixture
def webhook_receiver() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's hook name
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                verify_signature(SECRET, self.headers, body)
                verified = "ok"
            except WebhookSignatureError as exc:
                verified = str(exc)
            receiver.requests.append(ReceivedRequest(self.path, dict(self.headers.items()), body, verified))
            status, headers, answer = receiver.script.pop(0) if receiver.script else (200, {}, b"ok")
            if verified != "ok":
                status, headers, answer = 401, {}, verified.encode()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format, *args) -> None:  # noqa: A002 - keep test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def webhook_secret(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    return SECRET


# --- Email ------------------------------------------------------------------------------------------


def test_email_is_delivered_with_text_and_html_parts(store_url: str, smtp_server: SmtpServer) -> None:
    message = Message(
        subject="Refund 42\nfailed",
        body="The refund of 42 EUR failed.",
        html="<p>The refund of <b>42 EUR</b> failed.</p>",
        recipients=["ada@example.com", "grace@example.com"],
    )
    record = send(smtp_server.channel(), message, origin="run:abc123")

    assert (record.status, record.attempts, record.kind, record.channel) == (
        "delivered",
        1,
        "email",
        "ops-email",
    )
    assert record.recipient == "ada@example.com, grace@example.com"
    assert record.subject == "Refund 42 failed"
    assert record.response == f"accepted by 127.0.0.1:{smtp_server.port} for 2 recipient(s)"
    assert record.origin == "run:abc123"
    assert_one_record_matching(record)

    [envelope] = smtp_server.recorder.envelopes
    assert envelope.mail_from == "junction@example.com"
    assert envelope.rcpt_tos == ["ada@example.com", "grace@example.com"]
    [received] = smtp_server.recorder.messages()
    assert received["Subject"] == "Refund 42 failed"
    assert received["From"] == "junction@example.com"
    assert received["To"] == "ada@example.com, grace@example.com"
    assert received["Message-ID"] == f"<{message.id}@example.com>"
    assert received.get_body(("plain",)).get_content().strip() == "The refund of 42 EUR failed."
    assert received.get_body(("html",)).get_content().strip() == "<p>The refund of <b>42 EUR</b> failed.</p>"


def test_email_without_html_is_plain_text_to_the_default_recipients(
    store_url: str, smtp_server: SmtpServer
) -> None:
    record = send(smtp_server.channel(), Message(subject="Nightly load done", body="12 files."))
    assert record.recipient == "ops@example.com"
    [received] = smtp_server.recorder.messages()
    assert received.get_content_type() == "text/plain"
    assert received.get_content().strip() == "12 files."
    assert smtp_server.recorder.envelopes[0].rcpt_tos == ["ops@example.com"]


def test_smtp_4xx_is_retried(store_url: str, smtp_server: SmtpServer) -> None:
    smtp_server.recorder.replies = ["451 4.3.0 Mailbox busy, try again later"]
    record = send(smtp_server.channel(), Message(subject="s", body="b"))
    assert (record.status, record.attempts) == ("delivered", 2)
    assert smtp_server.recorder.data_commands == 2
    assert len(smtp_server.recorder.envelopes) == 1
    assert_one_record_matching(record)


def test_smtp_5xx_fails_at_once(store_url: str, smtp_server: SmtpServer) -> None:
    smtp_server.recorder.replies = ["554 5.7.1 Message rejected as spam"]
    with pytest.raises(NotificationError, match="failed after 1 attempt") as caught:
        send(smtp_server.channel(), Message(subject="s", body="b"))
    record = caught.value.record
    assert (record.status, record.attempts) == ("failed", 1)
    assert record.last_error == "SMTP 554: 5.7.1 Message rejected as spam"
    assert record.delivered_at is None
    assert smtp_server.recorder.data_commands == 1
    assert_one_record_matching(record)


def test_unreachable_smtp_server_fails_after_the_retries(store_url: str) -> None:
    channel = EmailChannel(
        "ops-email",
        host="127.0.0.1",
        port=free_port(),  # nothing listens there
        security="none",
        sender="junction@example.com",
        recipients=["ops@example.com"],
        timeout_s=2,
        retry={"max_attempts": 2, "initial_backoff_s": 0.01, "max_backoff_s": 0.02},
    )
    with pytest.raises(NotificationError) as caught:
        send(channel, Message(subject="s", body="b"), origin="alert:disk-full")
    record = caught.value.record
    assert (record.status, record.attempts, record.origin) == ("failed", 2, "alert:disk-full")
    assert "ConnectionRefusedError" in record.last_error
    assert_one_record_matching(record)


def test_missing_smtp_password_fails_at_once(store_url: str, smtp_server: SmtpServer) -> None:
    channel = smtp_server.channel(
        security="starttls", username="junction", password_env="JUNCTION_TEST_NO_SUCH_VAR"
    )
    with pytest.raises(NotificationError, match="JUNCTION_TEST_NO_SUCH_VAR") as caught:
        send(channel, Message(subject="s", body="b"))
    assert caught.value.record.attempts == 1
    assert smtp_server.recorder.data_commands == 0


def test_email_without_any_recipient_fails_at_once(store_url: str, smtp_server: SmtpServer) -> None:
    with pytest.raises(NotificationError, match="no recipients") as caught:
        send(smtp_server.channel(recipients=[]), Message(subject="s", body="b"))
    assert caught.value.record.attempts == 1


def test_starttls_is_required_when_configured(store_url: str, smtp_server: SmtpServer) -> None:
    # The test server offers no STARTTLS: sending in clear instead would be a silent downgrade.
    with pytest.raises(NotificationError, match="SMTPNotSupportedError") as caught:
        send(smtp_server.channel(security="starttls"), Message(subject="s", body="b"))
    assert caught.value.record.attempts == 1
    assert smtp_server.recorder.data_commands == 0


# --- Webhook ----------------------------------------------------------------------------------------


def test_webhook_is_signed_and_verified_by_the_receiver(
    store_url: str, webhook_receiver: WebhookReceiver, webhook_secret: str
) -> None:
    message = Message(
        subject="Order 7 shipped", body="Carrier: DHL", metadata={"order": 7}, recipients=["erp"]
    )
    record = send(webhook_receiver.channel(headers={"X-Team": "billing"}), message, origin="run:r1")

    assert (record.status, record.attempts, record.kind) == ("delivered", 1, "webhook")
    assert record.response == "HTTP 200: ok"
    # The query string (often a token) is not recorded.
    assert record.recipient == webhook_receiver.url + "/hooks/junction"
    assert_one_record_matching(record)

    [request] = webhook_receiver.requests
    assert request.verified == "ok"
    assert request.path == "/hooks/junction?token=abc"
    assert request.headers["X-Team"] == "billing"
    assert request.headers["X-Junction-Delivery"] == message.id
    assert request.headers["Content-Type"] == "application/json"
    payload = json.loads(request.body)
    assert payload["id"] == message.id
    assert payload["channel"] == "billing-hook"
    assert (payload["subject"], payload["body"], payload["html"]) == ("Order 7 shipped", "Carrier: DHL", None)
    assert (payload["recipients"], payload["metadata"]) == (["erp"], {"order": 7})


def test_a_captured_webhook_cannot_be_replayed_or_altered(
    store_url: str, webhook_receiver: WebhookReceiver, webhook_secret: str
) -> None:
    send(webhook_receiver.channel(), Message(subject="s", body="b"))
    [request] = webhook_receiver.requests
    sent_at = int(request.headers["X-Junction-Timestamp"])

    verify_signature(SECRET, request.headers, request.body, now=sent_at + 299)
    with pytest.raises(WebhookSignatureError, match="timestamp is \\+301 s off"):
        verify_signature(SECRET, request.headers, request.body, now=sent_at + 301)
    with pytest.raises(WebhookSignatureError, match="signature does not match"):
        verify_signature(SECRET, request.headers, request.body.replace(b'"b"', b'"B"'), now=sent_at)
    with pytest.raises(WebhookSignatureError, match="signature does not match"):
        verify_signature("another secret", request.headers, request.body, now=sent_at)
    # A fresh timestamp on the old signature does not help either.
    moved = {**request.headers, "X-Junction-Timestamp": str(sent_at + 600)}
    with pytest.raises(WebhookSignatureError, match="signature does not match"):
        verify_signature(SECRET, moved, request.body, now=sent_at + 600)


@pytest.mark.parametrize("transient_status", [503, 429])
def test_webhook_transient_answers_are_retried_honouring_retry_after(
    store_url: str, webhook_receiver: WebhookReceiver, webhook_secret: str, transient_status: int
) -> None:
    webhook_receiver.script = [(transient_status, {"Retry-After": "0"}, b"busy")] * 2
    # Without Retry-After the backoff would be 5 s + 10 s: the elapsed time shows it was honoured.
    channel = webhook_receiver.channel(retry={"max_attempts": 3, "initial_backoff_s": 5, "max_backoff_s": 10})
    started = time.monotonic()
    record = send(channel, Message(subject="s", body="b"))
    assert time.monotonic() - started < 3

    assert (record.status, record.attempts, record.response) == ("delivered", 3, "HTTP 200: ok")
    assert len(webhook_receiver.requests) == 3
    assert all(request.verified == "ok" for request in webhook_receiver.requests)
    # One message, one delivery id across the retries: the receiver can drop duplicates.
    assert len({request.headers["X-Junction-Delivery"] for request in webhook_receiver.requests}) == 1
    assert_one_record_matching(record)


def test_webhook_4xx_fails_at_once(
    store_url: str, webhook_receiver: WebhookReceiver, webhook_secret: str
) -> None:
    webhook_receiver.script = [(400, {}, b"unknown field 'subject'")]
    with pytest.raises(NotificationError, match="failed after 1 attempt") as caught:
        send(webhook_receiver.channel(), Message(subject="s", body="b"))
    record = caught.value.record
    assert (record.status, record.attempts) == ("failed", 1)
    assert record.last_error == "HTTP 400: unknown field 'subject'"
    assert len(webhook_receiver.requests) == 1
    assert_one_record_matching(record)


def test_webhook_gives_up_when_every_attempt_fails(
    store_url: str, webhook_receiver: WebhookReceiver, webhook_secret: str
) -> None:
    webhook_receiver.script = [(502, {}, b"bad gateway")] * 5
    with pytest.raises(NotificationError, match="failed after 3 attempt"):
        send(webhook_receiver.channel(), Message(subject="s", body="b"))
    assert len(webhook_receiver.requests) == 3
    [row] = stored_deliveries()
    assert (row.status, row.attempts, row.last_error) == ("failed", 3, "HTTP 502: bad gateway")


def test_send_max_attempts_overrides_the_channel_policy(
    store_url: str, webhook_receiver: WebhookReceiver, webhook_secret: str
) -> None:
    webhook_receiver.script = [(503, {}, b"")] * 5
    with pytest.raises(NotificationError) as caught:
        send(webhook_receiver.channel(), Message(subject="s", body="b"), max_attempts=1)
    assert caught.value.record.attempts == 1
    assert caught.value.record.last_error == "HTTP 503"


def test_retry_after_longer_than_the_backoff_cap_gives_up(
    store_url: str, webhook_receiver: WebhookReceiver, webhook_secret: str
) -> None:
    webhook_receiver.script = [(503, {"Retry-After": "120"}, b"maintenance")]
    started = time.monotonic()
    with pytest.raises(NotificationError, match="asked to retry after 120 s") as caught:
        send(webhook_receiver.channel(), Message(subject="s", body="b"))
    assert time.monotonic() - started < 5
    assert caught.value.record.attempts == 1


def test_webhook_without_its_secret_fails_at_once(store_url: str, webhook_receiver: WebhookReceiver) -> None:
    with pytest.raises(NotificationError, match=f"environment variable {SECRET_ENV}") as caught:
        send(webhook_receiver.channel(), Message(subject="s", body="b"))
    assert caught.value.record.attempts == 1
    assert webhook_receiver.requests == []
    assert_one_record_matching(caught.value.record)


def test_unreachable_webhook_is_retried_then_recorded(store_url: str, webhook_secret: str) -> None:
    channel = WebhookChannel(
        "billing-hook", url=f"http://127.0.0.1:{free_port()}/hook", secret_env=SECRET_ENV, retry=FAST_RETRY
    )
    with pytest.raises(NotificationError) as caught:
        send(channel, Message(subject="s", body="b"))
    assert (caught.value.record.attempts, caught.value.record.status) == (3, "failed")
    assert "ConnectError" in caught.value.record.last_error


# --- Signatures -------------------------------------------------------------------------------------


def test_sign_and_verify_round_trip() -> None:
    body = b'{"a":1}'
    signature = sign_payload(SECRET, 1_700_000_000, body)
    assert signature.startswith("v1=") and len(signature) == 3 + 64
    headers = {"x-junction-timestamp": "1700000000", "x-junction-signature": f"v1=deadbeef, {signature}"}
    verify_signature(
        SECRET, headers, body, now=1_700_000_000
    )  # lower-case names; a rotated-out signature first


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing X-Junction-Timestamp or X-Junction-Signature"),
        ({"X-Junction-Timestamp": "yesterday", "X-Junction-Signature": "v1=00"}, "not a Unix timestamp"),
        ({"X-Junction-Timestamp": "1700000400", "X-Junction-Signature": "v1=00"}, "timestamp is -400 s off"),
        ({"X-Junction-Timestamp": "1700000000", "X-Junction-Signature": "v1=00"}, "signature does not match"),
    ],
)
def test_verify_signature_rejects(headers: dict[str, str], reason: str) -> None:
    with pytest.raises(WebhookSignatureError, match=reason):
        verify_signature(SECRET, headers, b"{}", now=1_700_000_000)


# --- channels.yaml ----------------------------------------------------------------------------------


def write_channels(directory: Path, text: str) -> Path:
    path = directory / "resources" / "channels.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_the_shipped_channels_file_declares_the_examples_channels_as_outboxes() -> None:
    channels = load_channels(PROJECT_ROOT / "resources" / "channels.yaml")
    assert set(channels) == {"alerts", "finance", "ops", "sales"}
    assert all(isinstance(channel, OutboxChannel) for channel in channels.values())


def test_channels_file_is_loaded_from_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, junction_home: Path
) -> None:
    path = write_channels(
        tmp_path,
        """
channels:
  ops-email:
    kind: email
    host: smtp.example.com
    port: 465
    security: ssl
    username: junction
    password_env: JUNCTION_SMTP_PASSWORD
    sender: Junction <junction@example.com>
    recipients: [ops@example.com]
  billing-hook:
    kind: webhook
    url: https://billing.example.com/hooks
    secret_env: BILLING_SECRET
    retry: {max_attempts: 6, initial_backoff_s: 2, max_backoff_s: 60}
""",
    )
    monkeypatch.setenv("JUNCTION_CHANNELS_FILE", str(path))
    reset_settings_cache()
    channels = load_channels()
    assert set(channels) == {"ops-email", "billing-hook"}
    email_channel, webhook_channel = channels["ops-email"], channels["billing-hook"]
    assert isinstance(email_channel, EmailChannel) and isinstance(webhook_channel, WebhookChannel)
    assert (email_channel.spec.port, email_channel.spec.security, email_channel.retry.max_attempts) == (
        465,
        "ssl",
        4,
    )
    assert (webhook_channel.retry.max_attempts, webhook_channel.retry.max_backoff_s) == (6, 60)


def test_channels_file_errors_are_reported_in_the_kernel_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_channels(
        tmp_path,
        """
channels:
  ops:
    kind: email
    host: smtp.example.com
    port: five-eight-seven
    sender: junction@example.com
    colour: red
  clear:
    kind: email
    host: smtp.example.com
    security: none
    username: junction
    password_env: SMTP_PASSWORD
    sender: junction@example.com
  hook:
    kind: webhook
    url: ftp://example.com/x
    secret_env: "hunter2 is my password"
  pager:
    kind: pagerduty
  pigeon:
    kind: carrier-pigeon
  bare:
    url: https://example.com
""",
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError) as caught:
        load_channels("resources/channels.yaml")
    lines = str(caught.value).splitlines()
    assert lines[0].startswith("resources/channels.yaml: channels.ops.port: Input should be a valid integer")
    assert lines[1:] == [
        "resources/channels.yaml: channels.ops.colour: unknown field",
        "resources/channels.yaml: channels.clear: a password must not be sent unencrypted: use security starttls or ssl",
        "resources/channels.yaml: channels.hook.url: must be an http:// or https:// URL",
        "resources/channels.yaml: channels.hook.secret_env: must be the NAME of an environment variable "
        "holding the secret, not the secret itself",
        "resources/channels.yaml: channels.pager.routing_key_env: Field required",
        "resources/channels.yaml: channels.pigeon.kind: must be one of: " + KINDS,
        "resources/channels.yaml: channels.bare.kind: missing (one of: " + KINDS + ")",
    ]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("channels: []\n", "channels: Input should be a valid dictionary"),
        ("channel: {}\n", "channel: unknown field"),
        ("channels:\n  'two words': {kind: webhook}\n", "channels: channel name 'two words'"),
        ("channels:\n  ops: [1, 2]\n", "channels.ops: Input should be a valid dictionary"),
        ("channels: {ops: {kind: webhook\n", "line 2 column 1: invalid YAML"),
    ],
)
def test_channels_file_shape_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, problem: str
) -> None:
    write_channels(tmp_path, text)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError, match="^resources/channels.yaml: " + problem.replace("[", "\\[")):
        load_channels("resources/channels.yaml")


def test_a_file_of_comments_only_declares_no_channels(tmp_path: Path) -> None:
    assert load_channels(write_channels(tmp_path, "# nothing yet\n")) == {}


# --- Sending by name, and the Dagster resource ------------------------------------------------------


@pytest.fixture
def channels_file(tmp_path: Path, webhook_receiver: WebhookReceiver, webhook_secret: str) -> Path:
    return write_channels(
        tmp_path,
        f"""
channels:
  billing-hook:
    kind: webhook
    url: {webhook_receiver.url}/hook
    secret_env: {SECRET_ENV}
    retry: {json.dumps(FAST_RETRY)}
""",
    )


def test_send_by_name(store_url: str, channels_file: Path, webhook_receiver: WebhookReceiver) -> None:
    record = send("billing-hook", Message(subject="s", body="b"), channels_file=channels_file)
    assert (record.channel, record.status) == ("billing-hook", "delivered")
    assert len(webhook_receiver.requests) == 1


def test_an_unknown_channel_name_is_recorded_and_raised(store_url: str, channels_file: Path) -> None:
    with pytest.raises(
        NotificationError, match="unknown notification channel 'billing' \\(declared: billing-hook\\)"
    ) as caught:
        send(
            "billing",
            Message(subject="s", body="b", recipients=["x@example.com"]),
            channels_file=channels_file,
        )
    record = caught.value.record
    assert (record.kind, record.status, record.attempts, record.recipient) == (
        "unknown",
        "failed",
        0,
        "x@example.com",
    )
    assert_one_record_matching(record)


def test_notifications_resource_renders_and_sends(
    store_url: str, channels_file: Path, webhook_receiver: WebhookReceiver
) -> None:
    from resources.notifications import NotificationsResource

    resource = NotificationsResource(channels_file=str(channels_file))
    context = {"inputs": {"order": 7, "customer": "<Ada>"}, "run": {"id": "r42"}}
    record = resource.send(
        "billing-hook",
        "Order {{ inputs.order }} for {{ inputs.customer }}",
        "Run {{ run.id }} shipped order {{ inputs.order }}.",
        context,
        html_template="<p>{{ inputs.customer }}</p>",
        origin="run:r42",
    )
    assert (record.status, record.subject, record.origin) == ("delivered", "Order 7 for <Ada>", "run:r42")
    payload = json.loads(webhook_receiver.requests[0].body)
    assert payload["body"] == "Run r42 shipped order 7."
    assert payload["html"] == "<p>&lt;Ada&gt;</p>"


def test_notifications_resource_refuses_a_missing_variable_before_sending(
    store_url: str, channels_file: Path, webhook_receiver: WebhookReceiver
) -> None:
    from resources.notifications import NotificationsResource

    resource = NotificationsResource(channels_file=str(channels_file))
    with pytest.raises(TemplateRenderError, match="undefined variable 'inputs.ordr'"):
        resource.send("billing-hook", "Order {{ inputs.ordr }}", "body", {"inputs": {"order": 7}})
    assert webhook_receiver.requests == []
    assert stored_deliveries() == []


# --- STARTTLS and authentication ---------------------------------------------------------------------


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that is its own CA (the channel trusts it through `ca_file`)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "junction test relay")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, False, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "relay.pem", directory / "relay.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


def test_starttls_and_login_with_the_password_from_the_environment(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ssl

    from aiosmtpd.smtp import AuthResult, LoginPassword

    cert_file, key_file = self_signed_certificate(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert_file, key_file)
    logins: list[tuple[bytes, bytes, bool]] = []

    def authenticator(server, session, envelope, mechanism, auth_data) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        logins.append((auth_data.login, auth_data.password, session.ssl is not None))
        # handled=False: aiosmtpd answers a failure with its own 535 reply.
        return AuthResult(success=auth_data.password == b"relay-password", handled=False)

    recorder = SmtpRecorder()
    controller = Controller(
        recorder,
        hostname="127.0.0.1",
        port=free_port(),
        tls_context=server_tls,
        require_starttls=True,
        auth_required=True,
        authenticator=authenticator,
    )
    controller.start()
    try:
        monkeypatch.setenv("JUNCTION_TEST_SMTP_PASSWORD", "relay-password")
        channel = SmtpServer(controller.port, recorder).channel(
            security="starttls",
            username="junction",
            password_env="JUNCTION_TEST_SMTP_PASSWORD",
            ca_file=str(cert_file),
        )
        record = send(channel, Message(subject="Encrypted", body="over STARTTLS"))
        assert (record.status, record.attempts) == ("delivered", 1)
        assert logins == [(b"junction", b"relay-password", True)]
        assert recorder.messages()[0]["Subject"] == "Encrypted"

        # A wrong password is an SMTP 535: permanent, not retried.
        monkeypatch.setenv("JUNCTION_TEST_SMTP_PASSWORD", "wrong")
        with pytest.raises(NotificationError, match="SMTP 535") as caught:
            send(channel, Message(subject="s", body="b"))
        assert caught.value.record.attempts == 1

        # Without the CA the relay's certificate is not trusted: permanent too.
        untrusting = SmtpServer(controller.port, recorder).channel(
            security="starttls", username="junction", password_env="JUNCTION_TEST_SMTP_PASSWORD"
        )
        with pytest.raises(NotificationError, match="SSLCertVerificationError") as caught:
            send(untrusting, Message(subject="s", body="b"))
        assert caught.value.record.attempts == 1
        assert len(recorder.envelopes) == 1
    finally:
        controller.stop()
