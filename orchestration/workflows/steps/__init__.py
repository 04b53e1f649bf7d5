"""The registry of step types: one module per type, each defining `STEP_TYPE`.

Delay, Approval and Sync park the workflow (`parking.py`); the Pipes variant of Custom Script is
added here as its module lands.
"""

from __future__ import annotations

from orchestration.workflows.steps import (
    approval,
    conditional,
    custom_script,
    delay,
    http_request,
    notification,
    sync,
    transformation,
)
from orchestration.workflows.steps.base import DEFAULT_OUTPUT, StepConfig, StepType

STEP_TYPES: dict[str, StepType] = {
    module.STEP_TYPE.name: module.STEP_TYPE
    for module in (
        notification,
        transformation,
        conditional,
        http_request,
        custom_script,
        delay,
        approval,
        sync,
    )
}

__all__ = ["DEFAULT_OUTPUT", "STEP_TYPES", "StepConfig", "StepType"]
