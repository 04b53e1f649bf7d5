"""A signed JSON POST to any HTTP endpoint (`kind: webhook`); receivers use `verify_signature()`."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import Field, field_validator

from resources.notifications.core import (
    ChannelSpec,
    EnvVarName,
    HttpUrl,
    Message,
    secret_from_env,
)
from resources.notifications.http import HttpChannel, answer_text, shown_url
from resources.notifications.signing import DELIVERY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign_payload


class WebhookSpec(ChannelSpec):
    kind: Literal["webhook"] = "webhook"
    url: HttpUrl
    secret_env: EnvVarName = Field(description="Environment variable holding the HMAC signing secret.")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra headers (not secrets).")
    timeout_s: float = Field(default=10.0, gt=0)

    @field_validator("headers")
    @classmethod
    def _signature_headers_are_reserved(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if name.lower().startswith("x-junction-") or name.lower() == "content-type":
                raise ValueError(f"header {name!r} is set by Junction")
        return value


class WebhookChannel(HttpChannel):
    """A JSON POST, signed (see `signing`), to any HTTP endpoint."""

    kind = "webhook"
    Spec = WebhookSpec
    spec: WebhookSpec

    def recipient(self, message: Message) -> str:
        return shown_url(self.spec.url)

    def payload(self, message: Message) -> dict[str, Any]:
        return {
            "id": message.id,
            "channel": self.name,
            "subject": message.subject,
            "body": message.body,
            "html": message.html,
            "recipients": list(message.recipients),
            "metadata": dict(message.metadata),
            "severity": message.severity,
            "facts": dict(message.facts),
            "group_key": message.group_key,
            "resolved": message.resolved,
            "links": [{"text": text, "href": href} for text, href in message.links],
            "sent_at": datetime.now(UTC).isoformat(),
        }

    def deliver(self, message: Message) -> str:
        secret = secret_from_env(self.spec.secret_env)
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
        return answer_text(self.post(self.spec.url, content=body, headers=headers))
