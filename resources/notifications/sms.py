"""SMS (`kind: sms`) through a Twilio-compatible Messages API.

`POST {api_url}/2010-04-01/Accounts/{account_sid}/Messages.json`, form-encoded `To`, `From` (or
`MessagingServiceSid`) and `Body`, HTTP basic auth with the account SID and the auth token; Twilio
answers 201 with the message's `sid` (twilio.com/docs/messaging/api/message-resource). SignalWire's
LaML API and other Twilio-compatible providers take the same request under their own `api_url`.
For other SMS providers use an `apprise` channel: Apprise speaks Vonage (Nexmo), Sinch, Plivo,
ClickSend, MessageBird (Bird), BulkSMS, Amazon SNS and more.

One request per recipient. A retry after a partial failure sends only to the recipients not yet
reached, so nobody gets the same text twice from one message.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from resources.notifications.core import (
    ChannelSpec,
    DeliveryFailure,
    EnvVarName,
    HttpUrl,
    Message,
    secret_from_env,
)
from resources.notifications.http import HttpChannel

E164 = re.compile(r"\+[1-9]\d{6,14}")


def _phone_numbers(value: list[str]) -> list[str]:
    for number in value:
        if not E164.fullmatch(number):
            raise ValueError(f"{number!r} is not an E.164 phone number (+ and 7 to 15 digits)")
    return value


class SmsSpec(ChannelSpec):
    kind: Literal["sms"] = "sms"
    api_url: HttpUrl = Field(
        default="https://api.twilio.com", description="A Twilio-compatible API's base URL."
    )
    account_sid: str = Field(min_length=1, description="The account's SID (an identifier, not a secret).")
    auth_token_env: EnvVarName = Field(description="Environment variable holding the auth token.")
    sender: str | None = Field(default=None, description="The From number (E.164).")
    messaging_service_sid: str | None = Field(
        default=None, description="Instead of sender: a Messaging Service."
    )
    recipients: list[str] = Field(
        default_factory=list, description="E.164 numbers, used when a message names none."
    )
    max_length: int = Field(default=1600, ge=70, le=1600, description="Longer texts are cut, ending in '…'.")
    timeout_s: float = Field(default=10.0, gt=0)

    @field_validator("recipients")
    @classmethod
    def _recipients_are_numbers(cls, value: list[str]) -> list[str]:
        return _phone_numbers(value)

    @model_validator(mode="after")
    def _one_sender(self) -> SmsSpec:
        if (self.sender is None) == (self.messaging_service_sid is None):
            raise ValueError("set exactly one of sender (a From number) or messaging_service_sid")
        if self.sender is not None:
            _phone_numbers([self.sender])
        return self


class SmsChannel(HttpChannel):
    kind = "sms"
    Spec = SmsSpec
    spec: SmsSpec

    def __init__(self, name: str, **config: object):
        super().__init__(name, **config)
        # Recipients already reached, per message id: a retry of the same message skips them.
        self._reached: dict[str, set[str]] = {}

    def recipients_of(self, message: Message) -> list[str]:
        return list(message.recipients or self.spec.recipients)

    def recipient(self, message: Message) -> str:
        return ", ".join(self.recipients_of(message))

    def text(self, message: Message) -> str:
        text = message.subject if not message.body else f"{message.subject}\n{message.body}"
        if message.resolved:
            text = f"RESOLVED: {text}"
        limit = self.spec.max_length
        return text if len(text) <= limit else text[: limit - 1] + "…"

    def deliver(self, message: Message) -> str:
        recipients = self.recipients_of(message)
        if not recipients:
            raise DeliveryFailure(
                "no recipients: the message names none and the channel has no default", transient=False
            )
        _phone_numbers(recipients)
        token = secret_from_env(self.spec.auth_token_env)
        url = f"{self.spec.api_url.rstrip('/')}/2010-04-01/Accounts/{self.spec.account_sid}/Messages.json"
        origin = (
            {"From": self.spec.sender}
            if self.spec.sender
            else {"MessagingServiceSid": self.spec.messaging_service_sid}
        )
        reached = self._reached.setdefault(message.id, set())
        sids = []
        for number in recipients:
            if number in reached:
                continue
            response = self.post(
                url,
                data={"To": number, "Body": self.text(message), **origin},
                auth=(self.spec.account_sid, token),
            )
            reached.add(number)
            sids.append(str(response.json().get("sid", "?")))
        self._reached.pop(message.id, None)
        return f"queued for {len(recipients)} recipient(s): {', '.join(sids)}"
