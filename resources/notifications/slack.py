"""Slack (`kind: slack`): an incoming webhook, or a bot token posting with `chat.postMessage`.

Both send Block Kit: a header (the subject), a section (the body, as mrkdwn), the message's facts as
section fields and its links as a context line; `text` carries the subject as the notification's
fallback, as Slack asks. The incoming webhook's URL is itself the secret, so it is named by
environment variable (`webhook_url_env`), as the bot token is (`token_env`).

Answers (api.slack.com/messaging/webhooks, /methods/chat.postMessage): a webhook answers 200 `ok`
or an HTTP error (400 `invalid_payload`, 404 `no_service`, 429 with `Retry-After`); the Web API
answers 200 with `{"ok": false, "error": …}` for most failures, which `check_answer` classifies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from resources.notifications.core import ChannelSpec, EnvVarName, HttpUrl, Message, secret_from_env
from resources.notifications.http import HttpChannel, answer_text

if TYPE_CHECKING:
    import httpx

# Web API errors worth retrying; every other `error` is a configuration problem (a wrong channel, a
# revoked token) that waiting will not fix.
TRANSIENT_ERRORS = frozenset(
    {"ratelimited", "internal_error", "fatal_error", "service_unavailable", "request_timeout"}
)
# Block Kit limits: a header's text and a section's text.
HEADER_LIMIT = 150
SECTION_LIMIT = 3000
SEVERITY_EMOJI = {
    "critical": ":rotating_light:",
    "error": ":red_circle:",
    "warning": ":warning:",
    "info": ":information_source:",
}


class SlackSpec(ChannelSpec):
    kind: Literal["slack"] = "slack"
    webhook_url_env: EnvVarName | None = Field(
        default=None, description="Environment variable holding the incoming webhook's URL."
    )
    token_env: EnvVarName | None = Field(
        default=None, description="Environment variable holding a bot token."
    )
    channel: str | None = Field(default=None, description="With token_env: #name or a channel ID.")
    api_url: HttpUrl = Field(default="https://slack.com/api", description="The Web API's base URL.")
    timeout_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _one_way_to_post(self) -> SlackSpec:
        if (self.webhook_url_env is None) == (self.token_env is None):
            raise ValueError("set exactly one of webhook_url_env (incoming webhook) or token_env (bot token)")
        if self.token_env is not None and not self.channel:
            raise ValueError("a bot token posts to a channel: set channel")
        if self.webhook_url_env is not None and self.channel:
            raise ValueError("an incoming webhook posts to the channel it was created for: remove channel")
        return self


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def blocks(message: Message) -> list[dict[str, Any]]:
    title = message.subject
    if message.resolved:
        title = f"Resolved: {title}"
    found: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _clip(title, HEADER_LIMIT), "emoji": True}}
    ]
    if message.body:
        found.append(
            {"type": "section", "text": {"type": "mrkdwn", "text": _clip(message.body, SECTION_LIMIT)}}
        )
    facts = dict(message.facts)
    if message.severity:
        facts = {"severity": f"{SEVERITY_EMOJI[message.severity]} {message.severity}", **facts}
    # A section holds at most 10 fields.
    items = list(facts.items())
    for start in range(0, len(items), 10):
        found.append(
            {
                "type": "section",
                "fields": [
                    {"type": "mrkdwn", "text": _clip(f"*{label}*\n{value}", 2000)}
                    for label, value in items[start : start + 10]
                ],
            }
        )
    if message.links:
        found.append(
            {
                "type": "context",
                "elements": [
                    {"type": "mrkdwn", "text": " · ".join(f"<{href}|{text}>" for text, href in message.links)}
                ],
            }
        )
    return found


class SlackChannel(HttpChannel):
    kind = "slack"
    Spec = SlackSpec
    spec: SlackSpec

    def recipient(self, message: Message) -> str:
        return self.spec.channel or "slack incoming webhook"

    def payload(self, message: Message) -> dict[str, Any]:
        payload: dict[str, Any] = {"text": message.subject, "blocks": blocks(message)}
        if self.spec.channel:
            payload["channel"] = self.spec.channel
        return payload

    def deliver(self, message: Message) -> str:
        if self.spec.webhook_url_env is not None:
            url = secret_from_env(self.spec.webhook_url_env)
            return answer_text(self.post(url, json=self.payload(message)))
        token = secret_from_env(self.spec.token_env or "")
        response = self.post(
            f"{self.spec.api_url.rstrip('/')}/chat.postMessage",
            json=self.payload(message),
            headers={"Authorization": f"Bearer {token}"},
        )
        answer = response.json()
        return f"posted to {answer.get('channel', self.spec.channel)} at ts {answer.get('ts')}"

    def check_answer(self, response: httpx.Response) -> None:
        super().check_answer(response)
        if self.spec.token_env is None:
            return
        try:
            answer = response.json()
        except ValueError:
            self.fail(f"{answer_text(response)} (not the Web API's JSON)", transient=True)
        if not answer.get("ok"):
            error = str(answer.get("error", "unknown error"))
            self.fail(f"chat.postMessage: {error}", transient=error in TRANSIENT_ERRORS)
