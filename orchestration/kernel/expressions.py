"""Expressions for derived values: ``amount * 1.2``, ``upper(trim(customer.name))``, ``a if b else c``.

Syntax is a safe subset of Python expressions, parsed once (`parse_expression`) into an immutable
tree and evaluated either per record (`evaluate`) or vectorised over Arrow (`evaluate_table`):

- literals: numbers, 'strings', true/false/null (Python's True/False/None work too);
- field references: ``amount``, dotted ``customer.address.city`` (same resolution rule as conditions:
  a key/column named with the dots wins, else nested mappings / struct fields), or ``field('odd name')``
  for names that are not identifiers; ``true``, ``false`` and ``null`` are reserved;
- arithmetic ``+ - * / %`` and unary minus; comparisons ``== != < <= > >=`` (chains allowed);
  ``and``, ``or``, ``not``; ``a if cond else b``;
- functions: see `FUNCTIONS` (string, date, coalesce, case_when).

Semantics (the same in both evaluators; a property test compares them on random data):

Nulls
    Propagate like SQL: any operator or function with a null argument yields null, except
    ``coalesce`` (first non-null), ``case_when`` / ``if else`` (a null condition counts as false, so the
    next branch is tried) and ``and``/``or``, which use SQL's three-valued logic (``null and false`` is
    false, ``null or true`` is true). A missing field is null.
Types
    Kinds as in conditions: number (int, float; decimals are computed as floats), string, boolean,
    temporal. An operator or function applied to a kind it does not take (``'a' + 1``, ``lower(5)``,
    ``1 < 'b'``, ``not 3``) yields null, like a failed SQL TRY_CAST, rather than failing the run.
    ``+`` is numeric only; join strings with ``concat``.
Numbers
    int op int stays an int (64-bit; overflow raises `ExpressionError` on both sides); when a float is
    involved both sides are 64-bit floats. ``/`` is always true division and returns a float; ``%`` is
    Python's modulo (the result has the sign of the divisor). Division or modulo by zero yields null.
Strings
    ``length`` counts code points; ``substr(s, start[, length])`` is 1-based like SQL; ``trim`` removes
    spaces, tabs, CR, LF, FF and VT; ``lower``/``upper`` agree on ASCII and most of Unicode (Arrow maps
    character by character, Python applies special cases such as 'ß' -> 'SS').
Dates
    ``date('2024-05-01')`` parses YYYY-MM-DD, ``timestamp(...)`` additionally takes
    ``YYYY-MM-DD[T ]HH:MM:SS`` (naive); anything else, including impossible dates, is null. Given a
    temporal they convert (a timestamp's date; a date's midnight). ``year``/``month``/``day`` read the
    value as stored (an aware value in its own zone); ``date_trunc(unit, value)`` with unit one of
    year, month, week (Monday), day, hour, minute, second; ``days_between(start, end)`` counts
    calendar-day boundaries from start to end; ``now()`` is an aware UTC timestamp, ``today()`` the UTC
    date. Comparing temporals compares instants (naive = UTC), as in conditions.
One type per column
    Vectorised, a result column has one type, so the branches of ``coalesce``/``case_when``/``if else``
    must share a kind (ints and floats mix, as floats); otherwise `evaluate_table` raises
    `ExpressionError`. Per record the chosen value is returned as is. Likewise an integer overflow in a
    branch that no row takes still raises vectorised.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import re2

from orchestration.errors import JunctionError
from orchestration.kernel.conditions import (
    BOOLEAN,
    INT64_MAX,
    INT64_MIN,
    NULL,
    NUMBER,
    STRING,
    TEMPORAL,
    arrow_kind,
    as_instants,
    column_at,
    lookup,
    record_batches,
    to_instant,
    validate_path,
    value_kind,
)
from orchestration.kernel.spec_errors import SpecError

__all__ = [
    "FUNCTIONS",
    "Call",
    "Conditional",
    "Expression",
    "ExpressionError",
    "FieldRef",
    "Literal",
    "Logical",
    "Operation",
    "evaluate",
    "evaluate_table",
    "parse_expression",
    "referenced_fields",
]


class ExpressionError(JunctionError):
    """An expression could not be evaluated: integer overflow, or branches of different kinds."""


# --- the tree -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Literal:
    value: Any  # int, float, str, bool or None


@dataclass(frozen=True)
class FieldRef:
    path: str


@dataclass(frozen=True)
class Operation:
    """An operator: arithmetic, comparison, unary minus (``neg``) or ``not``."""

    op: str
    operands: tuple[Expression, ...]


@dataclass(frozen=True)
class Logical:
    """``and`` / ``or`` over two or more operands, with SQL's three-valued logic."""

    op: str
    operands: tuple[Expression, ...]


@dataclass(frozen=True)
class Conditional:
    """``case_when`` and ``a if cond else b``: the first branch whose condition is true, else `otherwise`."""

    branches: tuple[tuple[Expression, Expression], ...]
    otherwise: Expression


@dataclass(frozen=True)
class Call:
    """A function. `options` are its literal-only arguments (a substring, a unit), checked at parse."""

    function: str
    args: tuple[Expression, ...]
    options: tuple[Any, ...] = ()


Expression = Literal | FieldRef | Operation | Logical | Conditional | Call


# --- functions ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FunctionSpec:
    """`arity` counts expression arguments; `literals` describes the literal-only ones that follow."""

    arity: tuple[int, int | None]  # (min, max); None: any number
    literals: tuple[str, ...] = ()  # "str", "nonempty_str", "start", "length", "unit"
    optional_literals: int = 0  # how many of `literals`, from the end, may be left out


TRUNCATION_UNITS = ("year", "month", "week", "day", "hour", "minute", "second")

FUNCTIONS: dict[str, FunctionSpec] = {
    "lower": FunctionSpec((1, 1)),
    "upper": FunctionSpec((1, 1)),
    "trim": FunctionSpec((1, 1)),
    "length": FunctionSpec((1, 1)),
    "concat": FunctionSpec((1, None)),
    "substr": FunctionSpec((1, 1), ("start", "length"), optional_literals=1),
    "replace": FunctionSpec((1, 1), ("nonempty_str", "str")),
    "starts_with": FunctionSpec((1, 1), ("str",)),
    "ends_with": FunctionSpec((1, 1), ("str",)),
    "contains": FunctionSpec((1, 1), ("str",)),
    "year": FunctionSpec((1, 1)),
    "month": FunctionSpec((1, 1)),
    "day": FunctionSpec((1, 1)),
    "date_trunc": FunctionSpec((1, 1), ("unit",)),
    "days_between": FunctionSpec((2, 2)),
    "now": FunctionSpec((0, 0)),
    "today": FunctionSpec((0, 0)),
    "date": FunctionSpec((1, 1)),
    "timestamp": FunctionSpec((1, 1)),
    "coalesce": FunctionSpec((1, None)),
    "case_when": FunctionSpec((3, None)),
    "field": FunctionSpec((0, 0), ("nonempty_str",)),
}

# date_trunc takes the unit first (SQL style); every other literal argument follows the value.
LEADING_LITERALS = {"date_trunc"}


# --- parsing ------------------------------------------------------------------------------------------

ARITHMETIC = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Mod: "%"}
COMPARISONS = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}
NAMED_LITERALS = {"true": True, "false": False, "null": None}


def parse_expression(text: str) -> Expression:
    """Parse expression text into an immutable tree; `SpecError` (location ``(expression)``) otherwise.

    Python's own parser (`ast.parse`, mode "eval") reads the text, so there is no grammar of ours to
    maintain, and a whitelist walk turns the few node types we allow into our tree. Nothing is ever
    evaluated by Python (no `eval`), so attribute access, calls of anything but our functions,
    lambdas, comprehensions and subscripts are simply not representable.
    """
    if not isinstance(text, str):
        raise SpecError.at("(expression)", f"an expression must be a string, got {type(text).__name__}")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise SpecError.at("(expression)", f"syntax error at column {exc.offset or 1}: {exc.msg}") from None
    return _convert(tree.body)


def _reject(node: ast.AST, reason: str) -> SpecError:
    column = getattr(node, "col_offset", None)
    where = f" at column {column + 1}" if column is not None else ""
    return SpecError.at("(expression)", f"{reason}{where}")


def _dotted_path(node: ast.AST) -> str | None:
    """``customer.address.city`` as a field path; None when the chain does not start at a name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def _convert(node: ast.AST) -> Expression:
    if isinstance(node, ast.Constant):
        if node.value is None or isinstance(node.value, bool | int | float | str):
            if isinstance(node.value, int) and not isinstance(node.value, bool):
                if not INT64_MIN <= node.value <= INT64_MAX:
                    raise _reject(node, f"integer {node.value} does not fit in 64 bits")
            return Literal(node.value)
        raise _reject(node, f"unsupported literal {node.value!r}")
    if isinstance(node, ast.Name):
        if node.id in NAMED_LITERALS:
            return Literal(NAMED_LITERALS[node.id])
        return FieldRef(node.id)
    if isinstance(node, ast.Attribute):
        path = _dotted_path(node)
        if path is None:
            raise _reject(
                node, "attribute access is only allowed in field paths such as customer.address.city"
            )
        if any(part in NAMED_LITERALS for part in path.split(".")):
            raise _reject(node, f"{path!r}: true, false and null are reserved; use field('{path}')")
        return FieldRef(path)
    if isinstance(node, ast.BinOp):
        symbol = ARITHMETIC.get(type(node.op))
        if symbol is None:
            raise _reject(node, f"operator {type(node.op).__name__} is not supported; use + - * / %")
        return Operation(symbol, (_convert(node.left), _convert(node.right)))
    if isinstance(node, ast.UnaryOp):
        operand = _convert(node.operand)
        if isinstance(node.op, ast.USub):
            return Operation("neg", (operand,))
        if isinstance(node.op, ast.UAdd):
            return Operation("+", (Literal(0), operand))
        if isinstance(node.op, ast.Not):
            return Operation("not", (operand,))
        raise _reject(node, "operator ~ is not supported")
    if isinstance(node, ast.BoolOp):
        return Logical(
            "and" if isinstance(node.op, ast.And) else "or", tuple(_convert(v) for v in node.values)
        )
    if isinstance(node, ast.Compare):
        return _convert_comparison(node)
    if isinstance(node, ast.IfExp):
        return Conditional(((_convert(node.test), _convert(node.body)),), _convert(node.orelse))
    if isinstance(node, ast.Call):
        return _convert_call(node)
    raise _reject(node, f"{type(node).__name__} is not allowed in an expression")


def _convert_comparison(node: ast.Compare) -> Expression:
    # `a < b < c` means `a < b and b < c`, as in Python.
    pairs = []
    left = _convert(node.left)
    for comparator, right_node in zip(node.ops, node.comparators, strict=True):
        symbol = COMPARISONS.get(type(comparator))
        if symbol is None:
            raise _reject(
                node, f"comparison {type(comparator).__name__} is not supported; use == != < <= > >="
            )
        right = _convert(right_node)
        pairs.append(Operation(symbol, (left, right)))
        left = right
    return pairs[0] if len(pairs) == 1 else Logical("and", tuple(pairs))


def _convert_call(node: ast.Call) -> Expression:
    if not isinstance(node.func, ast.Name):
        raise _reject(node, "only the expression functions can be called (no methods)")
    name = node.func.id
    spec = FUNCTIONS.get(name)
    if spec is None:
        raise _reject(node, f"unknown function {name!r}; known functions: {', '.join(sorted(FUNCTIONS))}")
    if node.keywords or any(isinstance(arg, ast.Starred) for arg in node.args):
        raise _reject(node, f"{name}() takes positional arguments only")
    raw_args = list(node.args)
    literal_count = len(spec.literals)
    minimum = spec.arity[0] + literal_count - spec.optional_literals
    maximum = None if spec.arity[1] is None else spec.arity[1] + literal_count
    if len(raw_args) < minimum or (maximum is not None and len(raw_args) > maximum):
        expected = (
            f"{minimum}" if minimum == maximum else f"{minimum} to {maximum}" if maximum else f"{minimum}+"
        )
        raise _reject(node, f"{name}() takes {expected} arguments, got {len(raw_args)}")
    if name in LEADING_LITERALS:
        literal_nodes, value_nodes = raw_args[:literal_count], raw_args[literal_count:]
    else:
        split = spec.arity[0] if spec.arity[1] is not None else len(raw_args)
        value_nodes, literal_nodes = raw_args[:split], raw_args[split:]
    options = tuple(
        _literal_option(name, kind, arg) for kind, arg in zip(spec.literals, literal_nodes, strict=False)
    )  # trailing ones are optional
    args = tuple(_convert(arg) for arg in value_nodes)
    if name == "field":
        if reason := validate_path(options[0]):
            raise _reject(node, f"field(): {reason}")
        return FieldRef(options[0])
    if name == "case_when":
        if len(args) % 2 == 0:
            raise _reject(
                node, "case_when(cond1, value1, cond2, value2, ..., else_value) needs an odd number"
            )
        branches = tuple((args[index], args[index + 1]) for index in range(0, len(args) - 1, 2))
        return Conditional(branches, args[-1])
    return Call(name, args, options)


def _literal_option(function: str, kind: str, node: ast.AST) -> Any:
    value = node.value if isinstance(node, ast.Constant) else None
    if kind in ("str", "nonempty_str"):
        if not isinstance(value, str) or (kind == "nonempty_str" and not value):
            qualifier = "a non-empty" if kind == "nonempty_str" else "a"
            raise _reject(node, f"{function}() needs {qualifier} string literal here")
        return value
    if kind == "unit":
        if value not in TRUNCATION_UNITS:
            raise _reject(node, f"{function}() unit must be one of {', '.join(TRUNCATION_UNITS)}")
        return value
    minimum = 1 if kind == "start" else 0
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _reject(node, f"{function}() {kind} must be an integer literal >= {minimum}")
    return value


def referenced_fields(expression: Expression) -> set[str]:
    """Every field path the expression reads."""
    if isinstance(expression, FieldRef):
        return {expression.path}
    if isinstance(expression, Literal):
        return set()
    if isinstance(expression, Conditional):
        children = [part for branch in expression.branches for part in branch] + [expression.otherwise]
    elif isinstance(expression, Operation | Logical):
        children = list(expression.operands)
    else:
        children = list(expression.args)
    return set().union(*(referenced_fields(child) for child in children))


# --- per record ---------------------------------------------------------------------------------------

_PYTHON_COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
TRIM_CHARACTERS = " \t\n\r\f\v"
ISO_TEXT = re2.compile(r"^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2}):(\d{2}))?$")
ISO_DATE_TEXT = re2.compile(r"^\d{4}-\d{2}-\d{2}$")


def evaluate(expression: Expression, record: Mapping[str, Any]) -> Any:
    """The expression's value for one record (a mapping, possibly nested); None is null."""
    if isinstance(expression, Literal):
        return expression.value
    if isinstance(expression, FieldRef):
        return lookup(record, expression.path)
    if isinstance(expression, Operation):
        return _operation_value(expression.op, [evaluate(operand, record) for operand in expression.operands])
    if isinstance(expression, Logical):
        return _logical_value(expression.op, [evaluate(operand, record) for operand in expression.operands])
    if isinstance(expression, Conditional):
        for condition, value in expression.branches:
            if evaluate(condition, record) is True:
                return evaluate(value, record)
        return evaluate(expression.otherwise, record)
    if expression.function == "coalesce":
        for arg in expression.args:
            value = evaluate(arg, record)
            if value is not None:
                return value
        return None
    return _function_value(expression, [evaluate(arg, record) for arg in expression.args])


def _checked_int(value: int) -> int:
    if not INT64_MIN <= value <= INT64_MAX:
        raise ExpressionError("integer overflow (results must fit in 64 bits)")
    return value


def _operation_value(op: str, values: list[Any]) -> Any:
    if any(value is None for value in values):
        return None
    kinds = [value_kind(value) for value in values]
    if op == "not":
        return (not values[0]) if kinds[0] == BOOLEAN else None
    if op == "neg":
        if kinds[0] != NUMBER:
            return None
        return _checked_int(-values[0]) if isinstance(values[0], int) else -float(values[0])
    left, right = values
    if op in _PYTHON_COMPARISONS:
        if kinds[0] != kinds[1] or kinds[0] not in (NUMBER, STRING, BOOLEAN, TEMPORAL):
            return None
        if kinds[0] == NUMBER and not (isinstance(left, int) and isinstance(right, int)):
            left, right = float(left), float(right)
        elif kinds[0] == TEMPORAL:
            left, right = to_instant(left), to_instant(right)
        return _PYTHON_COMPARISONS[op](left, right)
    if kinds != [NUMBER, NUMBER]:
        return None
    both_ints = isinstance(left, int) and isinstance(right, int)
    if op == "/":
        return None if right == 0 else float(left) / float(right)
    if op == "%":
        if right == 0:
            return None
        return left % right if both_ints else float(left) % float(right)
    arithmetic = {"+": operator.add, "-": operator.sub, "*": operator.mul}[op]
    if both_ints:
        return _checked_int(arithmetic(left, right))
    return arithmetic(float(left), float(right))


def _logical_value(op: str, values: list[Any]) -> bool | None:
    # Non-booleans count as null (a type mismatch); then SQL's three-valued and/or.
    truths = [value if isinstance(value, bool) else None for value in values]
    decisive = op == "or"  # `true` decides an or, `false` decides an and
    if decisive in truths:
        return decisive
    if None in truths:
        return None
    return not decisive


def _parse_iso(text: str, date_only: bool) -> datetime | None:
    if not (ISO_DATE_TEXT if date_only else ISO_TEXT).search(text):
        return None
    try:
        if len(text) == 10:
            return datetime.strptime(text, "%Y-%m-%d")
        return datetime.strptime(text.replace("T", " "), "%Y-%m-%d %H:%M:%S")
    except ValueError:  # an impossible date such as 2024-02-30
        return None


def _truncate(value: date, unit: str) -> date:
    if unit == "week":
        value = value - timedelta(days=value.weekday())
        unit = "day"
    if unit in ("year", "month") or not isinstance(value, datetime):
        if unit == "year":
            value = value.replace(month=1, day=1)
        elif unit == "month":
            value = value.replace(day=1)
        if not isinstance(value, datetime):
            return value
        unit = "day"
    fields = {"day": 3, "hour": 4, "minute": 5, "second": 6}[unit]
    reset = dict(zip(("hour", "minute", "second", "microsecond"), (0, 0, 0, 0), strict=True))
    kept = ("year", "month", "day", "hour", "minute", "second")[:fields]
    return value.replace(**{key: zero for key, zero in reset.items() if key not in kept})


def _function_value(call: Call, values: list[Any]) -> Any:
    name, options = call.function, call.options
    if name == "now":
        return datetime.now(UTC)
    if name == "today":
        return datetime.now(UTC).date()
    if name == "days_between":
        if any(value_kind(value) != TEMPORAL for value in values):
            return None
        start, end = (value.date() if isinstance(value, datetime) else value for value in values)
        return (end - start).days
    if name == "concat":
        return "".join(values) if all(value_kind(value) == STRING for value in values) else None
    value = values[0]
    kind = value_kind(value)
    if name in ("year", "month", "day", "date_trunc"):
        if kind != TEMPORAL:
            return None
        return _truncate(value, options[0]) if name == "date_trunc" else getattr(value, name)
    if name in ("date", "timestamp"):
        if kind == TEMPORAL:
            if name == "date":
                return value.date() if isinstance(value, datetime) else value
            return value if isinstance(value, datetime) else datetime(value.year, value.month, value.day)
        parsed = _parse_iso(value, date_only=name == "date") if kind == STRING else None
        return parsed.date() if parsed is not None and name == "date" else parsed
    if kind != STRING:
        return None
    if name == "lower":
        return value.lower()
    if name == "upper":
        return value.upper()
    if name == "trim":
        return value.strip(TRIM_CHARACTERS)
    if name == "length":
        return len(value)
    if name == "substr":
        start = options[0] - 1
        return value[start : start + options[1]] if len(options) > 1 else value[start:]
    if name == "replace":
        return value.replace(options[0], options[1])
    if name == "starts_with":
        return value.startswith(options[0])
    if name == "ends_with":
        return value.endswith(options[0])
    return options[0] in value  # contains


# --- vectorised ---------------------------------------------------------------------------------------

_ARROW_ARITHMETIC = {"+": pc.add_checked, "-": pc.subtract_checked, "*": pc.multiply_checked}
_ARROW_COMPARISONS = {
    "==": pc.equal,
    "!=": pc.not_equal,
    "<": pc.less,
    "<=": pc.less_equal,
    ">": pc.greater,
    ">=": pc.greater_equal,
}


def evaluate_table(expression: Expression, table: pa.Table | pa.RecordBatch) -> pa.Array:
    """The expression's value for every row, as one Arrow array."""
    results = [_evaluate_batch(expression, batch) for batch in record_batches(table)]
    if not results:
        return pa.array([], _evaluate_batch(expression, _empty_batch(table)).type)
    if len(results) == 1:
        return results[0]
    common = _common_type(results, "rows of different batches")
    return pa.concat_arrays([result.cast(common) for result in results])


def _empty_batch(table: pa.Table | pa.RecordBatch) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([], schema=table.schema)


def _evaluate_batch(expression: Expression, batch: pa.RecordBatch) -> pa.Array:
    try:
        return _vector(expression, batch)
    except pa.ArrowInvalid as exc:
        if "overflow" in str(exc):
            raise ExpressionError("integer overflow (results must fit in 64 bits)") from None
        raise


def _broadcast(value: Any, length: int) -> pa.Array:
    if value is None:
        return pa.nulls(length)
    return pa.repeat(value if isinstance(value, pa.Scalar) else pa.scalar(value), length)


def _nulls_like(length: int) -> pa.Array:
    return pa.nulls(length)


def _numeric(array: pa.Array) -> pa.Array:
    """Integers as int64, floats and decimals as float64: the two number types we compute in."""
    if pa.types.is_integer(array.type):
        return array.cast(pa.int64())
    return array.cast(pa.float64(), safe=False)


def _as_float64(array: pa.Array) -> pa.Array:
    # Arrow's implicit int->double cast refuses ints beyond 2**53; Python rounds them, and so do we.
    return array.cast(pa.float64(), safe=False)


def _without_zeros(divisor: pa.Array) -> pa.Array:
    """The divisor with zeros made null, so that x / 0 and x % 0 are null rather than errors or inf."""
    return pc.if_else(pc.equal(divisor, pa.scalar(0, divisor.type)), pa.scalar(None, divisor.type), divisor)


def _vector(expression: Expression, batch: pa.RecordBatch) -> pa.Array:
    length = batch.num_rows
    if isinstance(expression, Literal):
        return _broadcast(expression.value, length)
    if isinstance(expression, FieldRef):
        return column_at(batch, expression.path)
    if isinstance(expression, Operation):
        return _operation_array(expression.op, [_vector(operand, batch) for operand in expression.operands])
    if isinstance(expression, Logical):
        return _logical_array(expression.op, [_vector(operand, batch) for operand in expression.operands])
    if isinstance(expression, Conditional):
        return _conditional_array(expression, batch)
    args = [_vector(arg, batch) for arg in expression.args]
    if expression.function == "coalesce":
        return _coalesce_array(args)
    return _function_array(expression, args, length)


def _operation_array(op: str, arrays: list[pa.Array]) -> pa.Array:
    length = len(arrays[0])
    kinds = [arrow_kind(array.type) for array in arrays]
    if NULL in kinds:
        return _nulls_like(length)
    if op == "not":
        return pc.invert(arrays[0]) if kinds[0] == BOOLEAN else _nulls_like(length)
    if op == "neg":
        return pc.negate_checked(_numeric(arrays[0])) if kinds[0] == NUMBER else _nulls_like(length)
    left, right = arrays
    if op in _ARROW_COMPARISONS:
        if kinds[0] != kinds[1] or kinds[0] not in (NUMBER, STRING, BOOLEAN, TEMPORAL):
            return _nulls_like(length)
        if kinds[0] == NUMBER:
            left, right = _numeric(left), _numeric(right)
            if left.type != right.type:
                left, right = _as_float64(left), _as_float64(right)
        elif kinds[0] == TEMPORAL:
            left, right = as_instants(left), as_instants(right)
            if left.type != right.type:  # one is in nanoseconds
                left, right = left.cast(pa.timestamp("ns", "UTC")), right.cast(pa.timestamp("ns", "UTC"))
        elif kinds[0] == STRING and left.type != right.type:
            left, right = left.cast(pa.large_string()), right.cast(pa.large_string())
        return _ARROW_COMPARISONS[op](left, right)
    if kinds != [NUMBER, NUMBER]:
        return _nulls_like(length)
    left, right = _numeric(left), _numeric(right)
    both_ints = pa.types.is_integer(left.type) and pa.types.is_integer(right.type)
    if op == "/":
        return pc.divide(_as_float64(left), _without_zeros(_as_float64(right)))
    if not both_ints:
        left, right = _as_float64(left), _as_float64(right)
    if op == "%":
        return pc.modulo(left, _without_zeros(right))
    return _ARROW_ARITHMETIC[op](left, right)


def _logical_array(op: str, arrays: list[pa.Array]) -> pa.Array:
    length = len(arrays[0])
    # Non-booleans count as null (a type mismatch), as per record.
    truths = [
        array if arrow_kind(array.type) == BOOLEAN else pa.nulls(length, pa.bool_()) for array in arrays
    ]
    combine = pc.and_kleene if op == "and" else pc.or_kleene
    result = truths[0]
    for array in truths[1:]:
        result = combine(result, array)
    return result


def _common_type(arrays: list[pa.Array], what: str) -> pa.DataType:
    """The one type `arrays` can all be cast to (null columns fit anything; ints widen to floats)."""
    typed = [array.type for array in arrays if arrow_kind(array.type) != NULL]
    if not typed:
        return pa.null()
    kinds = {arrow_kind(data_type) for data_type in typed}
    if len(kinds) > 1:
        names = ", ".join(sorted(str(data_type) for data_type in set(typed)))
        raise ExpressionError(f"{what} have different types ({names}); a column holds one type")
    kind = kinds.pop()
    if kind == NUMBER:
        return pa.int64() if all(pa.types.is_integer(data_type) for data_type in typed) else pa.float64()
    if kind == TEMPORAL and len(set(typed)) > 1:
        return (
            pa.timestamp("ns", "UTC")
            if any(getattr(t, "unit", "") == "ns" for t in typed)
            else pa.timestamp("us", "UTC")
        )
    if kind == STRING and len(set(typed)) > 1:
        return pa.large_string()
    if len(set(typed)) > 1:
        raise ExpressionError(f"{what} have different types ({', '.join(sorted(map(str, set(typed))))})")
    return typed[0]


def _cast_all(arrays: list[pa.Array], what: str) -> list[pa.Array]:
    common = _common_type(arrays, what)
    if pa.types.is_timestamp(common) and common.tz == "UTC":
        return [
            pa.nulls(len(array), common)
            if arrow_kind(array.type) == NULL
            else as_instants(array).cast(common)
            for array in arrays
        ]
    return [array.cast(common, safe=not pa.types.is_floating(common)) for array in arrays]


def _coalesce_array(arrays: list[pa.Array]) -> pa.Array:
    cast = _cast_all(arrays, "coalesce() arguments")
    return cast[0] if len(cast) == 1 else pc.coalesce(*cast)


def _conditional_array(expression: Conditional, batch: pa.RecordBatch) -> pa.Array:
    length = batch.num_rows
    conditions = []
    for condition, _ in expression.branches:
        array = _vector(condition, batch)
        # Only a boolean true takes a branch: null, false and non-booleans fall through.
        conditions.append(
            pc.fill_null(array, False) if arrow_kind(array.type) == BOOLEAN else pa.repeat(False, length)
        )
    values = [_vector(value, batch) for _, value in expression.branches] + [
        _vector(expression.otherwise, batch)
    ]
    values = _cast_all(values, "case_when / if-else branches")
    if pa.types.is_null(values[0].type):
        return _nulls_like(length)
    names = [f"c{index}" for index in range(len(conditions))]
    return pc.case_when(pc.make_struct(*conditions, field_names=names), *values)


def _iso_array(strings: pa.Array, date_only: bool) -> pa.Array:
    """Strict ISO parsing: the shape is checked by regex, and every parsed field must read back the
    same, because strptime quietly rolls impossible dates over (2024-02-30 -> 2024-03-01)."""
    pattern = (ISO_DATE_TEXT if date_only else ISO_TEXT).pattern
    shaped = pc.fill_null(pc.match_substring_regex(strings, pattern=pattern), False)
    text = pc.if_else(shaped, strings.cast(pa.string()), pa.scalar(None, pa.string()))
    text = pc.replace_substring(text, pattern="T", replacement=" ")
    midnight = pc.binary_join_element_wise(text, " 00:00:00", "")
    full = pc.if_else(pc.equal(pc.utf8_length(text), 10), midnight, text)
    parsed = pc.strptime(full, format="%Y-%m-%d %H:%M:%S", unit="us", error_is_null=True)
    readback = pc.strftime(parsed, format="%Y-%m-%d %H:%M:%S")
    # Arrow's %S prints fractional seconds; cut to the 19 characters of the input's shape.
    same = pc.equal(pc.utf8_slice_codeunits(readback, start=0, stop=19), full)
    return pc.if_else(pc.fill_null(same, False), parsed, pa.scalar(None, parsed.type))


def _function_array(call: Call, arrays: list[pa.Array], length: int) -> pa.Array:
    name, options = call.function, call.options
    if name == "now":
        return _broadcast(pa.scalar(datetime.now(UTC), pa.timestamp("us", "UTC")), length)
    if name == "today":
        return _broadcast(pa.scalar(datetime.now(UTC).date(), pa.date32()), length)
    kinds = [arrow_kind(array.type) for array in arrays]
    if NULL in kinds:
        return _nulls_like(length)
    if name == "days_between":
        if kinds != [TEMPORAL, TEMPORAL]:
            return _nulls_like(length)
        start, end = (array if pa.types.is_date(array.type) else array.cast(pa.date32()) for array in arrays)
        return pc.days_between(start, end)
    if name == "concat":
        if any(kind != STRING for kind in kinds):
            return _nulls_like(length)
        strings = [array.cast(pa.large_string()) for array in arrays]
        # The last argument of binary_join_element_wise is the separator.
        joined = pc.binary_join_element_wise(
            *strings, pa.scalar("", pa.large_string()), null_handling="emit_null"
        )
        return joined.cast(pa.string())
    array, kind = arrays[0], kinds[0]
    if name in ("year", "month", "day", "date_trunc"):
        if kind != TEMPORAL:
            return _nulls_like(length)
        if name == "date_trunc":
            return pc.floor_temporal(array, unit=options[0], week_starts_monday=True)
        return getattr(pc, name)(array)
    if name in ("date", "timestamp"):
        if kind == TEMPORAL:
            if name == "date":
                return array if pa.types.is_date(array.type) else array.cast(pa.date32())
            return array if pa.types.is_timestamp(array.type) else array.cast(pa.timestamp("us"))
        if kind != STRING:
            return _nulls_like(length)
        parsed = _iso_array(array, date_only=name == "date")
        return parsed.cast(pa.date32()) if name == "date" else parsed
    if kind != STRING:
        return _nulls_like(length)
    if name == "lower":
        return pc.utf8_lower(array)
    if name == "upper":
        return pc.utf8_upper(array)
    if name == "trim":
        return pc.utf8_trim(array, characters=TRIM_CHARACTERS)
    if name == "length":
        return pc.utf8_length(array).cast(pa.int64())
    if name == "substr":
        start = options[0] - 1
        if len(options) == 1:
            return pc.utf8_slice_codeunits(array, start=start)
        return pc.utf8_slice_codeunits(array, start=start, stop=start + options[1])
    if name == "replace":
        return pc.replace_substring(array, pattern=options[0], replacement=options[1])
    if name == "starts_with":
        return pc.starts_with(array, pattern=options[0])
    if name == "ends_with":
        return pc.ends_with(array, pattern=options[0])
    return pc.match_substring(array, pattern=options[0])  # contains
