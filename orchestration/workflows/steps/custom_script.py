"""Custom Script: call a Python function of the project by its dotted path (trusted code).

`callable: package.module:function` (or `package.module.function`) is imported when the step runs —
not when the spec loads, so a script's heavy imports never slow the code location down. It is
called as `function(context, **arguments)` with the `StepContext` and the rendered `arguments`, and
must return a JSON-able value (checked), which becomes the step's output.
"""

from __future__ import annotations

import importlib
import json
import re
from typing import Any

from pydantic import Field, field_validator

from orchestration.errors import JunctionError
from orchestration.workflows.context import StepContext
from orchestration.workflows.steps.base import StepConfig, StepType

DOTTED_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*([:.][A-Za-z_][A-Za-z0-9_]*)$")


class CustomScriptConfig(StepConfig):
    callable: str = Field(description="package.module:function (or package.module.function).")
    arguments: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments; every string in them is a template."
    )

    not_templates = frozenset({"callable"})

    @field_validator("callable")
    @classmethod
    def _dotted(cls, value: str) -> str:
        if not DOTTED_PATH.match(value) or ("." not in value and ":" not in value):
            raise ValueError("must be a dotted path to a function: package.module:function")
        return value


def resolve(path: str) -> Any:
    module_name, _, attribute = path.rpartition(":") if ":" in path else path.rpartition(".")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise JunctionError(f"cannot import {path}: {exc}") from None
    if not callable(function):
        raise JunctionError(f"{path} is not callable")
    return function


def run_script(config: CustomScriptConfig, context: StepContext) -> Any:
    function = resolve(config.callable)
    output = function(context, **context.render(config.arguments))
    try:
        json.dumps(output)
    except (TypeError, ValueError) as exc:
        raise JunctionError(f"{config.callable} returned a value that is not JSON-able: {exc}") from None
    return output


STEP_TYPE = StepType(
    name="custom_script",
    description="Call a project Python function with the context; its JSON-able result is the output.",
    config_model=CustomScriptConfig,
    run=run_script,
)
