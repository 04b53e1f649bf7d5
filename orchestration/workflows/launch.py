"""Starting a workflow execution from outside Dagster's UI: the execution's tags and typed inputs.

Every launcher — `junction workflows run`, the gateway's `POST /workflows/{name}/executions` — tags
the first run of a new execution with `junction/execution_id` (the factory then uses it, and the
resume sensor carries it to later runs) and says who launched it.
"""

from __future__ import annotations

import uuid
from datetime import date
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, create_model

from orchestration.workflows.context import EXECUTION_ID_TAG
from orchestration.workflows.spec import WorkflowSpec

LAUNCHED_BY_TAG = "junction/launched_by"

# JSON types of the workflow input types, checked strictly: "3" is not an integer, "true" no boolean.
INPUT_VALUE_TYPES: dict[str, Any] = {
    "string": StrictStr,
    "integer": StrictInt,
    "number": StrictFloat,
    "boolean": StrictBool,
    "object": dict[str, Any],
    "array": list[Any],
    "date": date,
}


def new_execution_id() -> str:
    return str(uuid.uuid4())


def execution_tags(execution_id: str, launched_by: str) -> dict[str, str]:
    """The tags of the first run of a new execution."""
    return {EXECUTION_ID_TAG: execution_id, LAUNCHED_BY_TAG: launched_by}


def accepts_api_launch(spec: WorkflowSpec) -> bool:
    """Whether the spec declares the `api` trigger (the gateway launches only those)."""
    return any(trigger.type == "api" for trigger in spec.triggers)


def inputs_model(spec: WorkflowSpec) -> type[BaseModel]:
    """A pydantic model of the workflow's inputs (unknown names refused)."""
    fields: dict[str, Any] = {}
    for name, spec_input in spec.inputs.items():
        kind = INPUT_VALUE_TYPES[spec_input.type]
        default = ... if spec_input.required else spec_input.default
        fields[name] = (kind, Field(default, description=spec_input.description or None))
    return create_model(f"{spec.name}_inputs", __config__=ConfigDict(extra="forbid"), **fields)


def validated_inputs(spec: WorkflowSpec, values: dict[str, Any]) -> dict[str, Any]:
    """`values` checked against the spec's typed inputs, defaults filled in, as run config (dates as
    ISO strings, the job's config type for them). Raises pydantic's `ValidationError`."""
    model = inputs_model(spec).model_validate(values)
    return {
        name: value.isoformat() if isinstance(value, date) else value
        for name, value in model.model_dump().items()
    }
