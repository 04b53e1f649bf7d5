"""Conditions: one YAML/JSON syntax for "does this record match?", evaluated per record or over Arrow.

Syntax
------
A leaf tests one field: ``{field: amount, op: gt, value: 1000}``. Leaves nest in ``{all: [...]}``,
``{any: [...]}`` and ``{not: {...}}``. Operators: eq, ne, gt, gte, lt, lte, in, not_in, contains,
starts_with, ends_with, matches, exists, is_empty, between.

A condition is parsed once (`parse_condition`) into an immutable tree and then evaluated either per
record (`evaluate`, for dicts: workflows, stream filters, the gateway) or vectorised over a
`pyarrow.Table` / `RecordBatch` (`evaluate_table`, for ETL). Both evaluators implement the same
semantics, pinned by a property test that compares them on random data:

Field paths
    ``customer.address.city``. Per record: a top-level key spelled exactly like the whole path wins
    (``{"customer.address.city": ...}``); otherwise the path walks nested mappings, and it is
    *missing* as soon as a step is not a mapping or lacks the key. Vectorised: a top-level column
    named exactly like the path wins; otherwise the first segment names a column and the rest walk
    its struct fields (`pyarrow.compute.struct_field`); a missing column or struct field is missing.
    A row whose parent struct is null has a null leaf.

Nulls are two-valued
    A missing field and a null value are the same thing. Any comparison with it is FALSE (never
    "unknown"), and ``not`` simply negates that, so ``not {field: x, op: eq, value: 1}`` is TRUE when
    x is null. ``exists`` (present and not null) and ``is_empty`` (missing, null, empty string or
    empty list) are the way to test for nulls. A null `value` in the spec is rejected for that reason.

Types
    Values fall into kinds: number (int, float, decimal), string, boolean, temporal (date, datetime /
    Arrow date and timestamp), list, mapping. A comparison between different kinds is FALSE: the
    string ``"5"`` never equals the number 5, and booleans are not numbers. ``ne`` means "present and
    not equal", so it is TRUE for a present value of another kind, exactly like ``not_in``. Ordering
    (gt/gte/lt/lte/between) works within numbers, strings (Unicode code point order), booleans
    (false < true) and temporals.
    Numbers: ints compare exactly with ints; when either side is a float (or decimal) both compare as
    64-bit floats, which is what Arrow does (an int column compared with ``2.5`` is cast to double).
    Integers in a spec must fit in 64 bits. A NaN in the spec is rejected.

Dates and times
    A spec value that is a date/datetime (YAML turns an unquoted ``2024-05-01`` into one), or a string
    that `datetime.fromisoformat` accepts, compares with temporal fields as an instant: naive values
    are taken as UTC, aware ones are converted to UTC, and a date is midnight UTC of that day. Against
    a string field the spec value compares as text (a date/datetime as its ISO text), so ISO-formatted
    string columns keep working. Strings in the *data* are never parsed as dates.

Operators
    eq/ne/gt/gte/lt/lte as above; ``between: [low, high]`` is inclusive on both ends; ``in``/``not_in``
    take a list and mean "equal to one of" / "present and equal to none of". ``contains`` is a
    substring test on strings and an element test (``eq``) on lists. ``starts_with``/``ends_with`` are
    for strings only. ``matches`` is a regular-expression *search* (not a full match; anchor with ^ and
    $) in the RE2 dialect on both sides: `pyarrow.compute.match_substring_regex` vectorised, the
    `google-re2` module per record. RE2 has no backreferences or lookarounds; such a pattern is
    rejected when the condition is parsed. Operators on fields of a kind they do not apply to (a
    substring test on a number) are FALSE.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from decimal import Decimal
from enum import StrEnum
from functools import reduce
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import re2

from orchestration.kernel.spec_errors import SpecError, SpecProblem, format_location

__all__ = [
    "AllOf",
    "AnyOf",
    "Condition",
    "Not",
    "Operand",
    "Operator",
    "Predicate",
    "evaluate",
    "evaluate_table",
    "parse_condition",
    "referenced_fields",
]

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class Operator(StrEnum):
    EQ = "eq"
    NE = "ne"
    GT = "gt"
    GTE = "gte"
    LT = "lt"
    LTE = "lte"
    IN = "in"
    NOT_IN = "not_in"
    CONTAINS = "contains"
    STARTS_WITH = "starts_with"
    ENDS_WITH = "ends_with"
    MATCHES = "matches"
    EXISTS = "exists"
    IS_EMPTY = "is_empty"
    BETWEEN = "between"


ORDERING = {Operator.GT, Operator.GTE, Operator.LT, Operator.LTE}
SCALAR_OPERATORS = {Operator.EQ, Operator.NE, *ORDERING, Operator.CONTAINS}
STRING_OPERATORS = {Operator.STARTS_WITH, Operator.ENDS_WITH, Operator.MATCHES}
LIST_OPERATORS = {Operator.IN, Operator.NOT_IN}
VALUELESS_OPERATORS = {Operator.EXISTS, Operator.IS_EMPTY}


# --- value kinds, shared with the expression evaluator ---------------------------------------------

NULL, NUMBER, STRING, BOOLEAN, TEMPORAL, LIST, MAPPING, OTHER = (
    "null",
    "number",
    "string",
    "boolean",
    "temporal",
    "list",
    "mapping",
    "other",
)


def value_kind(value: Any) -> str:
    """The kind of a Python value from a record (bool is checked before int: it is not a number here)."""
    if value is None:
        return NULL
    if isinstance(value, bool):
        return BOOLEAN
    if isinstance(value, int | float | Decimal):
        return NUMBER
    if isinstance(value, str):
        return STRING
    if isinstance(value, date):  # datetime is a subclass of date
        return TEMPORAL
    if isinstance(value, Mapping):
        return MAPPING
    if isinstance(value, list | tuple):
        return LIST
    return OTHER


def arrow_kind(data_type: pa.DataType) -> str:
    """The kind of an Arrow column, matching `value_kind` of the Python values it holds."""
    types = pa.types
    if types.is_null(data_type):
        return NULL
    if types.is_boolean(data_type):
        return BOOLEAN
    if types.is_integer(data_type) or types.is_floating(data_type) or types.is_decimal(data_type):
        return NUMBER
    if types.is_string(data_type) or types.is_large_string(data_type) or types.is_string_view(data_type):
        return STRING
    if types.is_timestamp(data_type) or types.is_date(data_type):
        return TEMPORAL
    if (
        types.is_list(data_type)
        or types.is_large_list(data_type)
        or types.is_fixed_size_list(data_type)
        or types.is_list_view(data_type)
        or types.is_large_list_view(data_type)
    ):
        return LIST
    if types.is_struct(data_type) or types.is_map(data_type):
        return MAPPING
    return OTHER


def to_instant(value: date) -> datetime:
    """A date or datetime as an aware UTC datetime: naive means UTC, a date is midnight UTC."""
    if isinstance(value, datetime):
        return value.astimezone(UTC) if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return datetime.combine(value, time(), UTC)


def instant_type(data_type: pa.DataType) -> pa.DataType:
    """The UTC timestamp type a temporal column is compared in: nanoseconds stay exact, else micros."""
    unit = "ns" if pa.types.is_timestamp(data_type) and data_type.unit == "ns" else "us"
    return pa.timestamp(unit, "UTC")


def as_instants(array: pa.Array) -> pa.Array:
    """A date or timestamp column as UTC timestamps (naive timestamps are taken as UTC)."""
    return array.cast(instant_type(array.type))


# --- field paths --------------------------------------------------------------------------------------


def lookup(record: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path in a record; None when missing (missing and null are the same)."""
    if path in record:
        return record[path]
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def column_at(batch: pa.RecordBatch, path: str) -> pa.Array:
    """The column at a dotted path in a batch; an all-null column when missing."""
    names = batch.schema.names
    if names.count(path) > 1:
        raise ValueError(f"the table has more than one column named {path!r}")
    if path in names:
        return batch.column(path)
    first, *rest = path.split(".")
    if names.count(first) != 1:
        return pa.nulls(batch.num_rows)
    column = batch.column(first)
    for part in rest:
        if not pa.types.is_struct(column.type) or column.type.get_field_index(part) < 0:
            return pa.nulls(batch.num_rows)
        # struct_field (unlike StructArray.field) makes the child null where the parent is null.
        column = pc.struct_field(column, [part])
    return column


def record_batches(table: pa.Table | pa.RecordBatch) -> list[pa.RecordBatch]:
    """Evaluate batch by batch: every column is then one contiguous array, never a chunked one."""
    if isinstance(table, pa.RecordBatch):
        return [table]
    return table.to_batches()


def validate_path(path: Any) -> str | None:
    """The reason a field path is invalid, or None."""
    if not isinstance(path, str) or not path:
        return "must be a non-empty string (a field name or dotted path such as customer.address.city)"
    if any(not part for part in path.split(".")):
        return f"{path!r} has an empty segment"
    return None


# --- the tree -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Operand:
    """A value from the spec with the faces it can be compared through.

    `text` is set for strings and for dates (their ISO text); `instant` (aware UTC) for dates and for
    strings that read as ISO dates/datetimes. A comparison uses the face matching the field's kind.
    """

    value: Any
    kind: str
    text: str | None = None
    instant: datetime | None = None


@dataclass(frozen=True)
class Predicate:
    """One test of one field. `operands` holds the value (one), the list (in/not_in) or [low, high]."""

    field: str
    op: Operator
    operands: tuple[Operand, ...] = ()
    regex: Any = field(default=None, compare=False, repr=False)  # compiled RE2 pattern for `matches`


@dataclass(frozen=True)
class AllOf:
    conditions: tuple[Condition, ...]


@dataclass(frozen=True)
class AnyOf:
    conditions: tuple[Condition, ...]


@dataclass(frozen=True)
class Not:
    condition: Condition


Condition = Predicate | AllOf | AnyOf | Not


# --- parsing ------------------------------------------------------------------------------------------

LEAF_KEYS = ("field", "op", "value")
COMBINATORS = ("all", "any", "not")
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # the error is reported as a SpecError; RE2's own log is noise


def compile_regex(pattern: str) -> tuple[Any, str | None]:
    """(compiled RE2 pattern, None) or (None, reason) - the same dialect pyarrow uses."""
    try:
        return re2.compile(pattern, _RE2_OPTIONS), None
    except re2.error as exc:
        detail = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        return None, (
            f"invalid regular expression {pattern!r}: {detail} "
            "(RE2 dialect: no backreferences or lookarounds)"
        )


class _Problems:
    def __init__(self) -> None:
        self.problems: list[SpecProblem] = []

    def add(self, location: Sequence[str | int], reason: str) -> None:
        self.problems.append(SpecProblem(format_location(location), reason))


def parse_condition(data: Any) -> Condition:
    """Parse a condition spec into an immutable tree.

    Raises `SpecError` listing every problem, each located relative to `data` (``all[1].op``).
    """
    problems = _Problems()
    condition = _parse(data, (), problems)
    if problems.problems or condition is None:
        raise SpecError(problems.problems)
    return condition


def _parse(data: Any, location: tuple[str | int, ...], problems: _Problems) -> Condition | None:
    if not isinstance(data, Mapping):
        problems.add(
            location,
            f"a condition must be a mapping ({{field, op, value}} or all/any/not), got {type(data).__name__}",
        )
        return None
    combinators = [key for key in COMBINATORS if key in data]
    if combinators:
        if len(data) != 1:
            others = ", ".join(sorted(str(key) for key in data if key != combinators[0]))
            problems.add(
                location, f"'{combinators[0]}' must be the only key of its mapping (also found: {others})"
            )
            return None
        key = combinators[0]
        if key == "not":
            inner = _parse(data["not"], (*location, "not"), problems)
            return Not(inner) if inner is not None else None
        items = data[key]
        if not isinstance(items, list) or not items:
            problems.add((*location, key), "must be a non-empty list of conditions")
            return None
        parsed = [_parse(item, (*location, key, index), problems) for index, item in enumerate(items)]
        if any(item is None for item in parsed):
            return None
        return AllOf(tuple(parsed)) if key == "all" else AnyOf(tuple(parsed))
    return _parse_predicate(data, location, problems)


def _parse_predicate(
    data: Mapping[str, Any], location: tuple[str | int, ...], problems: _Problems
) -> Predicate | None:
    count = len(problems.problems)
    for key in data:
        if key not in LEAF_KEYS:
            problems.add((*location, str(key)), "unknown key; expected field, op and value (or all/any/not)")
    path = data.get("field")
    if "field" not in data:
        problems.add((*location, "field"), "required: the field (or dotted path) to test")
    elif reason := validate_path(path):
        problems.add((*location, "field"), reason)
    known = ", ".join(op.value for op in Operator)
    raw_op = data.get("op")
    op: Operator | None = None
    if "op" not in data:
        problems.add((*location, "op"), f"required: one of {known}")
    elif raw_op not in set(Operator):
        problems.add((*location, "op"), f"unknown operator {raw_op!r}; expected one of {known}")
    else:
        op = Operator(raw_op)
    operands: tuple[Operand, ...] = ()
    regex = None
    if op is not None:
        operands, regex = _parse_value(op, data, (*location, "value"), problems)
    if len(problems.problems) != count or op is None:
        return None
    return Predicate(path, op, operands, regex)


def _parse_value(
    op: Operator, data: Mapping[str, Any], location: tuple[str | int, ...], problems: _Problems
) -> tuple[tuple[Operand, ...], Any]:
    if op in VALUELESS_OPERATORS:
        if "value" in data:
            problems.add(location, f"'{op}' takes no value (negate it with not)")
        return (), None
    if "value" not in data:
        problems.add(location, f"required for '{op}'")
        return (), None
    raw = data["value"]
    if op in LIST_OPERATORS:
        if not isinstance(raw, list):
            problems.add(location, f"'{op}' needs a list of values, got {type(raw).__name__}")
            return (), None
        operands = [_parse_operand(item, (*location, index), problems) for index, item in enumerate(raw)]
        return tuple(operand for operand in operands if operand is not None), None
    if op is Operator.BETWEEN:
        if not isinstance(raw, list) or len(raw) != 2:
            problems.add(location, "'between' needs a list of two values [low, high] (inclusive)")
            return (), None
        low, high = (_parse_operand(item, (*location, index), problems) for index, item in enumerate(raw))
        if low is None or high is None:
            return (), None
        comparable = low.kind == high.kind or (low.instant is not None and high.instant is not None)
        if not comparable:
            problems.add(location, f"'between' bounds must be of one type, got {low.kind} and {high.kind}")
        return (low, high), None
    operand = _parse_operand(raw, location, problems)
    if operand is None:
        return (), None
    if op in STRING_OPERATORS and not isinstance(raw, str):
        problems.add(location, f"'{op}' needs a string, got {type(raw).__name__}")
        return (), None
    if op is Operator.MATCHES:
        regex, reason = compile_regex(raw)
        if reason:
            problems.add(location, reason)
        return (operand,), regex
    return (operand,), None


def _parse_operand(raw: Any, location: tuple[str | int, ...], problems: _Problems) -> Operand | None:
    if raw is None:
        problems.add(location, "null never compares equal to anything; test nulls with exists or is_empty")
        return None
    if isinstance(raw, bool):
        return Operand(raw, BOOLEAN)
    if isinstance(raw, int):
        if not INT64_MIN <= raw <= INT64_MAX:
            problems.add(location, f"integer {raw} does not fit in 64 bits")
            return None
        return Operand(raw, NUMBER)
    if isinstance(raw, float):
        if math.isnan(raw):
            problems.add(location, "NaN never compares equal to anything")
            return None
        return Operand(raw, NUMBER)
    if isinstance(raw, str):
        try:
            instant = to_instant(datetime.fromisoformat(raw))
        except ValueError:
            instant = None
        return Operand(raw, STRING, text=raw, instant=instant)
    if isinstance(raw, date):
        return Operand(raw, TEMPORAL, text=raw.isoformat(), instant=to_instant(raw))
    problems.add(location, f"expected a number, string, boolean or date, got {type(raw).__name__}")
    return None


def referenced_fields(condition: Condition) -> set[str]:
    """Every field path the condition reads (as written, dotted)."""
    if isinstance(condition, Predicate):
        return {condition.field}
    if isinstance(condition, Not):
        return referenced_fields(condition.condition)
    return set().union(*(referenced_fields(child) for child in condition.conditions))


# --- per record ---------------------------------------------------------------------------------------

_PYTHON_COMPARISONS: dict[Operator, Callable[[Any, Any], bool]] = {
    Operator.EQ: operator.eq,
    Operator.NE: operator.ne,
    Operator.GT: operator.gt,
    Operator.GTE: operator.ge,
    Operator.LT: operator.lt,
    Operator.LTE: operator.le,
}


def evaluate(condition: Condition, record: Mapping[str, Any]) -> bool:
    """Whether one record (a mapping, possibly nested) satisfies the condition."""
    if isinstance(condition, Predicate):
        return _test_value(lookup(record, condition.field), condition)
    if isinstance(condition, AllOf):
        return all(evaluate(child, record) for child in condition.conditions)
    if isinstance(condition, AnyOf):
        return any(evaluate(child, record) for child in condition.conditions)
    return not evaluate(condition.condition, record)


def operand_fits(kind: str, operand: Operand) -> bool:
    """Whether a field of this kind can be compared with the operand (through one of its faces)."""
    return (
        (kind == NUMBER and operand.kind == NUMBER)
        or (kind == STRING and operand.text is not None)
        or (kind == BOOLEAN and operand.kind == BOOLEAN)
        or (kind == TEMPORAL and operand.instant is not None)
    )


def _comparable_values(value: Any, operand: Operand) -> tuple[Any, Any] | None:
    """The two sides as Python values that compare like Arrow would, or None when kinds differ."""
    kind = value_kind(value)
    if kind == NUMBER and operand.kind == NUMBER:
        if isinstance(value, int) and isinstance(operand.value, int):
            return value, operand.value
        return float(value), float(operand.value)
    if kind == STRING and operand.text is not None:
        return value, operand.text
    if kind == BOOLEAN and operand.kind == BOOLEAN:
        return value, operand.value
    if kind == TEMPORAL and operand.instant is not None:
        return to_instant(value), operand.instant
    return None


def _compare_value(value: Any, op: Operator, operand: Operand) -> bool:
    pair = _comparable_values(value, operand)
    if pair is None:
        return op is Operator.NE and value is not None
    return _PYTHON_COMPARISONS[op](*pair)


def _test_value(value: Any, predicate: Predicate) -> bool:
    op, operands = predicate.op, predicate.operands
    if op is Operator.EXISTS:
        return value is not None
    if op is Operator.IS_EMPTY:
        return value is None or value == "" or (isinstance(value, list | tuple) and len(value) == 0)
    if value is None:
        return False
    if op in _PYTHON_COMPARISONS:
        return _compare_value(value, op, operands[0])
    if op is Operator.BETWEEN:
        low, high = operands
        return _compare_value(value, Operator.GTE, low) and _compare_value(value, Operator.LTE, high)
    if op is Operator.IN:
        return any(_compare_value(value, Operator.EQ, operand) for operand in operands)
    if op is Operator.NOT_IN:
        return not any(_compare_value(value, Operator.EQ, operand) for operand in operands)
    if op is Operator.CONTAINS:
        if isinstance(value, list | tuple):
            return any(_compare_value(element, Operator.EQ, operands[0]) for element in value)
        return isinstance(value, str) and operands[0].text is not None and operands[0].text in value
    if not isinstance(value, str):
        return False
    if op is Operator.STARTS_WITH:
        return value.startswith(operands[0].text)
    if op is Operator.ENDS_WITH:
        return value.endswith(operands[0].text)
    return predicate.regex.search(value) is not None  # matches


# --- vectorised ---------------------------------------------------------------------------------------

_ARROW_COMPARISONS: dict[Operator, Callable[[Any, Any], pa.Array]] = {
    Operator.EQ: pc.equal,
    Operator.NE: pc.not_equal,
    Operator.GT: pc.greater,
    Operator.GTE: pc.greater_equal,
    Operator.LT: pc.less,
    Operator.LTE: pc.less_equal,
}


def evaluate_table(condition: Condition, table: pa.Table | pa.RecordBatch) -> pa.BooleanArray:
    """One boolean per row (never null): whether the row satisfies the condition."""
    masks = [_evaluate_batch(condition, batch) for batch in record_batches(table)]
    if not masks:
        return pa.array([], pa.bool_())
    return masks[0] if len(masks) == 1 else pa.concat_arrays(masks)


def _evaluate_batch(condition: Condition, batch: pa.RecordBatch) -> pa.BooleanArray:
    if isinstance(condition, Predicate):
        # Nulls are filled at the leaves, so not/and/or below work on plain two-valued booleans.
        return _test_array(column_at(batch, condition.field), condition).fill_null(False)
    if isinstance(condition, AllOf):
        return reduce(pc.and_, (_evaluate_batch(child, batch) for child in condition.conditions))
    if isinstance(condition, AnyOf):
        return reduce(pc.or_, (_evaluate_batch(child, batch) for child in condition.conditions))
    return pc.invert(_evaluate_batch(condition.condition, batch))


def _all_false(length: int) -> pa.BooleanArray:
    return pa.array(np.zeros(length, dtype=bool))


def _comparable_arrays(values: pa.Array, operand: Operand) -> tuple[pa.Array, pa.Scalar] | None:
    """Column and scalar cast so Arrow compares them like `_comparable_values`; None when kinds differ."""
    kind = arrow_kind(values.type)
    if kind == NUMBER and operand.kind == NUMBER:
        if pa.types.is_integer(values.type) and isinstance(operand.value, int):
            return values, pa.scalar(operand.value, pa.int64())
        # Arrow's implicit int->double cast refuses ints beyond 2**53; Python rounds them; so do we.
        return values.cast(pa.float64(), safe=False), pa.scalar(float(operand.value), pa.float64())
    if kind == STRING and operand.text is not None:
        return values, pa.scalar(operand.text, values.type)
    if kind == BOOLEAN and operand.kind == BOOLEAN:
        return values, pa.scalar(operand.value, pa.bool_())
    if kind == TEMPORAL and operand.instant is not None:
        instants = as_instants(values)
        return instants, pa.scalar(operand.instant, instants.type)
    return None


def _compare_array(values: pa.Array, op: Operator, operand: Operand) -> pa.Array:
    pair = _comparable_arrays(values, operand)
    if pair is None:
        return pc.is_valid(values) if op is Operator.NE else _all_false(len(values))
    return _ARROW_COMPARISONS[op](*pair)


def _is_in_array(values: pa.Array, operands: tuple[Operand, ...]) -> pa.Array:
    """Equal to one of the operands, with `eq`'s kind rules, in one hash lookup per row."""
    kind = arrow_kind(values.type)
    usable = [operand for operand in operands if operand_fits(kind, operand)]
    if not usable:
        return _all_false(len(values))
    if kind == NUMBER:
        if pa.types.is_integer(values.type) and all(isinstance(o.value, int) for o in usable):
            return pc.is_in(
                values.cast(pa.int64()), value_set=pa.array([o.value for o in usable], pa.int64())
            )
        value_set = pa.array([float(o.value) for o in usable], pa.float64())
        return pc.is_in(values.cast(pa.float64(), safe=False), value_set=value_set)
    if kind == STRING:
        return pc.is_in(values, value_set=pa.array([o.text for o in usable], values.type))
    if kind == BOOLEAN:
        return pc.is_in(values, value_set=pa.array([o.value for o in usable], pa.bool_()))
    instants = as_instants(values)
    return pc.is_in(instants, value_set=pa.array([o.instant for o in usable], instants.type))


def _list_contains(values: pa.Array, operand: Operand) -> pa.Array:
    """Per list row: does any element equal the operand? Flatten, compare, scatter back by parent."""
    if isinstance(values, pa.ListViewArray | pa.LargeListViewArray):
        values = values.cast(pa.large_list(values.type.value_type))
    hits = pc.fill_null(_compare_array(pc.list_flatten(values), Operator.EQ, operand), False)
    parents = pc.filter(pc.list_parent_indices(values), hits).to_numpy(zero_copy_only=False)
    result = np.zeros(len(values), dtype=bool)
    result[parents] = True
    return pa.array(result)


def _test_array(values: pa.Array, predicate: Predicate) -> pa.Array:
    """The predicate over one column; may hold nulls, which the caller turns into false."""
    op, operands = predicate.op, predicate.operands
    kind = arrow_kind(values.type)
    if op is Operator.EXISTS:
        return pc.is_valid(values)
    if op is Operator.IS_EMPTY:
        empty = pc.is_null(values)
        if kind == STRING:
            empty = pc.or_(empty, pc.fill_null(pc.equal(values, pa.scalar("", values.type)), False))
        elif kind == LIST:
            empty = pc.or_(empty, pc.fill_null(pc.equal(pc.list_value_length(values), 0), False))
        return empty
    if op in _ARROW_COMPARISONS:
        return _compare_array(values, op, operands[0])
    if op is Operator.BETWEEN:
        low, high = operands
        return pc.and_(
            pc.fill_null(_compare_array(values, Operator.GTE, low), False),
            pc.fill_null(_compare_array(values, Operator.LTE, high), False),
        )
    if op is Operator.IN:
        return _is_in_array(values, operands)
    if op is Operator.NOT_IN:
        return pc.and_(pc.is_valid(values), pc.invert(pc.fill_null(_is_in_array(values, operands), False)))
    if op is Operator.CONTAINS:
        if kind == LIST:
            return _list_contains(values, operands[0])
        if kind == STRING and operands[0].text is not None:
            return pc.match_substring(values, pattern=operands[0].text)
        return _all_false(len(values))
    if kind != STRING:
        return _all_false(len(values))
    if op is Operator.STARTS_WITH:
        return pc.starts_with(values, pattern=operands[0].text)
    if op is Operator.ENDS_WITH:
        return pc.ends_with(values, pattern=operands[0].text)
    return pc.match_substring_regex(values, pattern=operands[0].text)  # matches
