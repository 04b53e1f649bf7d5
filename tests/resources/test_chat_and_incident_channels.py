"""Slack, Teams, SMS (Twilio-compatible), PagerDuty and Apprise channels against one local receiver
that checks each request the way the real service documents it, and answers as that service does.

No network: every channel takes its service's URL (`api_url`, or a webhook URL in an env var), and
the Apprise channel speaks Apprise's `json://` to the receiver. Delivery records go to the platform
store on both backends (`store_url`).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from support import ServedApp

from orchestration.kernel.spec_errors import SpecError
from resources.notifications import (
    Message,
    NotificationError,
    PagerDutyChannel,
    SlackChannel,
    SmsChannel,
    TeamsChannel,
    send,
)
from resources.notifications.apprise_urls import AppriseChannel

FAST_RETRY = {"max_attempts": 3, "initial_backoff_s": 0.01, "max_backoff_s": 0.5}
ROUTING_KEY = "R0UT1NGKEY0123456789abcdef012345"  # integration keys are 32 characters
TWILIO_SID = "AC" + "0" * 32
TWILIO_TOKEN = "twilio-auth-token"
SLACK_TOKEN = "xoxb-test-token"
BLOCK_TYPES = {"header", "section", "context", "divider", "actions", "image"}
PAGERDUTY_SEVERITIES = {"critical", "error", "warning", "info"}


@dataclass
class Received:
    service: str
    headers: dict[str, str]
    body: Any


@dataclass
class Receiver:
    """One app for every service; `script[service]` answers in order, then the service's success."""

    served: ServedApp | None = None
    requests: list[Received] = field(default_factory=list)
    script: dict[str, list[Response]] = field(default_factory=dict)

    def url(self, path: str) -> str:
        assert self.served is not None
        return self.served.url(path)

    def of(self, service: str) -> list[Received]:
        return [request for request in self.requests if request.service == service]

    def answer(self, service: str, success: Response) -> Response:
        queued = self.script.get(service)
        return queued.pop(0) if queued else success


def problem(status: int, text: str) -> PlainTextResponse:
    return PlainTextResponse(text, status_code=status)


def build_receiver(receiver: Receiver) -> Starlette:
    async def slack_webhook(request: Request) -> Response:
        # api.slack.com/messaging/webhooks: JSON with text and/or blocks; errors are plain-text codes.
        body = await request.json()
        receiver.requests.append(Received("slack-webhook", dict(request.headers), body))
        if request.headers.get("content-type", "").split(";")[0] != "application/json":
            return problem(400, "invalid_payload")
        if not isinstance(body.get("text"), str) or not isinstance(body.get("blocks"), list):
            return problem(400, "invalid_payload")
        for block in body["blocks"]:
            if block.get("type") not in BLOCK_TYPES:
                return problem(400, "invalid_blocks")
            if block["type"] == "header" and (
                block["text"]["type"] != "plain_text" or len(block["text"]["text"]) > 150
            ):
                return problem(400, "invalid_blocks")
            if len(block.get("fields", [])) > 10:
                return problem(400, "invalid_blocks")
        if "channel" in body:
            return problem(400, "invalid_payload")
        return receiver.answer("slack-webhook", PlainTextResponse("ok"))

    async def slack_post_message(request: Request) -> Response:
        # api.slack.com/methods/chat.postMessage: bearer token; 200 with ok true or false.
        body = await request.json()
        receiver.requests.append(Received("slack-api", dict(request.headers), body))
        if request.headers.get("authorization") != f"Bearer {SLACK_TOKEN}":
            return JSONResponse({"ok": False, "error": "invalid_auth"})
        if not body.get("channel"):
            return JSONResponse({"ok": False, "error": "channel_not_found"})
        if not body.get("text") and not body.get("blocks"):
            return JSONResponse({"ok": False, "error": "no_text"})
        return receiver.answer(
            "slack-api", JSONResponse({"ok": True, "channel": "C024BE91L", "ts": "1.000200"})
        )

    async def teams_workflow(request: Request) -> Response:
        # Teams Workflows webhook: a message whose attachment is an Adaptive Card; 202 Accepted.
        body = await request.json()
        receiver.requests.append(Received("teams", dict(request.headers), body))
        attachments = body.get("attachments") or []
        if body.get("type") != "message" or len(attachments) != 1:
            return problem(400, "BadRequest: the body is not a message with one attachment")
        attachment = attachments[0]
        card = attachment.get("content") or {}
        if (
            attachment.get("contentType") != "application/vnd.microsoft.card.adaptive"
            or card.get("type") != "AdaptiveCard"
            or not card.get("version")
            or not isinstance(card.get("body"), list)
        ):
            return problem(400, "BadRequest: not an Adaptive Card")
        return receiver.answer("teams", Response(status_code=202))

    async def twilio_messages(request: Request) -> Response:
        # twilio.com/docs/messaging/api/message-resource: form-encoded, basic auth; 201 with a sid.
        raw = (await request.body()).decode()
        form = {name: values[0] for name, values in parse_qs(raw).items()}
        receiver.requests.append(Received("twilio", dict(request.headers), form))
        expected = "Basic " + base64.b64encode(f"{TWILIO_SID}:{TWILIO_TOKEN}".encode()).decode()
        if request.headers.get("authorization") != expected or request.path_params["sid"] != TWILIO_SID:
            return JSONResponse({"code": 20003, "message": "Authenticate", "status": 401}, status_code=401)
        if (
            not form.get("To")
            or not form.get("Body")
            or not (form.get("From") or form.get("MessagingServiceSid"))
        ):
            return JSONResponse(
                {"code": 21604, "message": "A required parameter is missing", "status": 400}, 400
            )
        if len(form["Body"]) > 1600:
            return JSONResponse(
                {"code": 21617, "message": "The body exceeds 1600 characters", "status": 400}, 400
            )
        number = len(receiver.of("twilio"))
        success = JSONResponse(
            {"sid": f"SM{number:032d}", "status": "queued", "to": form["To"]}, status_code=201
        )
        return receiver.answer(f"twilio:{form['To']}", success)

    async def pagerduty_enqueue(request: Request) -> Response:
        # developer.pagerduty.com Events API v2: 202 on success, 400 with errors for an invalid event.
        body = await request.json()
        receiver.requests.append(Received("pagerduty", dict(request.headers), body))
        errors = []
        if len(body.get("routing_key", "")) != 32:
            errors.append("'routing_key' must be 32 characters")
        if body.get("event_action") not in ("trigger", "acknowledge", "resolve"):
            errors.append("'event_action' is invalid")
        if not body.get("dedup_key") and body.get("event_action") != "trigger":
            errors.append("'dedup_key' is required to acknowledge or resolve")
        if body.get("event_action") == "trigger":
            payload = body.get("payload") or {}
            if not payload.get("summary") or len(payload["summary"]) > 1024:
                errors.append("'payload.summary' is missing or too long")
            if not payload.get("source"):
                errors.append("'payload.source' is missing")
            if payload.get("severity") not in PAGERDUTY_SEVERITIES:
                errors.append("'payload.severity' is invalid")
        if errors:
            return JSONResponse(
                {"status": "invalid event", "message": "Event object is invalid", "errors": errors}, 400
            )
        success = JSONResponse(
            {"status": "success", "message": "Event processed", "dedup_key": body.get("dedup_key")},
            status_code=202,
        )
        return receiver.answer("pagerduty", success)

    async def apprise_json(request: Request) -> Response:
        body = await request.json()
        receiver.requests.append(Received("apprise", dict(request.headers), body))
        return receiver.answer("apprise", JSONResponse({"received": True}))

    return Starlette(
        routes=[
            Route("/slack/hooks/{token:path}", slack_webhook, methods=["POST"]),
            Route("/slack/api/chat.postMessage", slack_post_message, methods=["POST"]),
            Route("/teams/workflows/{flow}", teams_workflow, methods=["POST"]),
            Route("/twilio/2010-04-01/Accounts/{sid}/Messages.json", twilio_messages, methods=["POST"]),
            Route("/pagerduty/v2/enqueue", pagerduty_enqueue, methods=["POST"]),
            Route("/apprise/notify", apprise_json, methods=["POST"]),
        ]
    )


@pytest.fixture(scope="module")
def served_receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    receiver.served = ServedApp(build_receiver(receiver))
    yield receiver
    receiver.served.stop()


@pytest.fixture
def receiver(served_receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> Receiver:
    served_receiver.requests.clear()
    served_receiver.script.clear()
    monkeypatch.setenv("SLACK_WEBHOOK_URL", served_receiver.url("/slack/hooks/T000/B000/XXXX"))
    monkeypatch.setenv("SLACK_BOT_TOKEN", SLACK_TOKEN)
    monkeypatch.setenv(
        "TEAMS_WEBHOOK_URL", served_receiver.url("/teams/workflows/abc?api-version=1&sig=s3cret")
    )
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", TWILIO_TOKEN)
    monkeypatch.setenv("PAGERDUTY_ROUTING_KEY", ROUTING_KEY)
    return served_receiver


ALERT = Message(
    subject="flights quality score 0.71 is below 0.9",
    body="The last run of *flights* scored 0.71.",
    severity="warning",
    facts={"pipeline": "flights", "score": "0.71"},
    links=(("Run in Dagster", "http://127.0.0.1:3000/runs/abc"),),
    group_key="fingerprint-1234",
)


def slow(status: int, retry_after: str | None = None, body: str = "") -> Response:
    headers = {"Retry-After": retry_after} if retry_after else {}
    return PlainTextResponse(body, status_code=status, headers=headers)


# --- Slack --------------------------------------------------------------------------------------------


def test_slack_incoming_webhook_posts_blocks(store_url: str, receiver: Receiver) -> None:
    channel = SlackChannel("chat", webhook_url_env="SLACK_WEBHOOK_URL", retry=FAST_RETRY)
    record = send(channel, ALERT)
    assert (record.status, record.attempts, record.response) == ("delivered", 1, "HTTP 200: ok")
    (request,) = receiver.of("slack-webhook")
    body = request.body
    assert body["text"] == ALERT.subject
    header, section, fields, context = body["blocks"]
    assert header == {"type": "header", "text": {"type": "plain_text", "text": ALERT.subject, "emoji": True}}
    assert section["text"] == {"type": "mrkdwn", "text": ALERT.body}
    assert [item["text"] for item in fields["fields"]] == [
        "*severity*\n:warning: warning",
        "*pipeline*\nflights",
        "*score*\n0.71",
    ]
    assert context["elements"][0]["text"] == "<http://127.0.0.1:3000/runs/abc|Run in Dagster>"
    # The webhook URL is the secret: the record names the channel's way, not the URL.
    assert "hooks" not in record.recipient


def test_slack_webhook_429_waits_for_retry_after(store_url: str, receiver: Receiver) -> None:
    receiver.script["slack-webhook"] = [slow(429, "0", "rate_limited"), slow(500, body="rollup_error")]
    record = send(SlackChannel("chat", webhook_url_env="SLACK_WEBHOOK_URL", retry=FAST_RETRY), ALERT)
    assert (record.status, record.attempts) == ("delivered", 3)


def test_slack_webhook_4xx_fails_at_once(store_url: str, receiver: Receiver) -> None:
    receiver.script["slack-webhook"] = [slow(404, body="no_service")]
    with pytest.raises(NotificationError) as caught:
        send(SlackChannel("chat", webhook_url_env="SLACK_WEBHOOK_URL", retry=FAST_RETRY), ALERT)
    assert caught.value.record is not None
    assert (caught.value.record.attempts, caught.value.record.last_error) == (1, "HTTP 404: no_service")


def test_slack_bot_token_posts_to_its_channel(store_url: str, receiver: Receiver) -> None:
    channel = SlackChannel(
        "chat",
        token_env="SLACK_BOT_TOKEN",
        channel="#ops",
        api_url=receiver.url("/slack/api"),
        retry=FAST_RETRY,
    )
    record = send(channel, ALERT)
    assert record.response == "posted to C024BE91L at ts 1.000200"
    (request,) = receiver.of("slack-api")
    assert request.headers["authorization"] == f"Bearer {SLACK_TOKEN}"
    assert request.body["channel"] == "#ops"
    assert request.body["blocks"][0]["type"] == "header"


def test_slack_api_errors_in_a_200_answer_are_classified(store_url: str, receiver: Receiver) -> None:
    channel = SlackChannel(
        "chat",
        token_env="SLACK_BOT_TOKEN",
        channel="#ops",
        api_url=receiver.url("/slack/api"),
        retry=FAST_RETRY,
    )
    receiver.script["slack-api"] = [JSONResponse({"ok": False, "error": "ratelimited"})]
    assert send(channel, ALERT).attempts == 2  # ratelimited: retried
    receiver.script["slack-api"] = [JSONResponse({"ok": False, "error": "channel_not_found"})]
    with pytest.raises(NotificationError, match="chat.postMessage: channel_not_found") as caught:
        send(channel, ALERT)
    assert caught.value.record is not None and caught.value.record.attempts == 1  # permanent


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"webhook_url_env": "A", "token_env": "B", "channel": "#x"}, "set exactly one of webhook_url_env"),
        ({}, "set exactly one of webhook_url_env"),
        ({"token_env": "B"}, "a bot token posts to a channel"),
        ({"webhook_url_env": "A", "channel": "#x"}, "remove channel"),
        ({"webhook_url_env": "https://hooks.slack.com/services/T/B/X"}, "must be the NAME of an environment"),
    ],
)
def test_slack_declaration_errors(config: dict[str, str], reason: str) -> None:
    with pytest.raises(SpecError, match=reason):
        SlackChannel("chat", **config)


# --- Teams --------------------------------------------------------------------------------------------


def test_teams_workflows_webhook_receives_an_adaptive_card(store_url: str, receiver: Receiver) -> None:
    record = send(TeamsChannel("teams", webhook_url_env="TEAMS_WEBHOOK_URL", retry=FAST_RETRY), ALERT)
    assert record.response == "HTTP 202"
    (request,) = receiver.of("teams")
    card = request.body["attachments"][0]["content"]
    title, text, facts = card["body"]
    assert (title["text"], title["weight"], title["color"]) == (ALERT.subject, "Bolder", "Warning")
    assert text["text"] == ALERT.body
    assert facts["facts"] == [
        {"title": "severity", "value": "warning"},
        {"title": "pipeline", "value": "flights"},
        {"title": "score", "value": "0.71"},
    ]
    assert card["actions"] == [
        {"type": "Action.OpenUrl", "title": "Run in Dagster", "url": ALERT.links[0][1]}
    ]
    assert "sig=" not in record.recipient


def test_teams_5xx_is_retried(store_url: str, receiver: Receiver) -> None:
    receiver.script["teams"] = [slow(502), slow(503, "0")]
    record = send(TeamsChannel("teams", webhook_url_env="TEAMS_WEBHOOK_URL", retry=FAST_RETRY), ALERT)
    assert (record.status, record.attempts) == ("delivered", 3)


def test_a_resolved_message_says_so(store_url: str, receiver: Receiver) -> None:
    resolved = Message(
        subject="flights quality score", body="Back to 0.97.", resolved=True, severity="warning"
    )
    send(TeamsChannel("teams", webhook_url_env="TEAMS_WEBHOOK_URL", retry=FAST_RETRY), resolved)
    title = receiver.of("teams")[0].body["attachments"][0]["content"]["body"][0]
    assert (title["text"], title["color"]) == ("Resolved: flights quality score", "Good")


# --- SMS ----------------------------------------------------------------------------------------------


def sms_channel(receiver: Receiver, **overrides: Any) -> SmsChannel:
    config = {
        "api_url": receiver.url("/twilio"),
        "account_sid": TWILIO_SID,
        "auth_token_env": "TWILIO_AUTH_TOKEN",
        "sender": "+15005550006",
        "recipients": ["+14155550100", "+14155550101"],
        "retry": FAST_RETRY,
    }
    return SmsChannel("oncall-sms", **{**config, **overrides})


def test_sms_goes_to_every_recipient_with_basic_auth(store_url: str, receiver: Receiver) -> None:
    record = send(sms_channel(receiver), ALERT)
    assert record.status == "delivered"
    assert record.response.startswith("queued for 2 recipient(s): SM")
    forms = [request.body for request in receiver.of("twilio")]
    assert [form["To"] for form in forms] == ["+14155550100", "+14155550101"]
    assert forms[0]["From"] == "+15005550006"
    assert forms[0]["Body"] == f"{ALERT.subject}\n{ALERT.body}"


def test_sms_retry_reaches_only_the_recipients_not_yet_reached(store_url: str, receiver: Receiver) -> None:
    receiver.script["twilio:+14155550101"] = [slow(503)]
    record = send(sms_channel(receiver), ALERT)
    assert (record.status, record.attempts) == ("delivered", 2)
    assert [request.body["To"] for request in receiver.of("twilio")] == [
        "+14155550100",
        "+14155550101",  # 503
        "+14155550101",  # the retry: the first number is not texted twice
    ]


def test_sms_long_text_is_cut_and_a_messaging_service_may_send(store_url: str, receiver: Receiver) -> None:
    long = Message(subject="s", body="x" * 5000)
    send(sms_channel(receiver, sender=None, messaging_service_sid="MG123", max_length=160), long)
    form = receiver.of("twilio")[0].body
    assert (len(form["Body"]), form["Body"][-1], form["MessagingServiceSid"]) == (160, "…", "MG123")
    assert "From" not in form


def test_sms_wrong_credentials_fail_at_once(store_url: str, receiver: Receiver, monkeypatch) -> None:
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "wrong")
    with pytest.raises(NotificationError, match="HTTP 401") as caught:
        send(sms_channel(receiver), ALERT)
    assert caught.value.record is not None and caught.value.record.attempts == 1


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"recipients": ["0415 555 0100"]}, "is not an E.164 phone number"),
        ({"sender": None}, "set exactly one of sender"),
        ({"messaging_service_sid": "MG1"}, "set exactly one of sender"),
        ({"auth_token_env": "not a name"}, "must be the NAME"),
    ],
)
def test_sms_declaration_errors(served_receiver: Receiver, overrides: dict[str, Any], reason: str) -> None:
    with pytest.raises(SpecError, match=reason):
        sms_channel(served_receiver, **overrides)


# --- PagerDuty ----------------------------------------------------------------------------------------


def pagerduty(receiver: Receiver) -> PagerDutyChannel:
    return PagerDutyChannel(
        "pager", routing_key_env="PAGERDUTY_ROUTING_KEY", api_url=receiver.url("/pagerduty"), retry=FAST_RETRY
    )


def test_pagerduty_trigger_then_resolve_share_the_dedup_key(store_url: str, receiver: Receiver) -> None:
    channel = pagerduty(receiver)
    trigger = send(channel, ALERT)
    resolve = send(channel, Message(subject=ALERT.subject, body="", resolved=True, group_key=ALERT.group_key))
    assert trigger.response == "trigger accepted for dedup_key fingerprint-1234"
    assert resolve.response == "resolve accepted for dedup_key fingerprint-1234"
    first, second = (request.body for request in receiver.of("pagerduty"))
    assert first["event_action"] == "trigger"
    assert first["payload"]["severity"] == "warning"
    assert first["payload"]["custom_details"] == {"body": ALERT.body, "pipeline": "flights", "score": "0.71"}
    assert first["links"] == [{"href": ALERT.links[0][1], "text": "Run in Dagster"}]
    assert second == {"routing_key": ROUTING_KEY, "event_action": "resolve", "dedup_key": "fingerprint-1234"}


def test_pagerduty_invalid_event_fails_at_once_and_throttling_is_retried(
    store_url: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver.script["pagerduty"] = [JSONResponse({"status": "throttled"}, status_code=429)]
    assert send(pagerduty(receiver), ALERT).attempts == 2
    monkeypatch.setenv("PAGERDUTY_ROUTING_KEY", "short")
    with pytest.raises(NotificationError, match="routing_key' must be 32 characters") as caught:
        send(pagerduty(receiver), ALERT)
    assert caught.value.record is not None and caught.value.record.attempts == 1


def test_pagerduty_refuses_a_digest() -> None:
    with pytest.raises(SpecError, match="PagerDuty groups events by dedup_key itself"):
        PagerDutyChannel("pager", routing_key_env="K", digest={"interval": "10m"})


# --- Apprise ------------------------------------------------------------------------------------------


def test_apprise_sends_through_its_url(store_url: str, receiver: Receiver, monkeypatch) -> None:
    monkeypatch.setenv("APPRISE_URL", receiver.url("/apprise/notify").replace("http://", "json://"))
    record = send(AppriseChannel("elsewhere", url_env="APPRISE_URL", retry=FAST_RETRY), ALERT)
    assert (record.status, record.response) == ("delivered", "sent through Apprise to 1 service(s)")
    (request,) = receiver.of("apprise")
    assert (request.body["title"], request.body["message"], request.body["type"]) == (
        ALERT.subject,
        ALERT.body,
        "warning",
    )


def test_apprise_failures_are_recorded_with_apprise_s_reason(
    store_url: str, receiver: Receiver, monkeypatch
) -> None:
    monkeypatch.setenv("APPRISE_URL", receiver.url("/apprise/notify").replace("http://", "json://"))
    receiver.script["apprise"] = [slow(500)] * 3
    with pytest.raises(NotificationError) as caught:
        send(AppriseChannel("elsewhere", url_env="APPRISE_URL", retry=FAST_RETRY), ALERT)
    record = caught.value.record
    assert record is not None and (record.status, record.attempts) == ("failed", 3)
    assert record.last_error.startswith("Apprise: ") and "500" in record.last_error
    monkeypatch.setenv("APPRISE_URL", "nosuchservice://token@x")
    with pytest.raises(
        NotificationError, match="Apprise does not understand a nosuchservice:// URL"
    ) as caught:
        send(AppriseChannel("elsewhere", url_env="APPRISE_URL", retry=FAST_RETRY), ALERT)
    assert "token" not in (caught.value.record.last_error or "")


def test_the_webhook_channel_carries_the_alert_fields() -> None:
    """The generic webhook passes what chat channels render, so a receiver can do the same."""
    from resources.notifications import WebhookChannel

    payload = WebhookChannel("hook", url="http://127.0.0.1:1/x", secret_env="S").payload(ALERT)
    assert json.loads(json.dumps(payload))["facts"] == {"pipeline": "flights", "score": "0.71"}
    assert (payload["severity"], payload["group_key"], payload["resolved"]) == (
        "warning",
        "fingerprint-1234",
        False,
    )
