"""`NotificationsResource`: the Dagster resource workflow Notification steps and alerts send through."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg

from resources.notifications.core import DeliveryRecord, Message
from resources.notifications.delivery import send


class NotificationsResource(dg.ConfigurableResource):
    """Templated notifications for workflow Notification steps and alerts.

    `send("ops", "Refund {{ inputs.id }} failed", "...", context)` renders the templates with
    `context` (sandboxed, strict: a missing variable is an error) and sends through the channel.
    """

    channels_file: str | None = None

    def send(
        self,
        channel: str,
        subject_template: str,
        body_template: str,
        context: Mapping[str, Any],
        *,
        html_template: str | None = None,
        recipients: Sequence[str] = (),
        metadata: Mapping[str, Any] | None = None,
        origin: str = "",
        max_attempts: int | None = None,
        dedupe_key: str | None = None,
    ) -> DeliveryRecord:
        from orchestration.kernel.templates import render, render_html

        message = Message(
            subject=render(subject_template, context),
            body=render(body_template, context),
            html=render_html(html_template, context) if html_template is not None else None,
            recipients=tuple(render(recipient, context) for recipient in recipients),
            metadata=dict(metadata or {}),
        )
        return send(
            channel,
            message,
            origin=origin,
            max_attempts=max_attempts,
            channels_file=self.channels_file,
            dedupe_key=dedupe_key,
        )
