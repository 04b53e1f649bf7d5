"""Which evaluator each rule and contract promise gets, and the checks that need no Great Expectations."""

from __future__ import annotations

import pyarrow as pa

from assets.etl.checks import GX, KERNEL, SCHEMA, quality_checks, summary_markdown, validate
from assets.etl.spec import PipelineSpec


def spec_with(rules: list[dict], columns: dict | None = None) -> PipelineSpec:
    return PipelineSpec.model_validate(
        {"source": {"format": "csv", "path": "x.csv"}, "rules": rules, "contract": {"columns": columns or {}}}
    )


def test_single_field_predicates_become_expectations_and_the_rest_stays_with_the_kernel():
    rules = [
        {"name": "known", "condition": {"field": "a", "op": "exists"}},
        {"name": "listed", "condition": {"field": "a", "op": "in", "value": [1, 2]}},
        {"name": "positive", "condition": {"field": "a", "op": "gt", "value": 0}},
        {"name": "window", "condition": {"field": "a", "op": "between", "value": [1, 9]}},
        {"name": "prefixed", "condition": {"field": "s", "op": "starts_with", "value": "x"}},
        {"name": "either", "condition": {"any": [{"field": "a", "op": "eq", "value": 1}, {"field": "s", "op": "exists"}]}},
        {"name": "recent", "condition": {"field": "t", "op": "gt", "value": "2024-01-01"}},
    ]  # fmt: skip
    checks = {check.name: check for check in quality_checks(spec_with(rules))}
    assert checks["known"].expectation == "ExpectColumnValuesToNotBeNull"
    assert checks["listed"].arguments == {"value_set": [1, 2]}
    assert checks["positive"].arguments == {"min_value": 0, "strict_min": True}
    assert checks["window"].arguments == {"min_value": 1, "max_value": 9}
    assert {name for name, check in checks.items() if check.evaluator == KERNEL} == {
        "prefixed",
        "either",
        "recent",
    }
    assert {name for name, check in checks.items() if check.evaluator == GX} == {
        "known",
        "listed",
        "positive",
        "window",
    }


def test_contract_checks_block_and_get_names_dagster_accepts():
    checks = quality_checks(
        spec_with(
            [{"name": "order_id_required", "condition": {"field": "a", "op": "exists"}, "severity": "warn"}],
            {"order id": {"type": "int64", "unique": True}, "order_id": {"required": True}},
        )
    )
    names = [check.name for check in checks]
    assert names == ["order_id_required", "order_id_type", "order_id_unique", "contract_order_id_required"]
    assert all(check.blocking and check.severity == "error" for check in checks[1:])
    assert checks[0].severity == "warn" and not checks[0].blocking


def test_kernel_and_schema_checks_report_failures_with_samples_and_the_row_share():
    table = pa.table({"a": pa.array([1, 2, 3, 4], pa.int32()), "s": ["x1", "y", None, "x2"]})
    rules = [
        {"name": "prefixed", "condition": {"field": "s", "op": "starts_with", "value": "x"}, "mostly": 0.5},
        {"name": "tight", "condition": {"not": {"field": "a", "op": "gt", "value": 3}}},
    ]
    checks = quality_checks(spec_with(rules, {"a": {"type": "int64"}, "missing": {"type": "string"}}))
    report = validate(table, checks, rows_considered=5)
    outcome = {o.check.name: o for o in report.outcomes}
    assert (
        outcome["prefixed"].passed and outcome["prefixed"].unexpected_count == 2
    )  # null fails, as in filters
    assert not outcome["tight"].passed and outcome["tight"].sample == [{"a": 4}]
    assert not outcome["a_type"].passed and outcome["a_type"].detail == "a is int32, the contract says int64"
    assert outcome["a_type"].check.evaluator == SCHEMA
    assert (
        not outcome["missing_type"].passed and outcome["missing_type"].detail == "column missing is missing"
    )
    assert report.expectations_score == 1 / 4
    assert report.valid_rows == 1 and report.valid_rows_score == 1 / 5  # rows 2, 3 and 4 fail a rule
    summary = summary_markdown(report, {("transforms[0].cast", "a"): 1})
    assert "25.0% of checks passed, 20.0% of rows valid (1 of 5)" in summary
    assert "| tight | no | error | 1 (25.00%) | {'a': 4} |" in summary
    assert "| transforms[0].cast | a | 1 |" in summary
