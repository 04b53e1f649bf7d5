"""Notifications: send a rendered message to a named channel, with retries and a delivery record.

Channels are declared by name in `channels.yaml` (`settings.channels_file`); secrets are referenced
there by environment-variable name and read at send time. One module per kind of channel (`smtp`,
`webhook`, `outbox`, `slack`, `teams`, `sms`, `pagerduty`, `apprise_urls`) over one interface
(`core`); `delivery` sends with retries, records and dedupe claims; `held` throttles channels and
groups messages into digests.

Module-level imports are kept light (no Dagster, no SQLAlchemy models, no httpx — imported by the
HTTP channels when they send, not by every run worker loading the code location): the gateway and
the CLI use `send()` too. `NotificationsResource`, the Dagster resource, is imported on first access.
"""

from __future__ import annotations

from typing import Any

# Importing a channel module registers its kind: every kind is known once the package is imported.
from resources.notifications import apprise_urls, outbox, pagerduty, slack, sms, smtp, teams, webhook
from resources.notifications.channels_file import load_channels
from resources.notifications.core import (
    DeliveryFailure,
    DeliveryRecord,
    Message,
    NotificationChannel,
    NotificationError,
    RetryPolicy,
    retry_after_seconds,
)
from resources.notifications.delivery import send
from resources.notifications.outbox import OutboxChannel
from resources.notifications.pagerduty import PagerDutyChannel
from resources.notifications.signing import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookSignatureError,
    sign_payload,
    verify_signature,
)
from resources.notifications.slack import SlackChannel
from resources.notifications.sms import SmsChannel
from resources.notifications.smtp import EmailChannel
from resources.notifications.teams import TeamsChannel
from resources.notifications.webhook import WebhookChannel

__all__ = [
    "DELIVERY_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "DeliveryFailure",
    "DeliveryRecord",
    "EmailChannel",
    "Message",
    "NotificationChannel",
    "NotificationError",
    "OutboxChannel",
    "PagerDutyChannel",
    "RetryPolicy",
    "SlackChannel",
    "SmsChannel",
    "TeamsChannel",
    "WebhookChannel",
    "WebhookSignatureError",
    "apprise_urls",
    "load_channels",
    "outbox",
    "pagerduty",
    "retry_after_seconds",
    "send",
    "sign_payload",
    "slack",
    "sms",
    "smtp",
    "teams",
    "verify_signature",
    "webhook",
]


def __getattr__(name: str) -> Any:
    if name == "NotificationsResource":
        from resources.notifications.resource import NotificationsResource

        return NotificationsResource
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
