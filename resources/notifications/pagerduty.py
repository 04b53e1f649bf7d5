"""PagerDuty (`kind: pagerduty`): the Events API v2, trigger and resolve under one `dedup_key`.

`POST {api_url}/v2/enqueue` with the integration's routing key (developer.pagerduty.com: Events API
v2 overview): `event_action` `trigger` for a firing message and `resolve` for a resolved one, so an
alert's resolve notification closes the incident its trigger opened; the `dedup_key` is the
message's `group_key` (an alert group's fingerprint) or, without one, the message id. PagerDuty
answers 202 `{"status": "success", "dedup_key": …}`, 400 for an invalid event, 429 when throttled.
The EU service region is `api_url: https://events.eu.pagerduty.com`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import Field, model_validator

from resources.notifications.core import ChannelSpec, EnvVarName, HttpUrl, Message, Severity, secret_from_env
from resources.notifications.http import HttpChannel

SUMMARY_LIMIT = 1024


class PagerDutySpec(ChannelSpec):
    kind: Literal["pagerduty"] = "pagerduty"
    routing_key_env: EnvVarName = Field(
        description="Environment variable holding the integration (routing) key."
    )
    api_url: HttpUrl = Field(default="https://events.pagerduty.com", description="Events API base URL.")
    source: str = Field(
        default="junction", min_length=1, description="The event's source (a host or service)."
    )
    severity: Severity = Field(default="error", description="For messages that carry no severity.")
    timeout_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _no_digest(self) -> PagerDutySpec:
        if self.digest is not None or self.throttle is not None:
            raise ValueError(
                "PagerDuty groups events by dedup_key itself: a digest or throttle would merge unrelated "
                "incidents and hold back resolves (use the alert rule's group_interval instead)"
            )
        return self


class PagerDutyChannel(HttpChannel):
    kind = "pagerduty"
    Spec = PagerDutySpec
    spec: PagerDutySpec

    def recipient(self, message: Message) -> str:
        return f"pagerduty {self.spec.api_url}"

    def dedup_key(self, message: Message) -> str:
        return (message.group_key or message.id)[:255]

    def event(self, message: Message, routing_key: str) -> dict[str, Any]:
        event: dict[str, Any] = {
            "routing_key": routing_key,
            "event_action": "resolve" if message.resolved else "trigger",
            "dedup_key": self.dedup_key(message),
        }
        if message.resolved:
            return event  # a resolve needs only the key
        event["payload"] = {
            "summary": message.subject[:SUMMARY_LIMIT],
            "source": self.spec.source,
            "severity": message.severity or self.spec.severity,
            "timestamp": datetime.now(UTC).isoformat(),
            "custom_details": {"body": message.body, **message.facts},
        }
        event["client"] = "Junction"
        if message.links:
            event["links"] = [{"href": href, "text": text} for text, href in message.links]
        return event

    def deliver(self, message: Message) -> str:
        routing_key = secret_from_env(self.spec.routing_key_env)
        response = self.post(
            f"{self.spec.api_url.rstrip('/')}/v2/enqueue", json=self.event(message, routing_key)
        )
        answer = response.json()
        return f"{self.event(message, '')['event_action']} accepted for dedup_key {answer.get('dedup_key')}"
