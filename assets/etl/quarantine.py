"""Rejected records with where they came from, and the per-run row counts that must add up.

A `Batch` is an Arrow table plus, per row, its position in the source: the file (or table/query) it
was read from, its line (when the format has lines) and its record number. Every transform keeps the
positions aligned with the rows, so a value that fails a cast three steps later is still reported as
``orders.csv line 1042``.

Counts: every record a source yields, malformed ones included, is *read*; it then ends up exactly once
as *loaded* (in the output), *filtered* (dropped on purpose: a filter condition, a duplicate) or
*quarantined* (rejected with a reason). ``read == loaded + filtered + quarantined`` is checked by
`RowCounts.check` at the end of every run. An ``aggregate`` step turns its N input rows into G groups:
the G groups go on (and may be loaded) and the other N - G rows are *merged into groups*, a fourth
term of the sum, recorded per step with N and G.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "QUARANTINE_SCHEMA",
    "Batch",
    "CountsInvariantError",
    "Quarantine",
    "QuarantinedRecord",
    "RowCounts",
]

# The columns of a `<target>_quarantine` table or Parquet file (written by the load slice).
QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("line", pa.int64()),
        pa.field("row", pa.int64()),
        pa.field("step", pa.string(), nullable=False),
        pa.field("field", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("record", pa.string()),
    ]
)


@dataclass(frozen=True)
class Batch:
    """Rows of one source (one file) and, aligned with them, their positions in it.

    `lines` are 1-based line numbers (null where the format has none, e.g. Parquet, or a quoted value
    may span lines); `rows` are 1-based record numbers in the source, malformed records included.
    """

    table: pa.Table
    source: str
    lines: pa.Array
    rows: pa.Array

    def __post_init__(self) -> None:
        if not (len(self.lines) == len(self.rows) == self.table.num_rows):
            raise ValueError("a batch's positions must align with its rows")

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    @classmethod
    def from_table(
        cls, table: pa.Table, source: str, first_row: int = 1, lines: pa.Array | None = None
    ) -> Batch:
        rows = pa.array(range(first_row, first_row + table.num_rows), pa.int64())
        return cls(table, source, lines if lines is not None else pa.nulls(table.num_rows, pa.int64()), rows)

    def filter(self, mask: pa.Array) -> Batch:
        """The rows where `mask` is true (null counts as false)."""
        mask = pc.fill_null(mask, False)
        return Batch(self.table.filter(mask), self.source, self.lines.filter(mask), self.rows.filter(mask))

    def take(self, indices: pa.Array) -> Batch:
        return Batch(self.table.take(indices), self.source, self.lines.take(indices), self.rows.take(indices))

    def with_table(self, table: pa.Table) -> Batch:
        return Batch(table, self.source, self.lines, self.rows)


@dataclass(frozen=True)
class QuarantinedRecord:
    """One rejected record: where it was (source, line, row), which step rejected it and why."""

    source: str
    line: int | None
    row: int | None
    step: str
    field: str | None
    reason: str
    record: str | None  # the raw line, or the row as JSON

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else f"row {self.row}"
        what = f"{self.field}: " if self.field else ""
        return f"{self.source} {where}: {self.step}: {what}{self.reason}"


# One encoder for every record: `json.dumps` with options builds a new one per call.
_ROW_ENCODER = json.JSONEncoder(default=str, ensure_ascii=False)


def _row_as_json(row: dict[str, Any]) -> str:
    return _ROW_ENCODER.encode(row)


class Quarantine:
    """The rejected records of one run, in the order they were rejected."""

    def __init__(self) -> None:
        self._records: list[QuarantinedRecord] = []

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[QuarantinedRecord]:
        return iter(self._records)

    def add(
        self,
        source: str,
        step: str,
        reason: str,
        *,
        line: int | None = None,
        row: int | None = None,
        field: str | None = None,
        record: str | None = None,
    ) -> None:
        self._records.append(QuarantinedRecord(source, line, row, step, field, reason, record))

    def add_rows(
        self, batch: Batch, indices: Sequence[int], step: str, field: str | None, reasons: Sequence[str]
    ) -> None:
        """Quarantine rows of a batch (by index) with one reason each; the rows are stored as JSON."""
        if not indices:
            return
        taken = batch.take(pa.array(indices, pa.int64()))
        for row, line, number, reason in zip(
            taken.table.to_pylist(), taken.lines.to_pylist(), taken.rows.to_pylist(), reasons, strict=True
        ):
            self.add(batch.source, step, reason, line=line, row=number, field=field, record=_row_as_json(row))

    def count_by_step(self) -> dict[str, int]:
        return dict(Counter(record.step for record in self._records))

    def count_by_reason(self) -> dict[tuple[str, str | None], int]:
        """(step, field) -> count: the quarantine summary of the quality report."""
        return dict(Counter((record.step, record.field) for record in self._records))

    def reasons(self, limit: int = 50) -> list[dict[str, Any]]:
        """The quarantine by (step, field), largest first, each with its first reason as an example.

        Reasons name the rejected value, so they are grouped by where the rows were rejected; the
        quality report shows at most `limit` groups (the counts by step stay complete).
        """
        counts: Counter[tuple[str, str | None]] = Counter()
        examples: dict[tuple[str, str | None], str] = {}
        for record in self._records:
            key = (record.step, record.field)
            counts[key] += 1
            examples.setdefault(key, record.reason)
        return [
            {"step": step, "field": field_name, "rows": rows, "example": examples[(step, field_name)]}
            for (step, field_name), rows in counts.most_common(limit)
        ]

    def to_table(self) -> pa.Table:
        return pa.Table.from_pylist([record.__dict__ for record in self._records], schema=QUARANTINE_SCHEMA)


class CountsInvariantError(AssertionError):
    """Rows were lost or invented between reading and loading: a bug in a step, never bad input."""


@dataclass
class RowCounts:
    """What happened to every record read, by step; `check` proves that they add up."""

    read: int = 0
    loaded: int = 0
    filtered: dict[str, int] = field(default_factory=dict)
    quarantined: dict[str, int] = field(default_factory=dict)
    # Per aggregate step: {"input_rows": N, "groups": G}; N - G rows were merged into the groups.
    aggregated: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def filtered_total(self) -> int:
        return sum(self.filtered.values())

    @property
    def merged_into_groups(self) -> int:
        return sum(step["input_rows"] - step["groups"] for step in self.aggregated.values())

    def add_aggregated(self, step: str, input_rows: int, groups: int) -> None:
        self.aggregated[step] = {"input_rows": input_rows, "groups": groups}

    @property
    def quarantined_total(self) -> int:
        return sum(self.quarantined.values())

    def add_filtered(self, step: str, count: int) -> None:
        if count:
            self.filtered[step] = self.filtered.get(step, 0) + count

    def check(self) -> RowCounts:
        accounted = self.loaded + self.filtered_total + self.quarantined_total + self.merged_into_groups
        if self.read != accounted:
            merged = f" + merged into groups ({self.merged_into_groups})" if self.aggregated else ""
            raise CountsInvariantError(
                f"rows read ({self.read}) != loaded ({self.loaded}) + filtered ({self.filtered_total}) "
                f"+ quarantined ({self.quarantined_total}){merged}"
            )
        return self

    def as_metadata(self) -> dict[str, int]:
        counts = {
            "rows_read": self.read,
            "rows_loaded": self.loaded,
            "rows_filtered": self.filtered_total,
            "rows_quarantined": self.quarantined_total,
        }
        if self.aggregated:
            counts["rows_merged_into_groups"] = self.merged_into_groups
        return counts
