"""Microsoft Teams (`kind: teams`): a Workflows (Power Automate) webhook posting an Adaptive Card.

The Office 365 connectors' "incoming webhook" is retired; Teams' Workflows app gives a webhook URL
(the "When a Teams webhook request is received" trigger) that takes a message whose attachment is an
Adaptive Card (learn.microsoft.com: "Create incoming webhooks with Workflows"). The URL carries its
own signature (`sig=`), so it is a secret named by environment variable. The service answers 202.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from resources.notifications.core import ChannelSpec, EnvVarName, Message, secret_from_env
from resources.notifications.http import HttpChannel, answer_text

CARD_CONTENT_TYPE = "application/vnd.microsoft.card.adaptive"
CARD_SCHEMA = "http://adaptivecards.io/schemas/adaptive-card.json"
CARD_VERSION = "1.4"
SEVERITY_COLOR = {"critical": "Attention", "error": "Attention", "warning": "Warning", "info": "Accent"}


class TeamsSpec(ChannelSpec):
    kind: Literal["teams"] = "teams"
    webhook_url_env: EnvVarName = Field(
        description="Environment variable holding the Workflows webhook's URL."
    )
    timeout_s: float = Field(default=10.0, gt=0)


def adaptive_card(message: Message) -> dict[str, Any]:
    title = f"Resolved: {message.subject}" if message.resolved else message.subject
    body: list[dict[str, Any]] = [
        {
            "type": "TextBlock",
            "text": title,
            "size": "Medium",
            "weight": "Bolder",
            "wrap": True,
            "color": "Good" if message.resolved else SEVERITY_COLOR.get(message.severity or "", "Default"),
        }
    ]
    if message.body:
        body.append({"type": "TextBlock", "text": message.body, "wrap": True})
    facts = dict(message.facts)
    if message.severity:
        facts = {"severity": message.severity, **facts}
    if facts:
        body.append(
            {"type": "FactSet", "facts": [{"title": label, "value": value} for label, value in facts.items()]}
        )
    card: dict[str, Any] = {
        "$schema": CARD_SCHEMA,
        "type": "AdaptiveCard",
        "version": CARD_VERSION,
        "body": body,
    }
    if message.links:
        card["actions"] = [
            {"type": "Action.OpenUrl", "title": text, "url": href} for text, href in message.links
        ]
    return card


class TeamsChannel(HttpChannel):
    kind = "teams"
    Spec = TeamsSpec
    spec: TeamsSpec

    def recipient(self, message: Message) -> str:
        return "teams workflows webhook"

    def payload(self, message: Message) -> dict[str, Any]:
        return {
            "type": "message",
            "attachments": [
                {"contentType": CARD_CONTENT_TYPE, "contentUrl": None, "content": adaptive_card(message)}
            ],
        }

    def deliver(self, message: Message) -> str:
        url = secret_from_env(self.spec.webhook_url_env)
        return answer_text(self.post(url, json=self.payload(message)))
