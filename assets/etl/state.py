"""Incremental sync state: the cursor value a pipeline has published up to, kept in its target.

The state lives where the data lives, and commits with it (dlt keeps its state in the destination
the same way): on a SQL target a row of ``_junction_state`` (one per pipeline), written by
`SqlTarget.publish` inside the publish transaction; on a Parquet target the file's schema metadata,
written in the same atomic rename as the rows. A run that fails anywhere before the publish commits -
a source error, a blocking check, a publish error, SIGKILL - leaves the state where it was, so the
next run reads the same range again: nothing is lost, and the merge by key makes the re-read
idempotent.

A run reads from the *start*: the state's last value minus `lag` (or the spec's `initial` on the
first run). The source is asked for that range where it can be (a SQL source's WHERE, a REST
source's templated `params`), and `IncrementalStep`, the first step of the run, keeps exactly the
records at or past the start (past the last value for an append without lag) and before `end`,
counting the others as filtered at ``incremental``, and tracks the largest cursor value read: the
value the publish then commits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from assets.etl.quarantine import Batch, Quarantine, RowCounts
from assets.etl.spec import IncrementalSpec
from assets.etl.transforms import Step
from orchestration.errors import JunctionError
from orchestration.kernel.times import parse_duration, parse_instant

__all__ = [
    "FILES_CURSOR",
    "INCREMENTAL_STEP",
    "STATE_TABLE",
    "CursorState",
    "IncrementalStep",
    "IncrementalWindow",
    "RunWindow",
    "cursor_text",
    "parse_cursor",
]

STATE_TABLE = "_junction_state"
# The state of a source incremental by file: {path: print} of the files published so far.
FILES_CURSOR = "files"
INCREMENTAL_STEP = "incremental"
PARQUET_STATE_KEY = b"junction_state"


@dataclass(frozen=True)
class CursorState:
    """What a publish commits: the pipeline, its cursor field and the value it has read up to."""

    pipeline: str
    cursor: str
    value: Any  # a number, or an ISO 8601 text (UTC, `Z`)
    run_id: str | None = None
    updated_at: str | None = None
    # When a full read last compared the source's keys with the target's (`load.deletes.detect`).
    full_compare_at: str | None = None

    def as_json(self) -> str:
        return json.dumps(
            {
                "pipeline": self.pipeline,
                "cursor": self.cursor,
                "value": self.value,
                "run_id": self.run_id,
                "updated_at": self.updated_at or now_text(),
                "full_compare_at": self.full_compare_at,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> CursorState:
        data = json.loads(text)
        return cls(
            data["pipeline"],
            data["cursor"],
            data["value"],
            data.get("run_id"),
            data.get("updated_at"),
            data.get("full_compare_at"),
        )


def now_text() -> str:
    return cursor_text(datetime.now(UTC))


def cursor_text(value: Any) -> Any:
    """A cursor value as the state and templates hold it: numbers as they are, times as ISO 8601 UTC."""
    if isinstance(value, datetime):
        moment = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return moment.isoformat().replace("+00:00", "Z")
    return value


def parse_cursor(value: Any, kind: str) -> Any:
    """A cursor value (from the spec, the state or `--to`) as a number or an aware datetime."""
    if kind == "number":
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
        try:
            return int(value) if str(value).lstrip("-").isdigit() else float(value)
        except (TypeError, ValueError):
            raise JunctionError(f"{value!r} is not a number (the cursor holds numbers)") from None
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    moment = parse_instant(str(value))
    if moment is None:
        raise JunctionError(f"{value!r} is not an ISO 8601 date or time (the cursor holds times)")
    return moment


@dataclass(frozen=True)
class IncrementalWindow:
    """The range one run reads: from `start` (inclusive, or exclusive when `strict`) to `end`.

    A `full` window reads from `initial` whatever the last value (a full compare of the keys for
    delete detection); the cursor still moves on from the last value, never back."""

    pipeline: str
    spec: IncrementalSpec
    last_value: Any | None  # parsed; None on the first run
    strict: bool  # an append without lag: records equal to the last value were published already
    full: bool = False

    @classmethod
    def of(
        cls,
        pipeline: str,
        spec: IncrementalSpec,
        state: CursorState | None,
        mode: str,
        full: bool = False,
    ) -> IncrementalWindow:
        last = None
        if state is not None:
            if state.cursor != spec.cursor:
                raise JunctionError(
                    f"the target's state of {pipeline!r} follows cursor {state.cursor!r}, the spec says "
                    f"{spec.cursor!r}: reset it (junction pipelines state reset {pipeline})"
                )
            last = parse_cursor(state.value, spec.kind)
        strict = mode == "append" and not spec.lag and last is not None and not full
        return cls(pipeline, spec, last, strict=strict, full=full)

    @property
    def start(self) -> Any:
        if self.last_value is None or self.full:
            return parse_cursor(self.spec.initial, self.spec.kind)
        lag = self.spec.lag
        if not lag:
            return self.last_value
        if isinstance(lag, str):
            delta = parse_duration(lag)
            assert delta is not None  # checked by the spec
            return self.last_value - delta
        return self.last_value - lag

    @property
    def end(self) -> Any | None:
        return None if self.spec.end is None else parse_cursor(self.spec.end, self.spec.kind)

    def template_values(self) -> dict[str, Any]:
        """`incremental.*` in a source's templates (an absent end or last value is empty text, and a
        query parameter rendering to empty text is left out of the request)."""
        values = {
            "cursor": self.spec.cursor,
            "start": cursor_text(self.start),
            "end": cursor_text(self.end),
            "last_value": cursor_text(self.last_value),
            "initial": self.spec.initial,
        }
        return {name: "" if value is None else value for name, value in values.items()}

    def as_metadata(self) -> dict[str, Any]:
        return {
            "cursor": self.spec.cursor,
            "before": cursor_text(self.last_value),
            "start": cursor_text(self.start),
            "end": cursor_text(self.end),
            "full": self.full,
        }


@dataclass(frozen=True)
class RunWindow:
    """The span of time a run stands for (`run.*` in a REST source's templates): it ends at the
    schedule tick that launched the run (Dagster's scheduled-execution-time tag), or at the run's
    start for a run launched by hand or by a sensor; it starts at the spec's cron tick before that end,
    so a daily schedule's run covers the day before its tick. Without a schedule there is no start
    (empty text: a query parameter left out)."""

    run_id: str
    start: datetime | None
    end: datetime

    @classmethod
    def of(
        cls,
        run_id: str,
        run_tags: dict[str, str],
        schedule: str | None,
        timezone: str | None,
        now: datetime | None = None,
    ) -> RunWindow:
        from dagster._core.storage.tags import SCHEDULED_EXECUTION_TIME_TAG
        from dagster._utils.schedules import reverse_cron_string_iterator

        tick = run_tags.get(SCHEDULED_EXECUTION_TIME_TAG)
        end = parse_instant(tick) if tick else None
        end = (end or now or datetime.now(UTC)).astimezone(UTC)
        start = None
        if schedule:
            # The tick strictly before the end: a run on its own tick covers the interval up to it.
            previous = reverse_cron_string_iterator(end.timestamp() - 1, schedule, timezone or "UTC")
            start = next(previous).astimezone(UTC)
        return cls(run_id, start, end)

    def template_values(self) -> dict[str, Any]:
        return {
            "id": self.run_id,
            "start": "" if self.start is None else cursor_text(self.start),
            "end": cursor_text(self.end),
        }


class IncrementalStep(Step):
    """Keeps the window's records; tracks the largest cursor value kept (`after`)."""

    def __init__(self, window: IncrementalWindow):
        super().__init__(INCREMENTAL_STEP)
        self.window = window
        self.after: Any | None = window.last_value
        self.kept = 0

    def _values(self, batch: Batch, quarantine: Quarantine) -> tuple[Batch, pa.ChunkedArray]:
        """The batch's rows with a usable cursor value, and those values (numbers, or UTC times)."""
        cursor = self.window.spec.cursor
        if cursor not in batch.table.column_names:
            raise JunctionError(
                f"incremental.cursor: the records have no field {cursor!r} "
                f"(they have {', '.join(batch.table.column_names) or 'no fields'})"
            )
        column = batch.table.column(cursor)
        if self.window.spec.kind == "number":
            if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
                column = _to_numbers(column)
        else:
            column = _to_times(column)
        bad = pc.is_null(column)
        if pc.any(bad).as_py():
            indices = pc.indices_nonzero(bad).to_pylist()
            quarantine.add_rows(
                batch,
                indices,
                INCREMENTAL_STEP,
                cursor,
                [f"no usable {self.window.spec.kind} in the cursor field"] * len(indices),
            )
            keep = pc.invert(bad)
            return batch.filter(keep), column.filter(keep)
        return batch, column

    def apply(self, batch: Batch, quarantine: Quarantine, counts: RowCounts) -> Batch:
        batch, values = self._values(batch, quarantine)
        start, end = self.window.start, self.window.end
        start_scalar = pa.scalar(start, values.type)
        keep = (
            pc.greater(values, start_scalar) if self.window.strict else pc.greater_equal(values, start_scalar)
        )
        if end is not None:
            keep = pc.and_(keep, pc.less(values, pa.scalar(end, values.type)))
        kept = batch.filter(keep)
        counts.add_filtered(INCREMENTAL_STEP, batch.num_rows - kept.num_rows)
        if kept.num_rows:
            largest = pc.max(values.filter(keep)).as_py()
            if isinstance(largest, datetime) and largest.tzinfo is None:
                largest = largest.replace(tzinfo=UTC)
            self.after = largest if self.after is None else max(self.after, largest)
            self.kept += kept.num_rows
        return kept

    def summary(self) -> dict[str, Any]:
        """The window and what was read of it (run metadata `incremental`; `after` is committed)."""
        return {**self.window.as_metadata(), "after": cursor_text(self.after), "records_in_window": self.kept}


def _to_numbers(column: pa.ChunkedArray) -> pa.ChunkedArray:
    try:
        return pc.cast(column, pa.float64())
    except pa.ArrowInvalid:
        values = []
        for value in column.to_pylist():
            try:
                values.append(float(value))
            except (TypeError, ValueError):
                values.append(None)
        return pa.chunked_array([pa.array(values, pa.float64())])


def _to_times(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Times in UTC: aware ones converted, naive ones read as UTC, ISO 8601 text parsed (Arrow's
    parser first; per value, with the stdlib, only when it refuses the column)."""
    utc = pa.timestamp("us", "UTC")
    if pa.types.is_timestamp(column.type):
        if column.type.tz is None:
            return pc.assume_timezone(pc.cast(column, pa.timestamp("us")), "UTC")
        return pc.cast(column, utc)
    if pa.types.is_date(column.type):
        return pc.assume_timezone(pc.cast(pc.cast(column, pa.date32()), pa.timestamp("us")), "UTC")
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        try:
            return pc.cast(column, utc)
        except pa.ArrowInvalid:
            pass
    parsed = []
    for value in column.to_pylist():
        moment = parse_instant(value) if isinstance(value, str) else None
        parsed.append(moment)
    return pa.chunked_array([pa.array(parsed, utc)])
