"""What a step sees at run time: the workflow's inputs, earlier outputs, execution and run ids.

The template and condition namespaces are the same mapping (`variables()`):

- `inputs.<name>`            the workflow's inputs (run config);
- `steps.<id>.output`        the output of an upstream step (`steps.<id>.status` is `succeeded` or
                             `failed` — the latter only with `continue_on_failure`, and then the output
                             is `{error: {type, message}}`);
- `execution.id`, `execution.workflow`   one execution may span several runs (parking);
- `run.id`                   this Dagster run;
- `env.<NAME>`               only the environment variables the spec lists under `env`;
- `trigger.event`            in a run launched by a stream trigger: the event (`id`, `stream`,
                             `payload`, `published_at`), read by the run itself (`triggers.py`).

A step may also hand Dagster events (`events`, e.g. the asset materializations a Pipes script
reported) and extra output metadata (`output_metadata`) back to its op, which yields them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

EXECUTION_ID_TAG = "junction/execution_id"
WORKFLOW_TAG = "junction/workflow"
FAILED_STEPS_TAG = "junction/failed_steps"
KIND_TAG = "junction/kind"

MASK = "***"
# The kernel's default render limit, shortened when the step's own timeout is closer.
TEMPLATE_TIME_LIMIT_S = 2.0
# Keys whose values are masked wherever they appear in a recorded output.
SECRET_KEY_MARKERS = ("password", "secret", "token", "authorization", "api_key", "apikey")


@dataclass
class StepContext:
    """The context object passed to every step (and to custom scripts)."""

    step_id: str
    workflow: str
    inputs: Mapping[str, Any]
    steps: Mapping[str, Mapping[str, Any]]
    execution_id: str
    run_id: str
    env_names: tuple[str, ...] = ()
    deadline: float | None = None
    resources: Mapping[str, Any] = field(default_factory=dict)
    log: Any = None
    run_tags: Mapping[str, str] = field(default_factory=dict)
    trigger: Mapping[str, Any] | None = None
    # The op's Dagster context, for steps that drive Dagster machinery themselves (Pipes).
    dagster_context: Any = None
    events: list[Any] = field(default_factory=list)
    output_metadata: dict[str, Any] = field(default_factory=dict)

    def variables(self) -> dict[str, Any]:
        """The template/condition namespace (see the module doc)."""
        return {
            "inputs": dict(self.inputs),
            "steps": {step_id: dict(state) for step_id, state in self.steps.items()},
            "execution": {"id": self.execution_id, "workflow": self.workflow},
            "run": {"id": self.run_id},
            "env": {name: os.environ.get(name, "") for name in self.env_names},
            "trigger": dict(self.trigger) if self.trigger is not None else {},
        }

    def render(self, value: Any) -> Any:
        """`value` with every string in it rendered as a kernel template (strict, sandboxed)."""
        from orchestration.kernel.templates import render_data

        remaining = self.remaining_s()
        limit = (
            TEMPLATE_TIME_LIMIT_S if remaining is None else max(min(TEMPLATE_TIME_LIMIT_S, remaining), 0.01)
        )
        return render_data(value, self.variables(), time_limit_s=limit)

    def remaining_s(self) -> float | None:
        """Seconds left before the step's timeout, None without one."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())


def mask_secrets(value: Any, secret_values: list[str]) -> Any:
    """A copy of `value` for the record: secret-looking keys and known secret values replaced by ***."""
    secrets = [secret for secret in secret_values if secret]
    if isinstance(value, Mapping):
        return {
            key: MASK
            if any(marker in str(key).lower() for marker in SECRET_KEY_MARKERS)
            else mask_secrets(item, secrets)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [mask_secrets(item, secrets) for item in value]
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, MASK)
        return value
    return value
