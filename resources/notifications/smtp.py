"""E-mail over SMTP (`kind: email`): plain text, with an HTML alternative when the message has one."""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from resources.notifications.core import (
    ChannelSpec,
    DeliveryFailure,
    EnvVarName,
    Message,
    NotificationChannel,
    secret_from_env,
)


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
        password = secret_from_env(spec.password_env) if spec.password_env else None
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
