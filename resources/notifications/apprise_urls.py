"""Any service Apprise speaks (`kind: apprise`): Telegram, Discord, Matrix, Mattermost, ntfy, Pushover,
Signal, Vonage and more than a hundred others, each by an Apprise URL (`tgram://token/chat`).

Apprise is the transport here and only here. Its Slack, Teams, Twilio and PagerDuty plugins post to
fixed hosts and answer a send with a bool, so Junction's own classes serve those four: they keep the
receiver's status, body and `Retry-After` for the retry layer and the delivery record, and take an
`api_url` (a Twilio-compatible provider, PagerDuty's EU region, a local receiver in tests). An
Apprise URL carries its service's token, so it is a secret named by environment variable (`url_env`).

Apprise reports a failed send as `False` and its reason in its log: the log is captured into the
failure, which is treated as transient (Apprise does not say which failures would repeat).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from resources.notifications.core import (
    ChannelSpec,
    DeliveryFailure,
    EnvVarName,
    Message,
    NotificationChannel,
    secret_from_env,
)

NOTIFY_TYPE = {"critical": "failure", "error": "failure", "warning": "warning", "info": "info"}


class AppriseSpec(ChannelSpec):
    kind: Literal["apprise"] = "apprise"
    url_env: EnvVarName = Field(
        description="Environment variable holding the Apprise URL (one or several, space-separated)."
    )


class AppriseChannel(NotificationChannel):
    kind = "apprise"
    Spec = AppriseSpec
    spec: AppriseSpec

    def recipient(self, message: Message) -> str:
        return f"apprise ({self.spec.url_env})"

    def deliver(self, message: Message) -> str:
        import apprise  # ~70 ms: only a process that sends through Apprise pays it

        urls = secret_from_env(self.spec.url_env).split()
        notifier = apprise.Apprise()
        for url in urls:
            if not notifier.add(url):
                # Never echo the URL: it holds the service's token.
                schema = url.partition("://")[0]
                raise DeliveryFailure(
                    f"Apprise does not understand a {schema}:// URL in {self.spec.url_env}", transient=False
                )
        notify_type = "success" if message.resolved else NOTIFY_TYPE.get(message.severity or "", "info")
        title = f"Resolved: {message.subject}" if message.resolved else message.subject
        with apprise.LogCapture(level=apprise.logging.WARNING) as log:
            delivered = notifier.notify(title=title, body=message.body or title, notify_type=notify_type)
        if not delivered:
            reason = " ".join(log.getvalue().split())[-500:] or "Apprise reported a failed send"
            raise DeliveryFailure(f"Apprise: {reason}", transient=True)
        return f"sent through Apprise to {len(urls)} service(s)"
