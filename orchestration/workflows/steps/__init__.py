"""The registry of step types: one module per type, each defining `STEP_TYPE`.

Delay and Approval park the workflow (`parking.py`); Sync (which parks too) and the Pipes variant of
Custom Script are added here as their modules land.
"""

from __future__ import annotations

from orchestration.workflows.steps import (
    approval,
    conditional,
    custom_script,
    delay,
    http_request,
    notification,
    transformation,
)
from orchestration.workflows.steps.base import DEFAULT_OUTPUT, StepConfig, StepType

STEP_TYPES: dict[str, StepType] = {
    module.STEP_TYPE.name: module.STEP_TYPE
    for module in (notification, transformation, conditional, http_request, custom_script, delay, approval)
}

__all__ = ["DEFAULT_OUTPUT", "STEP_TYPES", "StepConfig", "StepType"]
