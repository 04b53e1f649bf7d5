"""Delay: wait for a duration (`90m`, `12h`, `2d` — the kernel's syntax) or until a templated time.

The step parks the workflow (`parking.py`): the run ends, and the resume sensor starts the next one
when the time has come. The wake-up time is computed once, when the step first runs, and kept in the
checkpoint, so the resumed step sees the same time rather than "now plus the duration" again. A time
already past does not park at all.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field, model_validator

from orchestration.errors import JunctionError
from orchestration.kernel.times import DurationText
from orchestration.workflows.context import StepContext
from orchestration.workflows.steps.base import StepConfig, StepType


class DelayConfig(StepConfig):
    duration: DurationText | None = Field(default=None, description="How long to wait: 90m, 12h, 2d, 1w.")
    until: str | None = Field(
        default=None, description="Template of an ISO 8601 instant to wait for (naive is UTC)."
    )

    not_templates = frozenset({"duration"})

    @model_validator(mode="after")
    def _one_of(self) -> DelayConfig:
        if (self.duration is None) == (self.until is None):
            raise ValueError("give exactly one of duration and until")
        return self


def wake_up_time(config: DelayConfig, context: StepContext) -> datetime:
    from orchestration.kernel.times import parse_duration, parse_instant
    from orchestration.workflows.parking import get_checkpoint, utc_now

    checkpoint = get_checkpoint(context.execution_id)
    if checkpoint is not None and checkpoint.parked_step == context.step_id and checkpoint.wake_at:
        return checkpoint.wake_at
    if config.duration is not None:
        return utc_now() + parse_duration(config.duration)
    text = str(context.render(config.until))
    moment = parse_instant(text)
    if moment is None:
        raise JunctionError(f"until: {text!r} is not an ISO 8601 instant")
    return moment


def delay(config: DelayConfig, context: StepContext) -> dict[str, Any]:
    from orchestration.workflows.parking import ParkStep, moment_text, utc_now

    wake_at = wake_up_time(config, context)
    if wake_at > utc_now():
        raise ParkStep(
            f"delayed until {wake_at.isoformat()}",
            wake_at,
            summary=f"delay until {moment_text(wake_at)}",
            guidance=(f"wakes at {wake_at.isoformat()}: the resume sensor continues the execution then",),
        )
    return {"waited_until": wake_at.isoformat()}


STEP_TYPE = StepType(
    name="delay",
    description="Wait for a duration or until a time; the workflow parks, holding no worker.",
    config_model=DelayConfig,
    run=delay,
    parks=True,
)
