"""The registry of step types: one module per type, each defining `STEP_TYPE`.

The parking step types (Sync, Delay, Approval) and the Pipes variant of Custom Script are added
here as their modules land.
"""

from __future__ import annotations

from orchestration.workflows.steps import (
    conditional,
    custom_script,
    http_request,
    notification,
    transformation,
)
from orchestration.workflows.steps.base import DEFAULT_OUTPUT, StepConfig, StepType

STEP_TYPES: dict[str, StepType] = {
    module.STEP_TYPE.name: module.STEP_TYPE
    for module in (notification, transformation, conditional, http_request, custom_script)
}

__all__ = ["DEFAULT_OUTPUT", "STEP_TYPES", "StepConfig", "StepType"]
