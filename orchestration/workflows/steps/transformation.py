"""Transformation: derive fields with kernel expressions and filter records with a kernel condition.

The records come from the context (`source`, a path such as `steps.lookup.output.body.items` or
`inputs.orders`). Per-record evaluation is the kernel's (`expressions.evaluate`, `conditions.evaluate`);
when the ETL transform library lands, its building blocks plug in here as further config fields.
Order of operations: derive (in the order written, so a derived field can use an earlier one), then
filter, then select.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field

from orchestration.errors import JunctionError
from orchestration.kernel.spec_errors import SpecError, SpecProblem
from orchestration.workflows.context import StepContext
from orchestration.workflows.steps.base import StepConfig, StepType


class TransformationConfig(StepConfig):
    source: str = Field(description="Context path of a list of records (mappings).")
    derive: dict[str, str] = Field(default_factory=dict, description="New field -> kernel expression.")
    filter: dict[str, Any] | None = Field(
        default=None, description="A kernel condition over each record: records not matching are dropped."
    )
    select: list[str] | None = Field(default=None, description="Keep only these fields (in this order).")

    not_templates = frozenset({"source", "derive", "filter", "select"})

    def context_paths(self) -> dict[tuple[str | int, ...], str]:
        return {("source",): self.source}

    def load_problems(self) -> list[SpecProblem]:
        from orchestration.kernel.conditions import parse_condition
        from orchestration.kernel.expressions import parse_expression

        problems: list[SpecProblem] = []
        for name, text in self.derive.items():
            try:
                parse_expression(text)
            except SpecError as exc:
                problems.extend(exc.within(("derive", name)).problems)
        if self.filter is not None:
            try:
                parse_condition(self.filter)
            except SpecError as exc:
                problems.extend(exc.within(("filter",)).problems)
        return problems


def transform(config: TransformationConfig, context: StepContext) -> dict[str, Any]:
    from orchestration.kernel.conditions import evaluate, lookup, parse_condition
    from orchestration.kernel.expressions import evaluate as evaluate_expression
    from orchestration.kernel.expressions import parse_expression

    records = lookup(context.variables(), config.source)
    if not isinstance(records, list) or not all(isinstance(record, Mapping) for record in records):
        raise JunctionError(
            f"source {config.source!r} is not a list of records (got {type(records).__name__})"
        )
    derived = [(name, parse_expression(text)) for name, text in config.derive.items()]
    keep = parse_condition(config.filter) if config.filter is not None else None
    result = []
    for record in records:
        row = dict(record)
        for name, expression in derived:
            row[name] = evaluate_expression(expression, row)
        if keep is not None and not evaluate(keep, row):
            continue
        if config.select is not None:
            row = {name: row.get(name) for name in config.select}
        result.append(row)
    return {"records": result, "count": len(result), "input_count": len(records)}


STEP_TYPE = StepType(
    name="transformation",
    description="Derive fields and filter records from the context with kernel expressions/conditions.",
    config_model=TransformationConfig,
    run=transform,
)
