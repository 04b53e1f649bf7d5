"""Notification: a templated subject/body sent to a named channel (`resources/channels.yaml`).

The templates are rendered by `NotificationsResource.send` with the workflow context, exactly once:
rendering them here as well would let data containing `{{ … }}` be rendered a second time.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from orchestration.workflows.context import StepContext
from orchestration.workflows.steps.base import StepConfig, StepType


class NotificationConfig(StepConfig):
    channel: str = Field(min_length=1, description="A channel named in channels.yaml.")
    subject: str = Field(description="Template.")
    body: str = Field(description="Template (plain text).")
    html: str | None = Field(default=None, description="Template of an HTML body (values are escaped).")
    recipients: list[str] = Field(
        default_factory=list, description="Templates; empty: the channel's default recipients."
    )

    not_templates = frozenset({"channel"})


def send_notification(config: NotificationConfig, context: StepContext) -> dict[str, Any]:
    record = context.resources["notifications"].send(
        config.channel,
        config.subject,
        config.body,
        context.variables(),
        html_template=config.html,
        recipients=config.recipients,
        metadata={
            "workflow": context.workflow,
            "step": context.step_id,
            "execution_id": context.execution_id,
        },
        origin=f"workflow:{context.workflow}/{context.step_id}",
    )
    return {
        "channel": record.channel,
        "delivery_id": record.id,
        "recipient": record.recipient,
        "subject": record.subject,
        "status": record.status,
        "attempts": record.attempts,
    }


STEP_TYPE = StepType(
    name="notification",
    description="Send a templated message to a named notification channel.",
    config_model=NotificationConfig,
    run=send_notification,
    resource_keys=frozenset({"notifications"}),
)
