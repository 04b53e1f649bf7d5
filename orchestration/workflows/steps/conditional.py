"""Conditional: evaluate a kernel condition over the context and continue on one branch.

The step has two optional outputs, `then` and `otherwise`; only the taken one is yielded, so Dagster
marks the steps that depend on the other branch (`depends_on: [check.otherwise]`) as skipped.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from orchestration.workflows.context import StepContext
from orchestration.workflows.steps.base import StepConfig, StepType

BRANCHES = ("then", "otherwise")


class ConditionalConfig(StepConfig):
    condition: dict[str, Any] = Field(
        description="A kernel condition over the context, e.g. "
        "{field: steps.lookup.output.extracted.amount, op: gt, value: 1000}."
    )

    not_templates = frozenset({"condition"})
    condition_fields = frozenset({"condition"})


def choose_branch(config: ConditionalConfig, context: StepContext) -> dict[str, Any]:
    from orchestration.kernel.conditions import evaluate, parse_condition

    matched = evaluate(parse_condition(config.condition), context.variables())
    return {"matched": matched, "branch": BRANCHES[0] if matched else BRANCHES[1]}


STEP_TYPE = StepType(
    name="conditional",
    description="Branch on a condition: steps depend on `<id>.then` or `<id>.otherwise`.",
    config_model=ConditionalConfig,
    run=choose_branch,
    outputs=BRANCHES,
)
