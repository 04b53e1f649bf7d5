"""Expressions: parsing and rejection, each function, null and type rules, and both evaluators agreeing."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestration.kernel.expressions import (
    Call,
    Conditional,
    ExpressionError,
    FieldRef,
    Literal,
    Operation,
    evaluate,
    evaluate_table,
    parse_expression,
    referenced_fields,
)
from orchestration.kernel.spec_errors import SpecError


def table_of(records: list[dict]) -> pa.Table:
    """A table whose schema is inferred from every record, with a row column so empty records count."""
    rows = pa.array([{"_row": index, **record} for index, record in enumerate(records)])
    return pa.Table.from_batches([pa.RecordBatch.from_struct_array(rows)])


def same(left, right) -> bool:
    """Equal values of the same kind (True is not 1 here), NaN equal to NaN."""
    if isinstance(left, float) and isinstance(right, float) and math.isnan(left) and math.isnan(right):
        return True
    return isinstance(left, bool) == isinstance(right, bool) and left == right


def both(text: str, records: list[dict]) -> list:
    """Evaluate per record and vectorised, insist they agree, return the per-record values."""
    expression = parse_expression(text)
    per_record = [evaluate(expression, record) for record in records]
    vectorised = evaluate_table(expression, table_of(records)).to_pylist()
    assert len(vectorised) == len(per_record)
    assert all(same(a, b) for a, b in zip(per_record, vectorised, strict=True)), (per_record, vectorised)
    return per_record


def rejected(text: str) -> str:
    with pytest.raises(SpecError) as caught:
        parse_expression(text)
    return str(caught.value)


# --- arithmetic and nulls --------------------------------------------------------------------------

NUMBERS = [{"a": 7, "b": 2}, {"a": -7, "b": 2}, {"a": 7, "b": 0}, {"a": None, "b": 2}, {"b": 2}]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a + b", [9, -5, 7, None, None]),
        ("a - b", [5, -9, 7, None, None]),
        ("a * b", [14, -14, 0, None, None]),
        ("a / b", [3.5, -3.5, None, None, None]),  # true division; by zero is null
        ("a % b", [1, 1, None, None, None]),  # Python's modulo: the sign of the divisor
        ("-a", [-7, 7, -7, None, None]),
        ("+a", [7, -7, 7, None, None]),
        ("a * 1.5", [10.5, -10.5, 10.5, None, None]),
        ("(a + 1) * 2 - b", [14, -14, 16, None, None]),
        ("a % -2.0", [-1.0, -1.0, -1.0, None, None]),
        ("a + null", [None] * 5),
    ],
)
def test_arithmetic(text, expected):
    assert both(text, NUMBERS) == expected


def test_int_results_stay_ints_and_float_ones_floats():
    expression = parse_expression("a + b")
    assert type(evaluate(expression, {"a": 1, "b": 2})) is int
    assert evaluate_table(expression, table_of([{"a": 1, "b": 2}])).type == pa.int64()
    assert type(evaluate(expression, {"a": 1, "b": 2.0})) is float
    assert evaluate_table(parse_expression("a / b"), table_of([{"a": 4, "b": 2}])).type == pa.float64()


def test_integer_overflow_raises_on_both_sides():
    expression = parse_expression("a * a")
    record = {"a": 2**40}
    with pytest.raises(ExpressionError, match="overflow"):
        evaluate(expression, record)
    with pytest.raises(ExpressionError, match="overflow"):
        evaluate_table(expression, table_of([record]))


def test_type_mismatches_are_null():
    records = [{"n": 1, "s": "x", "flag": True}]
    for text in ["n + s", "s * 2", "-s", "n < s", "not n", "lower(n)", "length(flag)", "year(s)", "flag + 1"]:
        assert both(text, records) == [None], text


# --- comparisons and logic -------------------------------------------------------------------------


def test_comparisons_and_chains():
    records = [{"a": 1, "s": "b"}, {"a": 5, "s": "B"}, {"a": None, "s": None}]
    assert both("a == 1", records) == [True, False, None]
    assert both("a != 1", records) == [False, True, None]
    assert both("a >= 1.0", records) == [True, True, None]
    assert both("0 < a < 3", records) == [True, False, None]
    assert both("s > 'a'", records) == [True, False, None]  # code point order: "B" < "a"
    assert both("a == true", records) == [None, None, None]  # booleans are not numbers


def test_and_or_not_are_three_valued():
    records = [{"x": True}, {"x": False}, {"x": None}]
    assert both("x and false", records) == [False, False, False]
    assert both("x and true", records) == [True, False, None]
    assert both("x or true", records) == [True, True, True]
    assert both("x or false", records) == [True, False, None]
    assert both("not x", records) == [False, True, None]
    # A non-boolean operand counts as null.
    assert both("'yes' or x", records) == [True, None, None]


def test_coalesce_and_conditionals():
    records = [{"a": 1, "b": 10}, {"a": None, "b": 10}, {"a": None, "b": None}, {"a": 5, "b": 1.5}]
    assert both("coalesce(a, b, 0)", records) == [1, 10, 0, 5]
    assert both("case_when(a > 3, 'big', a > 0, 'small', 'none')", records) == [
        "small",
        "none",
        "none",
        "big",
    ]
    assert both("'has a' if a else 'no a'", records) == ["no a", "no a", "no a", "no a"]  # a is not boolean
    assert both("'yes' if a == 1 else 'no'", records) == ["yes", "no", "no", "no"]  # null condition: false
    assert both("a if a > 2 else b", records) == [10, 10, None, 5]
    assert both("case_when(a > 2, null, 0)", records) == [0, 0, 0, None]


def test_branches_of_different_kinds_fail_vectorised_only():
    expression = parse_expression("coalesce(a, 'none')")
    assert [evaluate(expression, record) for record in [{"a": 1}, {}]] == [1, "none"]
    with pytest.raises(ExpressionError, match="different types"):
        evaluate_table(expression, table_of([{"a": 1}, {}]))


# --- strings ---------------------------------------------------------------------------------------

STRINGS = [{"s": "  Hello World\t"}, {"s": "ÉTÉ"}, {"s": ""}, {"s": None}]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lower(s)", ["  hello world\t", "été", "", None]),
        ("upper(s)", ["  HELLO WORLD\t", "ÉTÉ", "", None]),
        ("trim(s)", ["Hello World", "ÉTÉ", "", None]),
        ("length(s)", [14, 3, 0, None]),
        ("concat(s, '!', s)", ["  Hello World\t!  Hello World\t", "ÉTÉ!ÉTÉ", "!", None]),
        ("substr(s, 3, 5)", ["Hello", "É", "", None]),
        ("substr(s, 2)", [" Hello World\t", "TÉ", "", None]),
        ("replace(s, 'l', 'L')", ["  HeLLo WorLd\t", "ÉTÉ", "", None]),
        ("starts_with(s, '  H')", [True, False, False, None]),
        ("ends_with(s, 'É')", [False, True, False, None]),
        ("contains(s, 'World')", [True, False, False, None]),
        ("concat(trim(lower(s)), '-', 'x')", ["hello world-x", "été-x", "-x", None]),
    ],
)
def test_string_functions(text, expected):
    assert both(text, STRINGS) == expected


# --- dates -----------------------------------------------------------------------------------------

MOMENTS = [
    {"at": datetime(2024, 5, 17, 10, 3, 4), "day": date(2024, 2, 29), "text": "2024-05-17T10:03:04"},
    {"at": None, "day": date(2023, 12, 31), "text": "2024-02-30"},
    {"at": datetime(2023, 1, 1), "day": None, "text": "2024-1-5"},
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("year(at)", [2024, None, 2023]),
        ("month(day)", [2, 12, None]),
        ("day(at)", [17, None, 1]),
        ("date_trunc('month', at)", [datetime(2024, 5, 1), None, datetime(2023, 1, 1)]),
        ("date_trunc('week', at)", [datetime(2024, 5, 13), None, datetime(2022, 12, 26)]),
        ("date_trunc('hour', at)", [datetime(2024, 5, 17, 10), None, datetime(2023, 1, 1)]),
        ("date_trunc('year', day)", [date(2024, 1, 1), date(2023, 1, 1), None]),
        ("days_between(day, at)", [78, None, None]),
        ("days_between(at, date('2024-05-20'))", [3, None, 505]),
        ("timestamp(text)", [datetime(2024, 5, 17, 10, 3, 4), None, None]),  # impossible / unpadded: null
        ("date(text)", [None, None, None]),  # date() takes YYYY-MM-DD only
        ("date(at)", [date(2024, 5, 17), None, date(2023, 1, 1)]),
        ("timestamp(day)", [datetime(2024, 2, 29), datetime(2023, 12, 31), None]),
        ("at > timestamp('2024-01-01 00:00:00')", [True, None, False]),
        ("day == date('2024-02-29')", [True, False, None]),
    ],
)
def test_date_functions(text, expected):
    assert both(text, MOMENTS) == expected


def test_now_and_today():
    before = datetime.now(UTC)
    now = evaluate(parse_expression("now()"), {})
    assert before <= now <= datetime.now(UTC)
    assert evaluate(parse_expression("today()"), {}) == datetime.now(UTC).date()
    column = evaluate_table(parse_expression("now()"), table_of([{}, {}]))
    assert column.type == pa.timestamp("us", "UTC") and column.null_count == 0 and len(column) == 2
    assert both("today() > date('2020-01-01')", [{}]) == [True]


# --- fields ----------------------------------------------------------------------------------------


def test_field_references_and_dotted_paths():
    records = [
        {"customer": {"address": {"city": "Paris"}}, "order id": 3, "a.b": 1, "a": {"b": 2}},
        {"customer": None, "order id": None, "a.b": None, "a": {"b": 5}},
    ]
    assert both("upper(customer.address.city)", records) == ["PARIS", None]
    assert both("field('order id') * 2", records) == [6, None]
    assert both("a.b", records) == [1, None]  # the key named with the dots wins
    assert both("missing + 1", records) == [None, None]
    expression = parse_expression("coalesce(customer.address.city, field('order id'), x) if ok else y")
    assert referenced_fields(expression) == {"customer.address.city", "order id", "x", "ok", "y"}


def test_the_tree_is_immutable_and_literals_are_named():
    assert parse_expression("-amount * 2") == Operation(
        "*", (Operation("neg", (FieldRef("amount"),)), Literal(2))
    )
    assert parse_expression("coalesce(x, null, true, false)") == Call(
        "coalesce", (FieldRef("x"), Literal(None), Literal(True), Literal(False))
    )
    assert parse_expression("1 if t else 2") == Conditional(((FieldRef("t"), Literal(1)),), Literal(2))
    with pytest.raises(AttributeError):
        parse_expression("x").path = "y"  # type: ignore[misc]


# --- rejection -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("__import__('os')", "unknown function '__import__'; known functions: case_when, coalesce, concat"),
        ("().__class__", "attribute access is only allowed in field paths"),
        ("a.__class__.__bases__[0]", "Subscript is not allowed"),
        ("name.upper()", "only the expression functions can be called (no methods)"),
        ("(lambda: 1)()", "only the expression functions can be called"),
        ("lambda: 1", "Lambda is not allowed"),
        ("[x for x in items]", "ListComp is not allowed"),
        ("items[0]", "Subscript is not allowed"),
        ("a ** 2", "operator Pow is not supported"),
        ("a // 2", "operator FloorDiv is not supported"),
        ("a in (1, 2)", "comparison In is not supported"),
        ("x := 1", "syntax error at column"),
        ("amount +", "syntax error at column"),
        ("b'bytes'", "unsupported literal"),
        ("2 ** 70 + 1", "operator Pow"),
        ("18446744073709551616", "does not fit in 64 bits"),
        ("lower(s, 'x')", "lower() takes 1 arguments, got 2"),
        ("substr(s, 0, 2)", "substr() start must be an integer literal >= 1 at column 11"),
        ("substr(s, n)", "substr() start must be an integer literal"),
        ("replace(s, '', 'x')", "replace() needs a non-empty string literal"),
        ("starts_with(s, prefix)", "starts_with() needs a string literal"),
        ("date_trunc('decade', at)", "unit must be one of year, month, week, day, hour, minute, second"),
        ("case_when(a, 1)", "case_when() takes 3+ arguments, got 2"),
        ("case_when(a, 1, b, 2)", "needs an odd number"),
        ("coalesce(*xs)", "positional arguments only"),
        ("round(x, ndigits=2)", "unknown function 'round'"),
        ("x.null", "true, false and null are reserved"),
        ("{'a': 1}", "Dict is not allowed"),
        ("f'{x}'", "JoinedStr is not allowed"),
    ],
)
def test_rejected_expressions(text, reason):
    message = rejected(text)
    assert message.startswith("(expression): ")
    assert reason in message, message


def test_syntax_errors_name_the_column():
    assert rejected("amount * * 2") == "(expression): syntax error at column 10: invalid syntax"


def test_non_string_input_is_rejected():
    assert "must be a string, got int" in rejected(5)  # type: ignore[arg-type]


def test_errors_re_anchor_into_the_spec():
    with pytest.raises(SpecError) as caught:
        parse_expression("nope(1)")
    located = caught.value.within(("columns", "total"), file="etl.yaml")
    assert str(located).startswith("etl.yaml: columns.total.(expression): unknown function 'nope'")


def test_vectorised_over_a_million_rows():
    rows = 1_000_000
    table = pa.table({"a": pa.array(range(rows), pa.int64()), "s": pa.array(["x", None] * (rows // 2))})
    result = evaluate_table(
        parse_expression("coalesce(upper(s), 'none') if a % 2 == 0 else concat(s, '!')"), table
    )
    assert len(result) == rows
    assert result[:4].to_pylist() == ["X", None, "X", None]


def test_empty_and_multi_batch_tables():
    expression = parse_expression("a * 2")
    assert evaluate_table(expression, pa.table({"a": pa.array([], pa.int64())})).to_pylist() == []
    chunked = pa.concat_tables([pa.table({"a": [1, 2]}), pa.table({"a": [3]})])
    assert evaluate_table(expression, chunked).to_pylist() == [2, 4, 6]


# --- both evaluators agree on random data ------------------------------------------------------------

TEXT = st.text(alphabet="abAB é\t-", max_size=5)
INTS = st.integers(-100, 100)
FLOATS = st.floats(-1e3, 1e3, allow_nan=False) | st.sampled_from([0.0, 0.5, -2.0])
RECORD = st.fixed_dictionaries(
    {},
    optional={
        "i": st.none() | INTS,
        "j": st.none() | INTS,
        "f": st.none() | FLOATS,
        "s": st.none() | TEXT,
        "t": st.none() | TEXT,
        "b": st.none() | st.booleans(),
        "d": st.none() | st.fixed_dictionaries({}, optional={"x": st.none() | INTS}),
    },
)


def _call(name: str, *args: str) -> str:
    return f"{name}({', '.join(args)})"


def expression_texts() -> dict[str, st.SearchStrategy[str]]:
    """Expression text of each kind: numbers, strings and booleans, built from each other."""
    number_leaves = (
        st.sampled_from(["i", "j", "f", "d.x", "missing", "null"]) | INTS.map(str) | FLOATS.map(repr)
    )
    string_leaves = st.sampled_from(["s", "t", "null"]) | TEXT.map(repr)
    boolean_leaves = st.sampled_from(["b", "true", "false", "null"])

    numbers = st.deferred(
        lambda: (
            number_leaves
            | st.tuples(numbers, st.sampled_from(["+", "-", "*", "/", "%"]), numbers).map(
                lambda p: f"({' '.join(p)})"
            )
            | numbers.map(lambda n: f"(-{n})")
            | strings.map(lambda s: _call("length", s))
            | st.lists(numbers, min_size=1, max_size=3).map(lambda items: _call("coalesce", *items))
            | st.tuples(booleans, numbers, numbers).map(lambda p: f"({p[1]} if {p[0]} else {p[2]})")
            | st.tuples(booleans, numbers, booleans, numbers, numbers).map(lambda p: _call("case_when", *p))
        )
    )
    strings = st.deferred(
        lambda: (
            string_leaves
            | st.tuples(st.sampled_from(["lower", "upper", "trim"]), strings).map(lambda p: _call(*p))
            | st.lists(strings, min_size=1, max_size=3).map(lambda items: _call("concat", *items))
            | st.tuples(strings, st.integers(1, 4), st.integers(0, 3)).map(
                lambda p: f"substr({p[0]}, {p[1]}, {p[2]})"
            )
            | st.tuples(strings, st.sampled_from(["'a'", "'é'", "' '"]), TEXT.map(repr)).map(
                lambda p: _call("replace", *p)
            )
            | st.lists(strings, min_size=1, max_size=3).map(lambda items: _call("coalesce", *items))
            | st.tuples(booleans, strings, strings).map(lambda p: f"({p[1]} if {p[0]} else {p[2]})")
        )
    )
    booleans = st.deferred(
        lambda: (
            boolean_leaves
            | st.tuples(numbers, st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), numbers).map(
                lambda p: f"({' '.join(p)})"
            )
            | st.tuples(strings, st.sampled_from(["==", "<", ">="]), strings).map(
                lambda p: f"({' '.join(p)})"
            )
            | st.tuples(booleans, st.sampled_from(["and", "or"]), booleans).map(lambda p: f"({' '.join(p)})")
            | booleans.map(lambda b: f"(not {b})")
            | st.tuples(
                st.sampled_from(["starts_with", "ends_with", "contains"]), strings, TEXT.map(repr)
            ).map(lambda p: _call(*p))
            # Deliberate type mismatches: null on both sides.
            | st.tuples(numbers, st.sampled_from(["==", "<"]), strings).map(lambda p: f"({' '.join(p)})")
        )
    )
    return {"number": numbers, "string": strings, "boolean": booleans}


EXPRESSIONS = expression_texts()


@settings(max_examples=200, deadline=None)
@given(
    records=st.lists(RECORD, min_size=1, max_size=6),
    text=st.sampled_from(list(EXPRESSIONS)).flatmap(lambda kind: EXPRESSIONS[kind]),
)
def test_vectorised_and_per_record_evaluation_agree(records, text):
    expression = parse_expression(text)
    try:
        per_record = [evaluate(expression, record) for record in records]
    except ExpressionError:
        with pytest.raises(ExpressionError):
            evaluate_table(expression, table_of(records))
        return
    vectorised = evaluate_table(expression, table_of(records)).to_pylist()
    assert all(same(a, b) for a, b in zip(per_record, vectorised, strict=True)), (per_record, vectorised)
