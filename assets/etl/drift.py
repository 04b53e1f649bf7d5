"""Schema drift: the run's clean rows against the target's current schema, handled per the contract.

The target's current schema is what the previous run left: the SQL table's columns or the Parquet/CSV
file's schema (`Target.current_schema`); on the first run there is nothing to compare. Columns are
compared by name and by *kind* of value (integer, floating, decimal, boolean, string, date, timestamp,
...), not by width: an int32 arriving for a BIGINT column is no drift. Two kinds are also accepted
without drift, and cast to the target's type: a column whose values are all null in a batch (Arrow
cannot tell its type) and integers arriving for a floating or decimal column.

``contract.drift`` decides what happens, as dlt's schema contracts do:

============== ============================== ================================ ===========================
policy         added column                   removed column                   retyped column
============== ============================== ================================ ===========================
evolve         kept; added to the target on   kept in the target, null in the  the values go to a variant
               publish (same transaction)     new rows                         column ``<name>__v_<kind>``
                                                                               (added), ``<name>`` is null
freeze         the run fails before anything is staged or published, naming every drifted column
discard_row    rows holding a value in it     null in the new rows             rows holding a value in it
               are quarantined (step                                           are quarantined
               ``contract.drift``)
discard_value  its values are dropped (rows   null in the new rows             its values are dropped
               kept), counted in metadata                                      (null), counted
============== ============================== ================================ ===========================

The policy runs as the last transform step (`SchemaDriftStep`), so quarantined rows keep their source
position and the counts invariant holds; what it found (`SchemaDrift`) goes into the staged asset's
metadata (``schema_drift``) and the quality summary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from assets.etl.quarantine import Batch, Quarantine, RowCounts
from assets.etl.transforms import Step
from orchestration.errors import JunctionError

__all__ = ["DRIFT_STEP", "SchemaDrift", "SchemaDriftError", "SchemaDriftStep", "value_kind"]

DRIFT_STEP = "contract.drift"


def value_kind(data_type: pa.DataType) -> str:
    """The kind of value a column holds; drift is a change of kind, not of width or time zone."""
    checks: list[tuple[Callable[[pa.DataType], bool], str]] = [
        (pa.types.is_null, "null"),
        (pa.types.is_boolean, "boolean"),
        (pa.types.is_integer, "integer"),
        (pa.types.is_floating, "floating"),
        (pa.types.is_decimal, "decimal"),
        (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "string"),
        (lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t), "binary"),
        (pa.types.is_timestamp, "timestamp"),
        (pa.types.is_date, "date"),
        (pa.types.is_time, "time"),
        (pa.types.is_dictionary, "string"),
    ]
    for test, kind in checks:
        if test(data_type):
            return kind
    return str(data_type)


def _fits(incoming: str, current: str) -> bool:
    """Whether values of kind `incoming` go into a column of kind `current` without drift."""
    return (
        incoming == current
        or incoming == "null"
        or (incoming == "integer" and current in ("floating", "decimal"))
    )


class SchemaDriftError(JunctionError):
    """`contract.drift: freeze` and the data's columns differ from the target's."""

    def __init__(self, message: str, drift: SchemaDrift):
        super().__init__(message)
        self.drift = drift


@dataclass
class SchemaDrift:
    """The drift found over a run (every batch), and what the policy did about it."""

    policy: str
    target: str
    added: dict[str, str] = field(default_factory=dict)  # column -> incoming type
    removed: dict[str, str] = field(default_factory=dict)  # column -> the target's type
    retyped: dict[str, dict[str, str]] = field(default_factory=dict)  # column -> {target, incoming}
    variants: dict[str, str] = field(default_factory=dict)  # column -> its variant column (evolve)
    rows_quarantined: int = 0
    values_discarded: dict[str, int] = field(default_factory=dict)

    @property
    def found(self) -> bool:
        return bool(self.added or self.removed or self.retyped)

    def describe(self) -> list[str]:
        return [
            *(f"added column {name!r} ({kind})" for name, kind in self.added.items()),
            *(f"removed column {name!r} ({kind})" for name, kind in self.removed.items()),
            *(
                f"retyped column {name!r} ({types['target']} -> {types['incoming']})"
                for name, types in self.retyped.items()
            ),
        ]

    def as_metadata(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "added": self.added,
            "removed": self.removed,
            "retyped": self.retyped,
            "variant_columns": self.variants,
            "rows_quarantined": self.rows_quarantined,
            "values_discarded": self.values_discarded,
        }

    def markdown(self) -> str:
        if not self.found:
            return f"**Schema drift** ({self.policy}): none against {self.target}."
        lines = [
            f"**Schema drift** ({self.policy}) against {self.target}:",
            "",
            "| column | change | target | incoming | handled |",
            "|---|---|---|---|---|",
        ]
        handled = {
            "evolve": "added to the target",
            "discard_row": "rows with values quarantined",
            "discard_value": "values dropped",
            "freeze": "run failed",
        }[self.policy]
        for name, kind in self.added.items():
            lines.append(f"| {name} | added | - | {kind} | {handled} |")
        for name, kind in self.removed.items():
            outcome = "run failed" if self.policy == "freeze" else "kept, null in new rows"
            lines.append(f"| {name} | removed | {kind} | - | {outcome} |")
        for name, types in self.retyped.items():
            outcome = f"values in {self.variants[name]}" if name in self.variants else handled
            lines.append(f"| {name} | retyped | {types['target']} | {types['incoming']} | {outcome} |")
        if self.rows_quarantined:
            lines += ["", f"{self.rows_quarantined:,} rows quarantined at {DRIFT_STEP}."]
        if self.values_discarded:
            dropped = ", ".join(f"{name}: {count:,}" for name, count in self.values_discarded.items())
            lines += ["", f"Values discarded: {dropped}."]
        return "\n".join(lines)


def _cast_or_null(values: pa.ChunkedArray | pa.Array, data_type: pa.DataType) -> pa.ChunkedArray | pa.Array:
    try:
        return pc.cast(values, data_type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return values


class SchemaDriftStep(Step):
    """The contract's drift policy against the target's current schema, as the last transform step.

    `stored_kind` says which kind a value has once stored in the target (SQLite keeps dates and
    timestamps as text); `ignored` names bookkeeping columns (the load id) that are never drift.
    """

    def __init__(
        self,
        policy: str,
        current: pa.Schema,
        target: str,
        *,
        stored_kind: Callable[[pa.DataType], str] = value_kind,
        ignored: tuple[str, ...] = (),
    ):
        super().__init__(DRIFT_STEP)
        self.policy = policy
        self.current = {f.name: f.type for f in current if f.name not in ignored}
        self.stored_kind = stored_kind
        self.drift = SchemaDrift(policy, target)

    def apply(self, batch: Batch, quarantine: Quarantine, counts: RowCounts) -> Batch:
        table = batch.table
        added = [f for f in table.schema if f.name not in self.current]
        removed = [name for name in self.current if name not in table.column_names]
        retyped = [
            f
            for f in table.schema
            if f.name in self.current
            and not _fits(self.stored_kind(f.type), value_kind(self.current[f.name]))
        ]
        for f in added:
            self.drift.added.setdefault(f.name, str(f.type))
        for name in removed:
            self.drift.removed.setdefault(name, str(self.current[name]))
        for f in retyped:
            self.drift.retyped.setdefault(
                f.name, {"target": str(self.current[f.name]), "incoming": str(f.type)}
            )
        if self.policy == "freeze" and (added or removed or retyped):
            raise SchemaDriftError(
                f"{DRIFT_STEP}: the data's columns differ from {self.drift.target} and the contract says "
                f"freeze: {'; '.join(self.drift.describe())}",
                self.drift,
            )
        drifted = {f.name for f in added} | {f.name for f in retyped}
        if self.policy == "discard_row" and drifted:
            batch = self._quarantine_rows(
                batch, [f.name for f in table.schema if f.name in drifted], quarantine
            )
            table = batch.table
        if self.policy == "discard_value":
            for name in drifted:
                dropped = len(table.column(name)) - table.column(name).null_count
                if dropped:
                    self.drift.values_discarded[name] = self.drift.values_discarded.get(name, 0) + dropped
        if self.policy == "evolve":
            for f in retyped:
                variant = f"{f.name}__v_{self.stored_kind(f.type)}"
                self.drift.variants[f.name] = variant
                index = table.column_names.index(f.name)
                table = table.set_column(index, variant, table.column(index))
        else:
            table = table.drop_columns([f.name for f in added])
        return batch.with_table(self._conform(table))

    def _quarantine_rows(self, batch: Batch, columns: list[str], quarantine: Quarantine) -> Batch:
        """Rows holding a value in a drifted column go to quarantine, named by the first such column."""
        table = batch.table
        claimed = pa.array([False] * table.num_rows)
        for name in columns:
            holds = pc.and_(pc.is_valid(table.column(name).combine_chunks()), pc.invert(claimed))
            indices = pc.indices_nonzero(holds).to_pylist()
            if indices:
                if name in self.drift.added:
                    reason = f"column {name!r} is not in {self.drift.target} (contract.drift: discard_row)"
                else:
                    types = self.drift.retyped[name]
                    reason = (
                        f"{types['incoming']} value for a {types['target']} column of {self.drift.target} "
                        "(contract.drift: discard_row)"
                    )
                quarantine.add_rows(batch, indices, DRIFT_STEP, name, [reason] * len(indices))
                self.drift.rows_quarantined += len(indices)
            claimed = pc.or_(claimed, pc.fill_null(holds, False))
        return batch.filter(pc.invert(claimed))

    def _conform(self, table: pa.Table) -> pa.Table:
        """Columns the target has take its type: missing ones as nulls, fitting ones cast, others nulled."""
        for name, data_type in self.current.items():
            if name not in table.column_names:
                table = table.append_column(pa.field(name, data_type), pa.nulls(table.num_rows, data_type))
                continue
            index = table.column_names.index(name)
            column = table.column(index)
            if column.type == data_type:
                continue
            if _fits(self.stored_kind(column.type), value_kind(data_type)):
                table = table.set_column(index, pa.field(name, data_type), _cast_or_null(column, data_type))
            elif self.stored_kind(column.type) != value_kind(data_type):
                # A retyped column whose values were quarantined, dropped or moved to a variant.
                table = table.set_column(
                    index, pa.field(name, data_type), pa.nulls(table.num_rows, data_type)
                )
        return table
