"""Quality checks: a spec's rules and contract as Great Expectations expectations, run once per run.

`quality_checks(spec)` lists the checks without importing anything heavy (the factory declares them as
Dagster `check_specs` when the code location loads). `validate(table, checks, ...)` runs them over the
staged rows: the columns the expectations read are converted to pandas once and validated by one GX
`ValidationDefinition` in an ephemeral context, so each expectation reads the same in-memory frame,
never the staging table (which the factory fills in a thread meanwhile).

What runs where:

- GX: a rule that is a single predicate on a top-level field — ``exists`` (not null), ``in`` / ``eq``
  (in set), ``not_in`` / ``ne`` (not in set), ``gt``/``gte``/``lt``/``lte``/``between`` on numbers
  (between, strict where the operator is), ``matches`` (regex) — and every contract column's
  ``required`` (not null), ``unique``, ``allowed`` (in set) and ``min``/``max`` (between).
  GX's column map expectations skip nulls: a rule about nulls is an ``exists`` rule.
- The kernel's vectorised conditions (`evaluate_table`): every other rule (``all``/``any``/``not``,
  string operators, temporal comparisons, nested fields). A null fails those, as in filters.
- The Arrow schema: the contract's ``type``.

Each check is reported alike: passed or not, the share of rows that failed, up to `SAMPLE_SIZE` bad
values, and which evaluator ran it. Blocking checks are errors by definition (Dagster only blocks on
ERROR), others keep the spec's severity.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from assets.etl.spec import PipelineSpec, parse_arrow_type
from orchestration.kernel.conditions import (
    NUMBER,
    Condition,
    Operator,
    Predicate,
    evaluate_table,
    referenced_fields,
)

__all__ = ["CheckOutcome", "QualityCheck", "QualityReport", "quality_checks", "validate"]

SAMPLE_SIZE = 5
GX = "great_expectations"
KERNEL = "junction kernel (vectorised conditions)"
SCHEMA = "arrow schema"


@dataclass(frozen=True)
class QualityCheck:
    """One check of the staged data, named as its Dagster asset check."""

    name: str
    description: str
    blocking: bool
    severity: str  # "error" or "warn"
    column: str | None = None
    expectation: str | None = None  # a GX expectation class name
    arguments: dict[str, Any] = field(default_factory=dict)
    condition: Condition | None = None  # evaluated by the kernel
    mostly: float = 1.0
    arrow_type: str | None = None  # the contract's type, compared with the schema

    @property
    def evaluator(self) -> str:
        return GX if self.expectation else KERNEL if self.condition is not None else SCHEMA


def _rule_expectation(predicate: Predicate) -> tuple[str, dict[str, Any]] | None:
    """The GX expectation for a single-field predicate, or None when the kernel has to evaluate it."""
    if "." in predicate.field:
        return None
    values = [operand.value for operand in predicate.operands]
    op = predicate.op
    if op == Operator.EXISTS:
        return "ExpectColumnValuesToNotBeNull", {}
    if op in (Operator.IN, Operator.EQ):
        return "ExpectColumnValuesToBeInSet", {"value_set": values}
    if op in (Operator.NOT_IN, Operator.NE):
        return "ExpectColumnValuesToNotBeInSet", {"value_set": values}
    if op == Operator.MATCHES:
        return "ExpectColumnValuesToMatchRegex", {"regex": values[0]}
    if not predicate.operands or any(operand.kind != NUMBER for operand in predicate.operands):
        return None
    bounds = {
        Operator.GT: {"min_value": values[0], "strict_min": True},
        Operator.GTE: {"min_value": values[0]},
        Operator.LT: {"max_value": values[0], "strict_max": True},
        Operator.LTE: {"max_value": values[0]},
        Operator.BETWEEN: {"min_value": values[0], "max_value": values[-1]},
    }.get(op)
    return None if bounds is None else ("ExpectColumnValuesToBeBetween", bounds)


def _contract_check_name(column: str, suffix: str, rule_names: set[str]) -> str:
    """`<column>_<promise>` as a Dagster name (letters, digits, _), prefixed when a rule has that name."""
    name = re.sub(r"\W", "_", f"{column}_{suffix}")
    return f"contract_{name}" if name in rule_names or not re.match(r"[A-Za-z_]", name) else name


def quality_checks(spec: PipelineSpec) -> list[QualityCheck]:
    """The spec's rules, then its contract, as checks (cheap: nothing is imported or evaluated)."""
    checks: list[QualityCheck] = []
    rule_names = {rule.name for rule in spec.rules}
    for rule in spec.rules:
        severity = "error" if rule.blocking else rule.severity
        description = rule.description or f"rule {rule.name}: {rule.condition.source}"
        tree = rule.condition.tree
        mapped = _rule_expectation(tree) if isinstance(tree, Predicate) else None
        if mapped is not None:
            expectation, arguments = mapped
            checks.append(
                QualityCheck(
                    rule.name,
                    description,
                    rule.blocking,
                    severity,
                    tree.field,
                    expectation,
                    arguments,
                    mostly=rule.mostly,
                )
            )
        else:
            checks.append(
                QualityCheck(
                    rule.name, description, rule.blocking, severity, condition=tree, mostly=rule.mostly
                )
            )
    # A contract is a promise to the target's readers: every contract check blocks the publish.
    for column, contract in spec.contract.columns.items():
        # (name suffix, what it promises, GX expectation or None for the schema comparison, arguments)
        wanted: list[tuple[str, str, str | None, dict[str, Any]]] = []
        if contract.type is not None:
            wanted.append(("type", f"is {contract.type}", None, {}))
        if contract.required:
            wanted.append(("required", "is never null", "ExpectColumnValuesToNotBeNull", {}))
        if contract.unique:
            wanted.append(("unique", "is unique", "ExpectColumnValuesToBeUnique", {}))
        if contract.allowed is not None:
            wanted.append(
                (
                    "allowed",
                    f"is one of {contract.allowed}",
                    "ExpectColumnValuesToBeInSet",
                    {"value_set": list(contract.allowed)},
                )
            )
        if contract.min is not None or contract.max is not None:
            bounds = {"min_value": contract.min, "max_value": contract.max}
            wanted.append(
                (
                    "range",
                    f"is within [{contract.min}, {contract.max}]",
                    "ExpectColumnValuesToBeBetween",
                    bounds,
                )
            )
        for suffix, what, expectation, arguments in wanted:
            checks.append(
                QualityCheck(
                    name=_contract_check_name(column, suffix, rule_names),
                    description=f"contract: {column} {what}",
                    blocking=True,
                    severity="error",
                    column=column,
                    expectation=expectation,
                    arguments=arguments,
                    arrow_type=contract.type if expectation is None else None,
                )
            )
    return checks


@dataclass
class CheckOutcome:
    check: QualityCheck
    passed: bool
    element_count: int
    unexpected_count: int
    sample: list[Any]
    failing_rows: np.ndarray  # row indexes into the staged table
    detail: str | None = None

    @property
    def unexpected_percent(self) -> float:
        return 100.0 * self.unexpected_count / self.element_count if self.element_count else 0.0

    def metadata(self) -> dict[str, Any]:
        return {
            "evaluated_by": self.check.evaluator,
            "rows_checked": self.element_count,
            "rows_failed": self.unexpected_count,
            "percent_failed": round(self.unexpected_percent, 4),
            "mostly": self.check.mostly,
            "sample_bad_values": [_plain(value) for value in self.sample],
            **({"detail": self.detail} if self.detail else {}),
        }


@dataclass
class QualityReport:
    outcomes: list[CheckOutcome]
    rows_staged: int
    rows_considered: int  # read - filtered: the rows that were meant to be loaded
    seconds: float

    @property
    def expectations_score(self) -> float:
        return sum(o.passed for o in self.outcomes) / len(self.outcomes) if self.outcomes else 1.0

    @property
    def valid_rows(self) -> int:
        failing = [o.failing_rows for o in self.outcomes if len(o.failing_rows)]
        invalid = len(np.unique(np.concatenate(failing))) if failing else 0
        return self.rows_staged - invalid

    @property
    def valid_rows_score(self) -> float:
        """Valid rows (staged, failing no check) over the rows meant to be loaded (read - filtered).

        Quarantined rows are in the denominator only: they count as invalid.
        """
        return self.valid_rows / self.rows_considered if self.rows_considered else 1.0

    @property
    def blocking_failures(self) -> list[CheckOutcome]:
        return [o for o in self.outcomes if not o.passed and o.check.blocking]


def _plain(value: Any) -> Any:
    """A value JSON can carry (numpy scalars, NaN, timestamps)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def _kernel_outcome(check: QualityCheck, table: pa.Table) -> CheckOutcome:
    mask = evaluate_table(check.condition, table)
    failing = np.flatnonzero(~mask.to_numpy(zero_copy_only=False))
    total = table.num_rows
    passed = total == 0 or (total - len(failing)) / total >= check.mostly
    # Top-level fields only: a nested path's column is its first part.
    fields = sorted(
        {path.split(".")[0] for path in referenced_fields(check.condition)} & set(table.column_names)
    )
    sample_rows = table.select(fields).take(pa.array(failing[:SAMPLE_SIZE])).to_pylist()
    return CheckOutcome(check, passed, total, len(failing), sample_rows, failing)


def _schema_outcome(check: QualityCheck, table: pa.Table) -> CheckOutcome:
    actual = table.schema.field(check.column).type
    passed = actual == parse_arrow_type(check.arrow_type or "")
    detail = None if passed else f"{check.column} is {actual}, the contract says {check.arrow_type}"
    return CheckOutcome(
        check,
        passed,
        table.num_rows,
        0 if passed else table.num_rows,
        [] if passed else [str(actual)],
        np.array([], np.int64),
        detail,
    )


def _missing_column(check: QualityCheck, table: pa.Table) -> CheckOutcome:
    return CheckOutcome(
        check,
        False,
        table.num_rows,
        table.num_rows,
        [],
        np.array([], np.int64),
        f"column {check.column} is missing",
    )


def validate(table: pa.Table, checks: list[QualityCheck], rows_considered: int) -> QualityReport:
    """Run every check over `table`; GX's expectations in one validation over one pandas frame."""
    started = time.perf_counter()
    outcomes: dict[str, CheckOutcome] = {}
    expectation_checks = []
    for check in checks:
        if check.column is not None and check.column not in table.column_names:
            outcomes[check.name] = _missing_column(check, table)
        elif check.expectation is not None:
            expectation_checks.append(check)
        elif check.condition is not None:
            outcomes[check.name] = _kernel_outcome(check, table)
        else:
            outcomes[check.name] = _schema_outcome(check, table)
    if expectation_checks:
        outcomes.update(_run_great_expectations(table, expectation_checks))
    ordered = [outcomes[check.name] for check in checks]
    return QualityReport(ordered, table.num_rows, rows_considered, time.perf_counter() - started)


def _run_great_expectations(table: pa.Table, checks: list[QualityCheck]) -> dict[str, CheckOutcome]:
    import great_expectations as gx  # 2.5 s and ~260 MB: only ever inside a run
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    # tqdm bars on stderr would interleave with Dagster's log lines in the CLI and run logs.
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_definition = (
        context.data_sources.add_pandas("junction")
        .add_dataframe_asset("staged")
        .add_batch_definition_whole_dataframe("run")
    )
    suite = context.suites.add(gx.ExpectationSuite(name="junction_checks"))
    # A suite keeps one of equal expectations (a rule and a contract may say the same thing): each
    # distinct expectation runs once and its result answers every check that asked for it.
    asked_by: dict[str, list[QualityCheck]] = {}
    for check in checks:
        expectation_class = getattr(gx.expectations, check.expectation)
        arguments = {key: value for key, value in check.arguments.items() if value is not None}
        arguments["mostly"] = check.mostly
        same = json.dumps([check.expectation, check.column, arguments], sort_keys=True, default=str)
        if same not in asked_by:
            asked_by[same] = []
            suite.add_expectation(expectation_class(column=check.column, meta={"same": same}, **arguments))
        asked_by[same].append(check)
    validation = context.validation_definitions.add(
        gx.ValidationDefinition(name="junction_validation", data=batch_definition, suite=suite)
    )
    # Only the columns the expectations read go to pandas (the conversion is most of the cost); the
    # frame keeps the table's row positions, so failing-row indexes stay indexes into the table.
    columns = list(dict.fromkeys(check.column for check in checks if check.column is not None))
    frame = table.select(columns).to_pandas()
    # COMPLETE gives every failing row's index: the valid-row share needs them.
    result = validation.run(batch_parameters={"dataframe": frame}, result_format="COMPLETE")
    outcomes: dict[str, CheckOutcome] = {}
    for item in result.results:
        details = item.result or {}
        failing = np.asarray(details.get("unexpected_index_list") or [], dtype=np.int64)
        exception = (item.exception_info or {}).get("exception_message")
        for check in asked_by[item.expectation_config.meta["same"]]:
            outcomes[check.name] = CheckOutcome(
                check,
                bool(item.success),
                int(details.get("element_count", table.num_rows)),
                int(details.get("unexpected_count", 0) or 0),
                list(details.get("partial_unexpected_list") or [])[:SAMPLE_SIZE],
                failing,
                exception,
            )
    return outcomes


def summary_markdown(report: QualityReport, quarantine_by_reason: dict[tuple[str, str | None], int]) -> str:
    """The quality summary of a run: score, failed checks with sample bad values, quarantine by reason."""
    lines = [
        f"**Quality score**: {report.expectations_score:.1%} of checks passed, "
        f"{report.valid_rows_score:.1%} of rows valid ({report.valid_rows:,} of {report.rows_considered:,})",
        "",
    ]
    failed = [o for o in report.outcomes if not o.passed]
    if failed:
        lines += [
            "| failed check | blocking | severity | rows failed | sample bad values | evaluated by |",
            "|---|---|---|---|---|---|",
        ]
        for outcome in failed:
            sample = ", ".join(str(_plain(value)) for value in outcome.sample) or (outcome.detail or "")
            lines.append(
                f"| {outcome.check.name} | {'yes' if outcome.check.blocking else 'no'} "
                f"| {outcome.check.severity} "
                f"| {outcome.unexpected_count:,} ({outcome.unexpected_percent:.2f}%) "
                f"| {sample.replace('|', '/')} | {outcome.check.evaluator} |"
            )
    else:
        lines.append(f"All {len(report.outcomes)} checks passed.")
    lines.append("")
    if quarantine_by_reason:
        lines += ["| quarantined at step | field | rows |", "|---|---|---|"]
        for (step, column), count in Counter(quarantine_by_reason).most_common():
            lines.append(f"| {step} | {column or '-'} | {count:,} |")
    else:
        lines.append("No rows quarantined.")
    return "\n".join(lines)
