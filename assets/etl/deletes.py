"""Delete detection for merge loads (`load.deletes`): what a run learns is gone, and how the publish
applies it.

Two ways to learn it. **Soft**: the source's own tombstones, records matching a condition (`status ==
deleted`); `MarkTombstones`, a load step after the drift check, gives every staged row a
`_junction_deleted_at` column (the read time on tombstones, null on live records), so the staging
place - the only thing that survives from the staged step to the publish, which may run in another
run - says which keys are gone. **Full compare**: a run that reads everything (every run without
`incremental`; once per `every` with it, from `initial`) stages every live key; the publish then
treats target keys missing from the staged rows as deleted.

The publish (`SqlTarget.publish` in its transaction; `FileTarget.publish` in Arrow, written in its one
atomic rename; either way deletes commit with the rows and the cursor) deletes those target rows (`mode: delete`) or sets their `_junction_deleted_at` (`mode: flag`; a
flagged key that comes back live is un-flagged by the merge). Tombstones are never inserted.

A full compare never deletes on doubt: when the read quarantined records (their keys are unknown) or
read nothing at all (unless `source.allow_empty`), the compare is skipped with the reason in the
run's metadata, and the next run compares again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from assets.etl.quarantine import Batch, Quarantine, RowCounts
from assets.etl.spec import DeletesSpec
from assets.etl.state import CursorState
from assets.etl.transforms import Step
from orchestration.kernel import conditions
from orchestration.kernel.times import parse_duration, parse_instant

__all__ = [
    "DELETED_AT_COLUMN",
    "DELETES",
    "DeletePlan",
    "MarkTombstones",
    "full_compare_due",
    "plan_of",
]

DELETED_AT_COLUMN = "_junction_deleted_at"
DELETES_STEP = "load.deletes"
DELETES = "deletes"  # the staged materialization's metadata: what the publish is to apply
_DELETED_AT_TYPE = pa.timestamp("us", "UTC")


class MarkTombstones(Step):
    """Adds `_junction_deleted_at`: the read time where the soft condition holds, else null.

    Only where the column is needed: a soft condition to mark, or `mode: flag` (live rows carry a
    null, which un-flags a key that comes back)."""

    def __init__(self, deletes: DeletesSpec, read_at: datetime):
        super().__init__(DELETES_STEP)
        self.condition = deletes.soft
        self.read_at = read_at
        self.tombstones = 0

    def apply(self, batch: Batch, quarantine: Quarantine, counts: RowCounts) -> Batch:
        table = batch.table
        if self.condition is None:
            values = pa.nulls(table.num_rows, _DELETED_AT_TYPE)
        else:
            gone = conditions.evaluate_table(self.condition.tree, table)
            self.tombstones += pc.sum(gone).as_py() or 0
            values = pc.if_else(
                gone, pa.scalar(self.read_at, _DELETED_AT_TYPE), pa.scalar(None, _DELETED_AT_TYPE)
            )
        if DELETED_AT_COLUMN in table.column_names:
            table = table.drop_columns([DELETED_AT_COLUMN])
        return batch.with_table(table.append_column(DELETED_AT_COLUMN, values))

    def report(self) -> dict[str, Any] | None:
        return {"tombstones": self.tombstones} if self.condition is not None else None


def needs_marks(deletes: DeletesSpec | None) -> bool:
    return deletes is not None and (deletes.soft is not None or deletes.mode == "flag")


def full_compare_due(deletes: DeletesSpec | None, incremental: bool, state: CursorState | None) -> bool:
    """Whether this run reads everything to compare keys: always without incremental, else on the
    first run and once `every` has passed since the last compare that ran."""
    if deletes is None or deletes.detect != "full_compare":
        return False
    if not incremental or state is None or state.full_compare_at is None:
        return True
    every = parse_duration(deletes.every or "0s")
    last = parse_instant(state.full_compare_at)
    return every is None or last is None or datetime.now(UTC) - last >= every


@dataclass(frozen=True)
class DeletePlan:
    """What one publish applies (from the staged run's `deletes` metadata)."""

    mode: str  # delete | flag
    soft: bool  # the staged rows carry tombstone marks
    full_compare: bool  # target keys missing from the staged rows are gone


def plan_of(deletes: DeletesSpec | None, staged: dict[str, Any] | None) -> DeletePlan | None:
    """The plan for a publish: the spec's mode, what the staged run read (a full compare only when
    it ran and was not skipped)."""
    if deletes is None:
        return None
    recorded = staged or {}
    return DeletePlan(
        mode=deletes.mode,
        soft=deletes.soft is not None,
        full_compare=bool(recorded.get("full_compare")) and not recorded.get("skipped"),
    )
