"""A local JSON-lines file (`kind: outbox`): the shipped channels, so examples run with nothing to contact.

Like Django's file-based e-mail backend, it delivers nowhere; `junction notifications outbox` reads it.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import Field

from resources.notifications.core import ChannelSpec, DeliveryFailure, Message, NotificationChannel


class OutboxSpec(ChannelSpec):
    kind: Literal["outbox"] = "outbox"
    path: Path | None = Field(
        default=None,
        description="JSON-lines file; relative paths are under JUNCTION_HOME. Default: outbox/<channel>.jsonl.",
    )
    recipients: list[str] = Field(default_factory=list, description="Used when a message names none.")


class OutboxChannel(NotificationChannel):
    """Appends each message as one JSON line to a local file: for development and the shipped examples.

    One `write()` on a descriptor opened with O_APPEND: the kernel places every line at the end of the
    file whole, so several threads or processes sending at once never interleave their lines.
    """

    kind = "outbox"
    Spec = OutboxSpec
    spec: OutboxSpec

    @property
    def path(self) -> Path:
        """Resolved at send time: JUNCTION_HOME may differ between loading and sending."""
        from orchestration.settings import get_settings

        configured = self.spec.path or Path("outbox") / f"{self.name}.jsonl"
        return get_settings().home_dir / configured.expanduser()  # an absolute path replaces the home

    def recipients_of(self, message: Message) -> list[str]:
        return list(message.recipients or self.spec.recipients)

    def recipient(self, message: Message) -> str:
        return ", ".join(self.recipients_of(message)) or f"outbox {self.path}"

    def line(self, message: Message) -> bytes:
        entry = {
            "time": datetime.now(UTC).isoformat(),
            "id": message.id,
            "channel": self.name,
            "subject": message.subject,
            "body": message.body,
            "html": message.html,
            "recipients": self.recipients_of(message),
            "metadata": dict(message.metadata),
            "severity": message.severity,
            "facts": dict(message.facts),
            "group_key": message.group_key,
            "resolved": message.resolved,
        }
        return (json.dumps(entry, ensure_ascii=False, separators=(",", ":"), default=str) + "\n").encode()

    def deliver(self, message: Message) -> str:
        path = self.path
        data = self.line(message)
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(descriptor, data)
        finally:
            os.close(descriptor)
        if written != len(data):
            # Disk full or a quota hit. Not retried: each retry could leave another fragment behind.
            raise DeliveryFailure(f"only {written} of {len(data)} bytes written to {path}", transient=False)
        return f"appended to {path}"
