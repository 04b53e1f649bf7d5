"""Transform steps, vectorised over Arrow: each step takes a `Batch` and returns the rows that go on.

Rows leave a batch in exactly two ways, and both are accounted for: *filtered* (a `filter` condition
does not match, a duplicate key) is counted per step in `RowCounts.filtered`; *quarantined* (a value
that does not cast) is stored in the `Quarantine` with its position, step, field and reason.

Steps
-----
select, rename, map
    Arrow column operations; `map` looks values up with `pyarrow.compute.index_in`, comparing as text.
cast
    `pyarrow.compute.cast` with Arrow's safe checks (no overflow, truncation or unparseable text).
    When a column does not cast as a whole, the failing rows are found vectorised: values that do not
    look like the target (an RE2 test over the column for numbers, timestamps and dates) are tried
    once per distinct value, and the rest is bisected - cast halves until the failing values are
    isolated - so a batch with k bad values costs about k·log(n) small casts, and a clean batch
    exactly one. Failing rows are quarantined with the field and Arrow's reason (a row once, for the
    first field that fails); the rest of the batch goes on, filtered once per batch.
cleanse
    Per string field, in this order: trim, null tokens -> null, regex replacements (RE2, ``\\1`` for
    groups), case; then `defaults` fill the nulls of any field.
derive
    Kernel expressions (`orchestration.kernel.expressions.evaluate_table`), one new or replaced column
    each, in order (a later field may use an earlier one).
filter
    Keeps the rows matching a kernel condition (`orchestration.kernel.conditions.evaluate_table`).
dedupe
    By key, keeping the first or the last row of each key, across all batches. ``keep: first`` streams
    and holds only the keys already seen (an Arrow table, probed with a hash join per batch, so its
    cost grows with the number of distinct keys). ``keep: last`` must see the whole input
    before it knows which row is last, so it **holds every row in memory** until the input ends; for
    large inputs, dedupe in the target database instead (merge load) or keep the first. Within a
    batch a null key is one key; across batches null keys never match (Arrow's hash join), so rows
    with a null key may survive once per batch.
python
    A function by dotted path (``package.module:function``) called with the batch as an Arrow table
    (or a pandas DataFrame with ``frame: pandas``; pandas is imported only then) and returning the
    same kind. It may drop rows (counted as filtered; the remaining rows' positions are then unknown)
    but not add any.

enrich
    A lookup join (`pyarrow.Table.join`, left outer) against a file, SQL or another pipeline's
    published asset, on key fields. The lookup is read once per run, on the first batch, and **held
    in memory** (its null keys dropped: they match nothing); a key found twice in it fails the run
    (``lookup_duplicates: error``) or keeps its first row (``first``). Only the keys and a row index
    go through the join, and the rows are put back in their order, so positions stay aligned. The
    lookup's key columns are cast to the data's key types (CSV lookups read as strings). Rows without
    a match are kept (added columns null), dropped (counted as filtered) or quarantined with the
    reason ``no match in <lookup> for key=…``. Null keys never match.
aggregate
    Group by fields with count/sum/mean/min/max/first/last (`pyarrow.Table.group_by`, single-threaded
    so that first/last follow input order); groups come out in order of their first row. It **holds its
    whole input in memory** (only the fields it needs) until the input ends, then releases one row
    per group; `RowCounts.aggregated` records N input rows -> G groups, and the N - G rows merged
    into groups are the fourth term of the counts invariant.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from assets.etl.quarantine import Batch, Quarantine, RowCounts
from assets.etl.spec import (
    AggregateStep,
    CleanseStep,
    CompiledCondition,
    CompiledExpression,
    DedupeStep,
    EnrichStep,
    MapStep,
    PythonStep,
    TransformStep,
    parse_arrow_type,
)
from orchestration.errors import JunctionError
from orchestration.kernel import conditions, expressions
from orchestration.kernel.imports import resolve_callable

__all__ = ["Step", "TransformError", "build_steps", "cast_column"]

# Arrow's text-to-number parsing; values not matching are tried one at a time (see `cast_column`).
_INTEGER_TEXT = r"^[+-]?[0-9]+$"
_FLOAT_TEXT = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$|^(?i:[+-]?(inf|infinity|nan))$"
# The ISO 8601 shapes Arrow's text-to-timestamp cast accepts (a zone only for zoned targets).
_DATE_TEXT = r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
_TIMESTAMP_TEXT = _DATE_TEXT + r"([T ]([01][0-9]|2[0-3])(:[0-5][0-9](:[0-5][0-9](\.[0-9]+)?)?)?)?"
_ZONE_TEXT = r"(Z|[+-][0-9]{2}(:?[0-9]{2})?)"
_MOST_TRIED_ONE_BY_ONE = 1_000  # distinct suspect values; more and the column is bisected instead
_INDEX = "__junction_index"


class TransformError(JunctionError):
    """A step cannot run on this data at all (a missing column, an impossible cast): the run fails."""


class Step(ABC):
    """One transform. `apply` handles a batch; `finish` releases what the step held back (dedupe last)."""

    def __init__(self, name: str):
        self.name = name  # "transforms[2].cast": the spec location, used for counts and quarantine

    @abstractmethod
    def apply(self, batch: Batch, quarantine: Quarantine, counts: RowCounts) -> Batch: ...

    def finish(self, quarantine: Quarantine, counts: RowCounts) -> list[Batch]:
        return []

    def report(self) -> dict[str, Any] | None:
        """What the step has to say about its run beyond the counts (run metadata), if anything."""
        return None

    def require(self, table: pa.Table, fields: list[str]) -> None:
        missing = [name for name in fields if name not in table.column_names]
        if missing:
            raise TransformError(
                f"{self.name}: no field {', '.join(map(repr, missing))} "
                f"(the data has {', '.join(table.column_names) or 'no fields'})"
            )


class Select(Step):
    def __init__(self, name: str, fields: list[str]):
        super().__init__(name)
        self.fields = fields

    def apply(self, batch: Batch, quarantine: Quarantine, counts: RowCounts) -> Batch:
        self.require(batch.table, self.fields)
        return batch.with_table(batch.table.select(self.fields))


class Rename(Step):
    def __init__(self, name: str, mapping: dict[str, str]):
        super().__init__(name)
        self.mapping = mapping

    def apply(self, batch: Batch, quarantine: Quarantine, counts: RowCounts) -> Batch:
        self.require(batch.table, list(self.mapping))
        names = [self.mapping.get(column, column) for column in batch.table.column_names]
        return batch.with_table(batch.table.rename_columns(names))


def _set_column(table: pa.Table, name: str, values: pa.Array | pa.ChunkedArray) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


class MapValues(Step):
    def __init__(self, name: str, options: MapStep):
        super().__init__(name)
        self.options = options
        self.keys = pa.array([str(key) for key in options.values], pa.string())
        try:
            self.values = pa.array(list(options.values.values()))
        except (pa.ArrowException, TypeError) as exc:
            raise TransformError(f"{name}.values: the new values must share one type ({exc})") from None

    def apply(self, batch: Batch, quarantine: Quarantine, counts: RowCounts) -> Batch:
        self.require(batch.table, [self.options.field])
        column = batch.table.column(self.options.field).combine_chunks()
        positions = pc.index_in(column.cast(pa.string()), value_set=self.keys)
        mapped = pc.take(self.values, positions)
        if self.options.unmatched == "keep":
            try:
                original = column.cast(mapped.type) if column.type != mapped.type else column
            except pa.ArrowException:
                raise TransformError(
                    f"{self.name}: unmatched values of {self.options.field} ({column.type}) are kept, "
                    f"so the new values must have that type, not {mapped.type} (or set unmatched: null)"
                ) from None
            mapped = pc.if_else(pc.is_null(positions), original, mapped)
        return batch.with_table(_set_column(batch.table, self.options.to or self.options.field, mapped))


def cast_column(values: pa.Array, target: pa.DataType) -> tuple[pa.Array | None, dict[int, str]]:
    """Arrow's safe cast of a column: (cast values, {}) when every value casts, else
    (None, {index: reason}) for the failing values (`cast_valid` also gives the rest cast)."""
    cast, failures = cast_valid(values, target)
    return (None, failures) if failures else (cast, {})


def cast_valid(values: pa.Array, target: pa.DataType) -> tuple[pa.Array, dict[int, str]]:
    """Arrow's safe cast of a column with every failing value null in the result, and
    {index: reason} for the failing values. A clean column costs one cast."""
    if values.type == target:
        return values, {}
    try:
        return pc.cast(values, target, safe=True), {}
    except pa.ArrowNotImplementedError as exc:
        raise TransformError(f"cannot cast {values.type} to {target}: {exc}") from None
    except pa.ArrowInvalid:
        pass
    failures: dict[int, str] = {}
    # Equal values fail alike: each distinct value is tried once (bad values tend to repeat: "N/A").
    reasons: dict[Any, str | None] = {}

    def reason(one: pa.Array) -> str | None:
        plain = one[0].as_py()
        try:
            if plain in reasons:
                return reasons[plain]
        except TypeError:  # unhashable (a struct's dict): not remembered
            pass
        try:
            pc.cast(one, target, safe=True)
            why = None
        except pa.ArrowInvalid as exc:
            why = f"cannot cast {plain!r} to {target}: {exc}"
        try:
            reasons[plain] = why
        except TypeError:
            pass
        return why

    def bisect(part: pa.Array, offset: int) -> pa.Array | None:
        try:
            return pc.cast(part, target, safe=True)
        except pa.ArrowInvalid:
            if len(part) == 1:
                why = reason(values.slice(offset, 1))
                if why is not None:
                    failures[offset] = why
                return None
            middle = len(part) // 2
            bisect(part.slice(0, middle), offset)
            bisect(part.slice(middle), offset + middle)
            return None

    suspects = _suspects(values, target)
    if suspects is not None:
        suspect_indices = pc.indices_nonzero(suspects)
        distinct = pc.unique(values.take(suspect_indices))
        if len(distinct) > max(_MOST_TRIED_ONE_BY_ONE, len(values) // 10):
            suspects = None  # the test does not fit this column's text: bisect it all
        else:
            why_by_value = [reason(distinct.slice(at, 1)) for at in range(len(distinct))]
            failing_values = distinct.filter(pa.array([why is not None for why in why_by_value], pa.bool_()))
            if len(failing_values):
                failing = pc.and_(suspects, pc.is_in(values, value_set=failing_values))
                failing_indices = pc.indices_nonzero(failing)
                positions = pc.index_in(values.take(failing_indices), value_set=distinct).to_pylist()
                failures.update(
                    zip(failing_indices.to_pylist(), [why_by_value[at] for at in positions], strict=True)
                )
    values_left = values if suspects is None else pc.if_else(suspects, pa.scalar(None, values.type), values)
    cast_left = bisect(values_left, 0)
    if cast_left is not None and suspects is not None and len(failures) == pc.sum(suspects).as_py():
        return cast_left, failures  # the suspects were exactly the failing values: already null
    mask = np.zeros(len(values), dtype=bool)
    mask[list(failures)] = True
    return pc.cast(pc.if_else(pa.array(mask), pa.scalar(None, values.type), values), target), failures


def _suspects(values: pa.Array, target: pa.DataType) -> pa.Array | None:
    """Text values that do not look like the target type (None: no cheap test applies). Only a
    shortcut: suspects are tried one distinct value at a time, the rest bisected, so a pattern that
    is too strict or too loose costs time, never a wrong answer."""
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        return None
    if pa.types.is_integer(target):
        pattern = _INTEGER_TEXT
    elif pa.types.is_floating(target):
        pattern = _FLOAT_TEXT
    elif pa.types.is_timestamp(target):
        pattern = _TIMESTAMP_TEXT + (_ZONE_TEXT if target.tz else "") + "$"
    elif pa.types.is_date(target):
        pattern = _DATE_TEXT + "$"
    else:
        return None
    if pattern is _INTEGER_TEXT:
        # Plain digits match the pattern: only the rest (signs, junk) goes through RE2, ~6x slower.
        digits = pc.fill_null(pc.ascii_is_decimal(values), False)
        rest = pc.indices_nonzero(pc.invert(digits))
        rest_wrong = pc.invert(
            pc.fill_null(pc.match_substring_regex(values.take(rest), pattern=pattern), False)
        )
        wrong = np.zeros(len(values), dtype=bool)
        wrong[rest.to_numpy()] = rest_wrong.to_numpy(zero_copy_only=False)
        return pc.and_(pc.is_valid(values), pa.array(wrong))
    looks_right = pc.match_substring_regex(values, pattern=pattern)
    return pc.and_(pc.is_valid(values), pc.invert(pc.fill_null(looks_right, False)))


class Cast(Step):
    def __init__(self, name: str, types: dict[str, str]):
        super().__init__(name)
        self.types = {field: parse_arrow_type(type_name) for field, type_name in types.items()}

    def apply(self, batch: Batch, quarantine: Quarantine, counts: RowCounts) -> Batch:
        self.require(batch.table, list(self.types))
        # Every field is cast over the whole batch and the rejected rows leave in one filter at the
        # end; a row is quarantined once, for the first field (in spec order) that does not cast.
        table = batch.table
        rejected = np.zeros(batch.num_rows, dtype=bool)
        for field, target in self.types.items():
            try:
                cast, failures = cast_valid(table.column(field).combine_chunks(), target)
            except TransformError as exc:
                raise TransformError(f"{self.name}.{field}: {exc}") from None
            new = [index for index in sorted(failures) if not rejected[index]]
            if new:
                # The record shows the fields cast so far, as the rows are when this field fails.
                quarantine.add_rows(
                    batch.with_table(table), new, self.name, field, [failures[index] for index in new]
                )
                rejected[new] = True
            table = _set_column(table, field, cast)
        batch = batch.with_table(table)
        return batch.filter(pa.array(~rejected)) if rejected.any() else batch


class Cleanse(Step):
    def __init__(self, name: str, options: CleanseStep):
        super().__init__(name)
        self.options = options
        self.null_tokens = pa.array(options.null_tokens, pa.string())

    def apply(self, batch: Batch, quarantine: Quarantine, counts: RowCounts) -> Batch:
        table = batch.table
        options = self.options
        if options.fields is not None:
            self.require(table, options.fields)
            fields = options.fields
        else:
            fields = [field.name for field in table.schema if pa.types.is_string(field.type)]
        for field in fields:
            column = table.column(field)
            if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                raise TransformError(
                    f"{self.name}.fields: {field} is {column.type}; cleanse strings (before cast)"
                )
            if options.trim:
                column = pc.utf8_trim_whitespace(column)
            if len(self.null_tokens):
                is_token = pc.is_in(column, value_set=self.null_tokens.cast(column.type))
                column = pc.if_else(is_token, pa.scalar(None, column.type), column)
            for replacement in options.replace:
                column = pc.replace_substring_regex(
                    column, pattern=replacement.pattern, replacement=replacement.replacement
                )
            if options.case:
                column = {"lower": pc.utf8_lower, "upper": pc.utf8_upper, "title": pc.utf8_title}[
                    options.case
                ](column)
            table = _set_column(table, field, column)
        if options.defaults:
            self.require(table, list(options.defaults))
            for field, default in options.defaults.items():
                column = table.column(field)
                try:
                    fill = (
                        pa.scalar(default).cast(column.type)
                        if not pa.types.is_null(column.type)
                        else pa.scalar(default)
                    )
                except (pa.ArrowException, TypeError):
                    raise TransformError(
                        f"{self.name}.defaults.{field}: {default!r} is not a {column.type}"
                    ) from None
                table = _set_column(table, field, pc.fill_null(column, fill))
        return batch.with_table(table)


class Derive(Step):
    def __init__(self, name: str, fields: dict[str, CompiledExpression]):
        super().__init__(name)
        self.fields = fields

    def apply(self, batch: Batch, quarantine: Quarantine, counts: RowCounts) -> Batch:
        table = batch.table
        for field, expression in self.fields.items():
            try:
                values = expressions.evaluate_table(expression.tree, table)
            except JunctionError as exc:
                raise TransformError(f"{self.name}.{field}: {exc}") from None
            table = _set_column(table, field, values)
        return batch.with_table(table)


class Filter(Step):
    def __init__(self, name: str, condition: CompiledCondition):
        super().__init__(name)
        self.condition = condition

    def apply(self, batch: Batch, quarantine: Quarantine, counts: RowCounts) -> Batch:
        keep = conditions.evaluate_table(self.condition.tree, batch.table)
        kept = batch.filter(keep)
        counts.add_filtered(self.name, batch.num_rows - kept.num_rows)
        return kept


def _sorted_indices(indices: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(indices, pa.ChunkedArray):
        indices = indices.combine_chunks()
    return pc.take(indices, pc.sort_indices(indices))


class DedupeFirst(Step):
    def __init__(self, name: str, keys: list[str]):
        super().__init__(name)
        self.keys = keys
        self.seen: pa.Table | None = None  # the keys of every row passed on so far
        # One integer key: the keys seen as a sorted numpy array, probed by binary search, so a batch
        # costs O(b log n) instead of a hash join that rebuilds its table of all n keys seen.
        self.seen_sorted: np.ndarray | None = None
        self.seen_type: pa.DataType | None = None

    def apply(self, batch: Batch, quarantine: Quarantine, counts: RowCounts) -> Batch:
        self.require(batch.table, self.keys)
        indexed = batch.table.select(self.keys).append_column(
            _INDEX, pa.array(np.arange(batch.num_rows, dtype=np.int64))
        )
        firsts = indexed.group_by(self.keys, use_threads=False).aggregate([(_INDEX, "min")])
        firsts = firsts.rename_columns(
            [_INDEX if name == f"{_INDEX}_min" else name for name in firsts.column_names]
        )
        key_type = firsts.schema.field(self.keys[0]).type
        if self.seen is None and len(self.keys) == 1 and pa.types.is_integer(key_type):
            if self.seen_type is not None and key_type != self.seen_type:
                raise TransformError(
                    f"{self.name}: the key {self.keys[0]} is {key_type} here but was {self.seen_type} "
                    "in earlier batches (cast it in a step before)"
                )
            self.seen_type = key_type
            return self._keep(batch, self._new_by_sorted_keys(firsts), counts)
        if self.seen is not None and self.seen.num_rows:
            firsts = firsts.join(self.seen, self.keys, join_type="left anti", use_threads=False)
        new_keys = firsts.select(self.keys)
        self.seen = (
            new_keys
            if self.seen is None
            else pa.concat_tables([self.seen, new_keys], promote_options="permissive")
        )
        return self._keep(batch, firsts, counts)

    def _new_by_sorted_keys(self, firsts: pa.Table) -> pa.Table:
        """The first rows whose key is not seen yet; their keys join the seen ones. A null key never
        matches across batches, as in the hash join."""
        column = firsts.column(self.keys[0])
        valid = pc.is_valid(column).to_numpy(zero_copy_only=False)
        keys = column.fill_null(0).to_numpy()
        seen = self.seen_sorted if self.seen_sorted is not None else keys[:0]
        if len(seen):
            at = np.minimum(np.searchsorted(seen, keys), len(seen) - 1)
            new = ~(valid & (seen[at] == keys))
            firsts, keys, valid = firsts.filter(pa.array(new)), keys[new], valid[new]
        # Two sorted runs: the stable sort (timsort) merges them in linear time.
        self.seen_sorted = np.sort(np.concatenate([seen, keys[valid]]), kind="stable")
        return firsts

    def _keep(self, batch: Batch, firsts: pa.Table, counts: RowCounts) -> Batch:
        kept = batch.take(_sorted_indices(firsts.column(_INDEX)))
        counts.add_filtered(self.name, batch.num_rows - kept.num_rows)
        return kept


class DedupeLast(Step):
    def __init__(self, name: str, keys: list[str]):
        super().__init__(name)
        self.keys = keys
        self.held: list[Batch] = []

    def apply(self, batch: Batch, quarantine: Quarantine, counts: RowCounts) -> Batch:
        self.require(batch.table, self.keys)
        self.held.append(batch)
        return batch.take(pa.array([], pa.int64()))  # nothing goes on until the input ends

    def finish(self, quarantine: Quarantine, counts: RowCounts) -> list[Batch]:
        if not self.held:
            return []
        keys = pa.concat_tables(
            [batch.table.select(self.keys) for batch in self.held], promote_options="permissive"
        )
        total = keys.num_rows
        lasts = (
            keys.append_column(_INDEX, pa.array(range(total), pa.int64()))
            .group_by(self.keys, use_threads=False)
            .aggregate([(_INDEX, "max")])
        )
        winners = _sorted_indices(lasts.column(f"{_INDEX}_max"))
        counts.add_filtered(self.name, total - len(winners))
        released, offset = [], 0
        for batch in self.held:
            inside = pc.and_(pc.greater_equal(winners, offset), pc.less(winners, offset + batch.num_rows))
            local = pc.subtract(winners.filter(inside), offset)
            if len(local):
                released.append(batch.take(local))
            offset += batch.num_rows
        self.held = []
        return released


class PythonFunction(Step):
    def __init__(self, name: str, options: PythonStep):
        super().__init__(name)
        self.options = options
        self.function: Callable[..., Any] | None = None  # imported on first use: it may import pandas

    def apply(self, batch: Batch, quarantine: Quarantine, counts: RowCounts) -> Batch:
        if self.function is None:
            self.function = resolve_callable(self.options.function, TransformError)
        if self.options.frame == "pandas":
            import pandas as pd

            result = self.function(batch.table.to_pandas())
            if not isinstance(result, pd.DataFrame):
                raise TransformError(
                    f"{self.name}: {self.options.function} returned {type(result).__name__}, not a DataFrame"
                )
            table = pa.Table.from_pandas(result, preserve_index=False)
        else:
            table = self.function(batch.table)
            if not isinstance(table, pa.Table):
                raise TransformError(
                    f"{self.name}: {self.options.function} returned {type(table).__name__}, not a pyarrow.Table"
                )
        if table.num_rows > batch.num_rows:
            raise TransformError(
                f"{self.name}: {self.options.function} added rows ({batch.num_rows} -> {table.num_rows})"
            )
        if table.num_rows == batch.num_rows:
            return batch.with_table(table)
        counts.add_filtered(self.name, batch.num_rows - table.num_rows)
        unknown = pa.nulls(table.num_rows, pa.int64())
        return Batch(table, batch.source, unknown, unknown)


# Opens an enrich step's lookup source (`sources.open_source` bound to the spec's folder and upstream).
OpenLookup = Callable[[Any], Any]
_LOOKUP_ROW = "__junction_lookup_row"


class Enrich(Step):
    """Only keys and row numbers go through the join (any column type can be added, and the payload
    is not copied twice); the added columns are then taken from the lookup by its matched row."""

    def __init__(self, name: str, options: EnrichStep, open_lookup: OpenLookup | None):
        super().__init__(name)
        self.options = options
        self.open_lookup = open_lookup
        self.left_keys = list(options.on)
        self.right_keys = [f"__junction_key_{index}" for index in range(len(options.on))]
        self.keys: pa.Table | None = None  # the lookup's keys (internal names) and row numbers
        self.values: pa.Table | None = None  # the columns added, named with the prefix
        self.lookup_name = ""
        self.lookup_rows = 0
        self.matched = self.unmatched = 0

    def report(self) -> dict[str, Any] | None:
        if self.keys is None:
            return None  # no row reached the step: the lookup was never read
        return {
            "lookup": self.lookup_name,
            "lookup_rows": self.lookup_rows,
            "matched": self.matched,
            "unmatched": self.unmatched,
            "unmatched_rows": self.options.unmatched,
        }

    def _read_source(self) -> tuple[str, pa.Table]:
        """The lookup source's description and whole table (it must read cleanly)."""
        source = self.open_lookup(self.options.lookup)
        problems = Quarantine()
        tables = [batch.table for batch in source.read(problems)]
        if len(problems):
            raise TransformError(
                f"{self.name}.lookup: {len(problems)} malformed record(s) in {source.description} "
                f"(first: {next(iter(problems))}); a lookup must read cleanly"
            )
        return source.description, (
            pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})
        )

    def _read_cached(self) -> tuple[str, pa.Table]:
        """The lookup from its cache namespace, read from the source only on a miss. Kept as Arrow IPC
        (types exact) in base64, which every serializer of the cache can hold."""
        import base64
        import hashlib

        from resources.cache import open_cache

        def load() -> dict[str, str]:
            description, table = self._read_source()
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            return {
                "description": description,
                "ipc": base64.b64encode(sink.getvalue().to_pybytes()).decode(),
            }

        # The source's identity (a file's path, size and time; a table's...): a changed lookup is a new key.
        source_identity = self.open_lookup(self.options.lookup).identity()
        identity = hashlib.sha256(repr(source_identity).encode()).hexdigest()[:24]
        try:
            cache = open_cache(self.options.cache)
        except KeyError as exc:
            raise TransformError(f"{self.name}.cache: {exc.args[0]}") from None
        held = cache.get_or_set(f"enrich:{identity}", load, tags=[f"lookup:{self.name}"])
        table = pa.ipc.open_stream(base64.b64decode(held["ipc"])).read_all()
        return held["description"], table

    def _read_lookup(self) -> None:
        if self.open_lookup is None:
            raise TransformError(f"{self.name}: no way to open the lookup (run it through the runner)")
        self.lookup_name, table = self._read_cached() if self.options.cache else self._read_source()
        self.lookup_rows = table.num_rows
        keys = list(self.options.on.values())
        missing = [name for name in [*keys, *(self.options.columns or [])] if name not in table.column_names]
        if missing and table.num_rows:
            raise TransformError(
                f"{self.name}: the lookup {self.lookup_name} has no field {', '.join(map(repr, missing))} "
                f"(it has {', '.join(table.column_names)})"
            )
        if missing and self.options.columns is None:
            raise TransformError(
                f"{self.name}: the lookup {self.lookup_name} is empty, so the fields it adds are unknown; "
                "list them in columns"
            )
        if missing:  # an empty lookup: nothing matches, the listed columns come out null
            table = pa.table(
                {name: pa.nulls(0) for name in dict.fromkeys([*keys, *(self.options.columns or [])])}
            )
        has_keys = pc.is_valid(table.column(keys[0]))
        for key in keys[1:]:
            has_keys = pc.and_(has_keys, pc.is_valid(table.column(key)))
        table = self._unique_keys(table.filter(has_keys), keys)
        columns = self.options.columns or [name for name in table.column_names if name not in keys]
        self.values = pa.table({self.options.prefix + name: table.column(name) for name in columns})
        self.keys = pa.table(
            {
                **{internal: table.column(key) for internal, key in zip(self.right_keys, keys, strict=True)},
                _LOOKUP_ROW: pa.array(np.arange(table.num_rows, dtype=np.int64)),
            }
        )

    def _unique_keys(self, table: pa.Table, keys: list[str]) -> pa.Table:
        if not table.num_rows:
            return table
        grouped = (
            table.select(keys)
            .append_column(_INDEX, pa.array(np.arange(table.num_rows, dtype=np.int64)))
            .group_by(keys, use_threads=False)
            .aggregate([(_INDEX, "min"), ([], "count_all")])
        )
        if grouped.num_rows == table.num_rows:
            return table
        if self.options.lookup_duplicates == "first":
            return table.take(_sorted_indices(grouped.column(f"{_INDEX}_min")))
        repeated = grouped.filter(pc.greater(grouped.column("count_all"), 1))
        examples = ", ".join(
            f"{_key_text(row, keys)} ({row['count_all']} rows)" for row in repeated.slice(0, 3).to_pylist()
        )
        raise TransformError(
            f"{self.name}: {repeated.num_rows} key(s) occur more than once in the lookup {self.lookup_name}, "
            f"e.g. {examples}; make its keys unique or set lookup_duplicates: first"
        )

    def _keys_for(self, table: pa.Table) -> pa.Table:
        """The lookup's keys cast to the data's key types (CSV lookups are strings); cached once cast."""
        if self.keys is None:
            self._read_lookup()
        keys = self.keys
        assert keys is not None
        for left, right in zip(self.left_keys, self.right_keys, strict=True):
            wanted = table.schema.field(left).type
            current = keys.schema.field(right).type
            if current == wanted:
                continue
            try:
                cast = pc.cast(keys.column(right), wanted, safe=True)
            except pa.ArrowException as exc:
                raise TransformError(
                    f"{self.name}.on.{left}: the lookup's key {self.options.on[left]} ({current}) does not "
                    f"cast to the data's {wanted}: {exc}"
                ) from None
            keys = keys.set_column(keys.column_names.index(right), right, cast)
        self.keys = keys
        return keys

    def apply(self, batch: Batch, quarantine: Quarantine, counts: RowCounts) -> Batch:
        self.require(batch.table, self.left_keys)
        keys = self._keys_for(batch.table)
        assert self.values is not None
        clashes = [name for name in self.values.column_names if name in batch.table.column_names]
        if clashes:
            raise TransformError(
                f"{self.name}: the lookup's {', '.join(map(repr, clashes))} would replace a field of the "
                "data; set a prefix or list the columns"
            )
        probe = batch.table.select(self.left_keys).append_column(
            _INDEX, pa.array(np.arange(batch.num_rows, dtype=np.int64))
        )
        joined = probe.join(
            keys, keys=self.left_keys, right_keys=self.right_keys, join_type="left outer", use_threads=False
        )
        # The join does not keep row order; the lookup's keys are unique, so one row comes out per row.
        lookup_rows = joined.column(_LOOKUP_ROW).take(pc.sort_indices(joined.column(_INDEX))).combine_chunks()
        table = batch.table
        for name, column in zip(self.values.column_names, self.values.take(lookup_rows).columns, strict=True):
            table = table.append_column(name, column)
        enriched = batch.with_table(table)
        self.matched += batch.num_rows - lookup_rows.null_count
        self.unmatched += lookup_rows.null_count
        if self.options.unmatched == "keep" or lookup_rows.null_count == 0:
            return enriched
        matched = pc.is_valid(lookup_rows)
        unmatched = pc.indices_nonzero(pc.invert(matched)).to_pylist()
        if self.options.unmatched == "drop":
            counts.add_filtered(self.name, len(unmatched))
        else:
            rows = batch.table.select(self.left_keys).take(pa.array(unmatched, pa.int64())).to_pylist()
            reasons = [
                f"no match in {self.lookup_name} for key={_key_text(row, self.left_keys)}" for row in rows
            ]
            quarantine.add_rows(batch, unmatched, self.name, ",".join(self.left_keys), reasons)
        return enriched.filter(matched)


def _key_text(row: dict[str, Any], keys: list[str]) -> str:
    values = [row[key] for key in keys]
    return repr(values[0]) if len(values) == 1 else repr(tuple(values))


class Aggregate(Step):
    def __init__(self, name: str, options: AggregateStep):
        super().__init__(name)
        self.options = options
        self.fields = list(
            dict.fromkeys(
                [
                    *options.by,
                    *(metric.field for metric in options.metrics.values() if metric.field is not None),
                ]
            )
        )
        self.held: list[pa.Table] = []

    def apply(self, batch: Batch, quarantine: Quarantine, counts: RowCounts) -> Batch:
        self.require(batch.table, self.fields)
        self.held.append(batch.table.select(self.fields))  # only what the groups need
        return batch.take(pa.array([], pa.int64()))  # nothing goes on until the input ends

    def finish(self, quarantine: Quarantine, counts: RowCounts) -> list[Batch]:
        if not self.held:
            return []
        try:
            table = pa.concat_tables(self.held, promote_options="permissive")
        except pa.ArrowException as exc:
            raise TransformError(
                f"{self.name}: the batches do not fit one table (cast the fields): {exc}"
            ) from None
        self.held = []
        by = list(self.options.by)
        aggregations: list[tuple[Any, ...]] = []
        for metric in self.options.metrics.values():
            if metric.fn == "count" and metric.field is None:
                aggregations.append(([], "count_all"))
            elif metric.fn == "count":
                aggregations.append((metric.field, "count", pc.CountOptions(mode="only_valid")))
            else:
                aggregations.append((metric.field, metric.fn))
        # Arrow's group order is its hash table's; the first row of each group orders them as the input.
        aggregations.append((_INDEX, "min"))
        table = table.append_column(_INDEX, pa.array(np.arange(table.num_rows, dtype=np.int64)))
        try:
            grouped = table.group_by(by, use_threads=False).aggregate(aggregations)
        except pa.ArrowNotImplementedError as exc:
            kinds = ", ".join(f"{name} ({table.schema.field(name).type})" for name in self.fields)
            raise TransformError(
                f"{self.name}: a metric does not apply to its field's type: {exc} [{kinds}]"
            ) from None
        # pyarrow puts the keys first (older releases: last); the metrics keep their order.
        first = len(by) if grouped.column_names[: len(by)] == by else 0
        grouped = grouped.take(pc.sort_indices(grouped.column(first + len(self.options.metrics))))
        columns = {name: grouped.column(name) for name in by}
        for offset, name in enumerate(self.options.metrics):
            columns[name] = grouped.column(first + offset)
        result = pa.table(columns)
        counts.add_aggregated(self.name, table.num_rows, result.num_rows)
        return [Batch.from_table(result, self.name)]


def build_steps(
    transforms: list[TransformStep], prefix: str = "transforms", open_lookup: OpenLookup | None = None
) -> list[Step]:
    """The steps of a spec's `transforms:` list, each named by its location (``transforms[2].cast``);
    `open_lookup` opens enrich lookups (a spec's source section -> `sources.Source`)."""
    steps: list[Step] = []
    for index, transform in enumerate(transforms):
        kind, options = transform.kind, transform.options
        name = f"{prefix}[{index}].{kind}"
        if kind == "select":
            steps.append(Select(name, options))
        elif kind == "rename":
            steps.append(Rename(name, options))
        elif kind == "map":
            steps.append(MapValues(name, options))
        elif kind == "cast":
            steps.append(Cast(name, options))
        elif kind == "cleanse":
            steps.append(Cleanse(name, options))
        elif kind == "derive":
            steps.append(Derive(name, options))
        elif kind == "filter":
            steps.append(Filter(name, options))
        elif kind == "dedupe":
            dedupe: DedupeStep = options
            steps.append((DedupeFirst if dedupe.keep == "first" else DedupeLast)(name, dedupe.keys))
        elif kind == "enrich":
            steps.append(Enrich(name, options, open_lookup))
        elif kind == "aggregate":
            steps.append(Aggregate(name, options))
        else:
            steps.append(PythonFunction(name, options))
    return steps
