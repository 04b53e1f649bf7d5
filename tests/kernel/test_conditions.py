"""Conditions: parse errors, each operator, nulls and kinds, dotted paths, and both evaluators agreeing."""

from __future__ import annotations

import dataclasses
from datetime import UTC, date, datetime, timedelta, timezone

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestration.kernel.conditions import (
    AllOf,
    Not,
    Operator,
    Predicate,
    evaluate,
    evaluate_table,
    parse_condition,
    referenced_fields,
)
from orchestration.kernel.spec_errors import SpecError


def table_of(records: list[dict]) -> pa.Table:
    """The records as a table whose schema is inferred from all of them (`Table.from_pylist` looks at
    the first record's keys only). A row number column keeps the row count when records are empty."""
    rows = pa.array([{"_row": index, **record} for index, record in enumerate(records)])
    return pa.Table.from_batches([pa.RecordBatch.from_struct_array(rows)])


def both(spec: dict, records: list[dict]) -> list[bool]:
    """Evaluate per record and vectorised, insist they agree, return the per-record answers."""
    condition = parse_condition(spec)
    per_record = [evaluate(condition, record) for record in records]
    vectorised = evaluate_table(condition, table_of(records))
    assert vectorised.null_count == 0
    assert vectorised.to_pylist() == per_record
    return per_record


def parse_error(spec) -> list[str]:
    with pytest.raises(SpecError) as caught:
        parse_condition(spec)
    return [str(problem) for problem in caught.value.problems]


# --- operators -----------------------------------------------------------------------------------

AMOUNTS = [{"amount": 5}, {"amount": 1000}, {"amount": 1500.5}, {"amount": None}, {}]


@pytest.mark.parametrize(
    ("op", "value", "expected"),
    [
        ("eq", 1000, [False, True, False, False, False]),
        ("ne", 1000, [True, False, True, False, False]),
        ("gt", 1000, [False, False, True, False, False]),
        ("gte", 1000, [False, True, True, False, False]),
        ("lt", 1000, [True, False, False, False, False]),
        ("lte", 1000, [True, True, False, False, False]),
        ("eq", 1000.0, [False, True, False, False, False]),
        ("gt", 999.5, [False, True, True, False, False]),
        ("in", [5, 1500.5], [True, False, True, False, False]),
        ("not_in", [5, 1500.5], [False, True, False, False, False]),
        ("between", [5, 1000], [True, True, False, False, False]),
        ("between", [1000.5, 2000], [False, False, True, False, False]),
    ],
)
def test_numeric_operators(op, value, expected):
    assert both({"field": "amount", "op": op, "value": value}, AMOUNTS) == expected


NAMES = [{"name": "Alice"}, {"name": "bob"}, {"name": ""}, {"name": None}, {}]


@pytest.mark.parametrize(
    ("op", "value", "expected"),
    [
        ("eq", "bob", [False, True, False, False, False]),
        ("gt", "B", [False, True, False, False, False]),  # code point order: "B" < "a"
        ("contains", "li", [True, False, False, False, False]),
        ("starts_with", "Al", [True, False, False, False, False]),
        ("ends_with", "ob", [False, True, False, False, False]),
        ("matches", "^[A-Z]", [True, False, False, False, False]),
        ("matches", "o", [False, True, False, False, False]),  # search, not full match
        ("matches", "(?i)^B", [False, True, False, False, False]),
        ("in", ["Alice", "carol"], [True, False, False, False, False]),
        ("exists", None, [True, True, True, False, False]),
        ("is_empty", None, [False, False, True, True, True]),
    ],
)
def test_string_operators(op, value, expected):
    spec = {"field": "name", "op": op} if value is None else {"field": "name", "op": op, "value": value}
    assert both(spec, NAMES) == expected


def test_list_operators():
    records = [{"tags": ["vip", "eu"]}, {"tags": []}, {"tags": ["us", None]}, {"tags": None}, {}]
    assert both({"field": "tags", "op": "contains", "value": "vip"}, records) == [
        True,
        False,
        False,
        False,
        False,
    ]
    assert both({"field": "tags", "op": "is_empty"}, records) == [False, True, False, True, True]
    assert both({"field": "tags", "op": "exists"}, records) == [True, True, True, False, False]
    # A substring test does not apply to lists: "v" is not an element.
    assert both({"field": "tags", "op": "contains", "value": "v"}, records) == [False] * 5


def test_boolean_operators():
    records = [{"active": True}, {"active": False}, {"active": None}]
    assert both({"field": "active", "op": "eq", "value": True}, records) == [True, False, False]
    assert both({"field": "active", "op": "gt", "value": False}, records) == [True, False, False]
    # Booleans are not numbers.
    assert both({"field": "active", "op": "eq", "value": 1}, records) == [False, False, False]


# --- nulls and kinds ---------------------------------------------------------------------------------


def test_not_negates_the_two_valued_result_so_null_rows_pass():
    records = [{"x": 1}, {"x": 2}, {"x": None}, {}]
    assert both({"not": {"field": "x", "op": "eq", "value": 1}}, records) == [False, True, True, True]
    assert both({"field": "x", "op": "ne", "value": 1}, records) == [False, True, False, False]


def test_kind_mismatch_is_false_but_ne_and_not_in_hold_for_present_values():
    records = [{"code": "5"}, {"code": "x"}, {"code": None}]
    assert both({"field": "code", "op": "eq", "value": 5}, records) == [False, False, False]
    assert both({"field": "code", "op": "gt", "value": 1}, records) == [False, False, False]
    assert both({"field": "code", "op": "ne", "value": 5}, records) == [True, True, False]
    assert both({"field": "code", "op": "not_in", "value": [5]}, records) == [True, True, False]
    numbers = [{"n": 12}, {"n": None}]
    assert both({"field": "n", "op": "contains", "value": "1"}, numbers) == [False, False]
    assert both({"field": "n", "op": "starts_with", "value": "1"}, numbers) == [False, False]
    assert both({"field": "n", "op": "matches", "value": "1"}, numbers) == [False, False]


def test_large_integers_compare_exactly_with_ints_and_as_floats_with_floats():
    records = [{"n": 2**60 + 1}]
    assert both({"field": "n", "op": "gt", "value": 2**60}, records) == [True]
    # As 64-bit floats 2**60 + 1 rounds to 2**60.
    assert both({"field": "n", "op": "gt", "value": float(2**60)}, records) == [False]
    assert both({"field": "n", "op": "in", "value": [float(2**60)]}, records) == [True]


def test_a_column_of_nulls_only_and_a_missing_column():
    records = [{"x": None}, {"x": None}]
    assert both({"field": "x", "op": "eq", "value": 1}, records) == [False, False]
    assert both({"field": "x", "op": "ne", "value": 1}, records) == [False, False]
    assert both({"field": "nowhere", "op": "is_empty"}, records) == [True, True]
    assert both({"field": "nowhere", "op": "not_in", "value": [1]}, records) == [False, False]


# --- dates and times -----------------------------------------------------------------------------------


def test_iso_strings_compare_with_timestamps_as_utc_instants():
    paris = timezone(timedelta(hours=2))
    records = [
        {"at": datetime(2024, 5, 1, 9, 0)},  # naive: UTC
        {"at": datetime(2024, 5, 1, 11, 0, tzinfo=paris)},  # 09:00 UTC
        {"at": datetime(2024, 4, 30, 23, 0)},
        {"at": None},
    ]
    assert both({"field": "at", "op": "eq", "value": "2024-05-01T09:00:00Z"}, records[:3]) == [
        True,
        True,
        False,
    ]
    assert both({"field": "at", "op": "gte", "value": "2024-05-01"}, records[:2] + records[3:]) == [
        True,
        True,
        False,
    ]
    per_record = parse_condition({"field": "at", "op": "eq", "value": "2024-05-01T11:00:00+02:00"})
    assert [evaluate(per_record, record) for record in records] == [True, True, False, False]


def test_yaml_dates_compare_with_date_columns_and_as_iso_text_with_strings():
    records = [
        {"day": date(2024, 5, 1), "text": "2024-05-01"},
        {"day": date(2024, 6, 1), "text": "2024-06-01"},
    ]
    assert both({"field": "day", "op": "lt", "value": date(2024, 5, 15)}, records) == [True, False]
    assert both({"field": "text", "op": "lt", "value": date(2024, 5, 15)}, records) == [True, False]
    assert both({"field": "day", "op": "between", "value": ["2024-05-01", "2024-05-31"]}, records) == [
        True,
        False,
    ]
    # Strings in the data are never parsed: compared with a number they are another kind.
    assert both({"field": "text", "op": "gt", "value": 20240101}, records) == [False, False]


def test_nanosecond_timestamps_keep_their_precision():
    table = pa.table({"at": pa.array([1_714_554_000_000_000_001], pa.timestamp("ns"))})
    condition = parse_condition({"field": "at", "op": "gt", "value": "2024-05-01T09:00:00"})
    assert evaluate_table(condition, table).to_pylist() == [True]


# --- dotted paths ----------------------------------------------------------------------------------


def test_dotted_paths_walk_nested_records_and_struct_columns():
    records = [
        {"customer": {"address": {"city": "Paris"}}},
        {"customer": {"address": None}},
        {"customer": None},
        {"customer": {"address": {"city": "Lyon"}}},
        {},
    ]
    spec = {"field": "customer.address.city", "op": "eq", "value": "Paris"}
    assert both(spec, records) == [True, False, False, False, False]
    assert both({"field": "customer.address.city", "op": "exists"}, records) == [
        True,
        False,
        False,
        True,
        False,
    ]
    assert both({"field": "customer.address.zip", "op": "is_empty"}, records) == [True] * 5
    assert both({"field": "customer.address.city.more", "op": "exists"}, records) == [False] * 5


def test_a_key_or_column_named_with_the_dots_wins():
    records = [{"a.b": 1, "a": {"b": 2}}]
    assert both({"field": "a.b", "op": "eq", "value": 1}, records) == [True]
    assert both({"field": "a.b", "op": "eq", "value": 2}, records) == [False]


def test_a_path_through_a_non_mapping_is_missing():
    records = [{"a": 5}, {"a": "text"}]
    assert both({"field": "a.b", "op": "exists"}, [records[0]]) == [False]
    assert both({"field": "a.b", "op": "is_empty"}, [records[1]]) == [True]


# --- combinators, tree, fields -------------------------------------------------------------------------


def test_all_any_not_nest():
    spec = {
        "all": [
            {"field": "amount", "op": "gt", "value": 100},
            {
                "any": [
                    {"field": "country", "op": "eq", "value": "FR"},
                    {"field": "vip", "op": "eq", "value": True},
                ]
            },
            {"not": {"field": "status", "op": "in", "value": ["void", "draft"]}},
        ]
    }
    records = [
        {"amount": 200, "country": "FR", "status": "paid"},
        {"amount": 200, "country": "DE", "vip": True},
        {"amount": 200, "country": "DE", "vip": False},
        {"amount": 200, "country": "FR", "status": "void"},
        {"amount": 50, "country": "FR"},
    ]
    assert both(spec, records) == [True, True, False, False, False]
    assert referenced_fields(parse_condition(spec)) == {"amount", "country", "vip", "status"}


def test_the_parsed_tree_is_immutable_and_comparable():
    condition = parse_condition({"not": {"all": [{"field": "a", "op": "exists"}]}})
    assert condition == Not(AllOf((Predicate("a", Operator.EXISTS),)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        condition.condition = None  # type: ignore[misc]
    assert parse_condition({"field": "s", "op": "matches", "value": "a+"}) == parse_condition(
        {"field": "s", "op": "matches", "value": "a+"}
    )


def test_empty_and_record_batch_inputs():
    condition = parse_condition({"field": "a", "op": "eq", "value": 1})
    empty = pa.table({"a": pa.array([], pa.int64())})
    assert evaluate_table(condition, empty).to_pylist() == []
    assert evaluate_table(condition, pa.RecordBatch.from_pylist([{"a": 1}, {"a": 2}])).to_pylist() == [
        True,
        False,
    ]
    chunked = pa.concat_tables([pa.table({"a": [1, 2]}), pa.table({"a": [1]})])
    result = evaluate_table(condition, chunked)
    assert isinstance(result, pa.BooleanArray) and result.to_pylist() == [True, False, True]


def test_one_million_rows_vectorised():
    rows = 1_000_000
    table = pa.table(
        {
            "amount": pa.array(range(rows), pa.int64()),
            "country": pa.array(["FR", "DE", None, "US"] * (rows // 4)),
        }
    )
    condition = parse_condition(
        {
            "all": [
                {"field": "amount", "op": "between", "value": [1000, 500_999]},
                {"not": {"field": "country", "op": "eq", "value": "FR"}},
            ]
        }
    )
    result = evaluate_table(condition, table)
    assert len(result) == rows and result.null_count == 0
    # 500,000 amounts in range, a quarter of them FR; null countries pass the `not`.
    assert result.true_count == 375_000


# --- parse errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"field": "a", "op": "bigger", "value": 1}, "op: unknown operator 'bigger'; expected one of eq, ne"),
        ({"op": "eq", "value": 1}, "field: required"),
        ({"field": "a", "value": 1}, "op: required"),
        ({"field": "a", "op": "eq"}, "value: required for 'eq'"),
        ({"field": "", "op": "eq", "value": 1}, "field: must be a non-empty string"),
        ({"field": "a..b", "op": "eq", "value": 1}, "field: 'a..b' has an empty segment"),
        ({"field": "a", "op": "between", "value": [1]}, "value: 'between' needs a list of two values"),
        ({"field": "a", "op": "between", "value": [1, "z"]}, "value: 'between' bounds must be of one type"),
        ({"field": "a", "op": "in", "value": 3}, "value: 'in' needs a list of values, got int"),
        ({"field": "a", "op": "in", "value": [1, None]}, "value[1]: null never compares equal"),
        ({"field": "a", "op": "eq", "value": None}, "value: null never compares equal"),
        (
            {"field": "a", "op": "eq", "value": [1]},
            "value: expected a number, string, boolean or date, got list",
        ),
        (
            {"field": "a", "op": "eq", "value": 2**64},
            "value: integer 18446744073709551616 does not fit in 64 bits",
        ),
        ({"field": "a", "op": "eq", "value": float("nan")}, "value: NaN never compares equal"),
        ({"field": "a", "op": "exists", "value": True}, "value: 'exists' takes no value"),
        ({"field": "a", "op": "starts_with", "value": 1}, "value: 'starts_with' needs a string, got int"),
        ({"field": "a", "op": "matches", "value": "(a)\\1"}, "value: invalid regular expression '(a)\\\\1'"),
        ({"field": "a", "op": "matches", "value": "(?=x)"}, "value: invalid regular expression"),
        ({"field": "a", "op": "matches", "value": "(?<=x)y"}, "no backreferences or lookarounds"),
        ({"field": "a", "op": "eq", "value": 1, "extra": 2}, "extra: unknown key"),
        ({"all": []}, "all: must be a non-empty list of conditions"),
        ({"all": [{"field": "a", "op": "exists"}], "field": "b"}, "(root): 'all' must be the only key"),
        ("amount > 5", "(root): a condition must be a mapping"),
    ],
)
def test_parse_errors_name_the_relative_location_and_reason(spec, expected):
    problems = parse_error(spec)
    assert len(problems) == 1
    assert expected in problems[0], problems[0]


def test_parse_errors_are_located_inside_nesting_and_all_are_reported():
    spec = {
        "all": [
            {"field": "a", "op": "exists"},
            {"field": "b", "op": "oops", "value": 1},
            {"not": {"any": [{"field": "c", "op": "between", "value": 3}]}},
        ]
    }
    assert parse_error(spec) == [
        "all[1].op: unknown operator 'oops'; expected one of "
        "eq, ne, gt, gte, lt, lte, in, not_in, contains, starts_with, ends_with, matches, exists, is_empty, between",
        "all[2].not.any[0].value: 'between' needs a list of two values [low, high] (inclusive)",
    ]


def test_callers_re_anchor_errors_with_within():
    with pytest.raises(SpecError) as caught:
        parse_condition({"any": [{"field": "a", "op": "nope", "value": 1}]})
    assert str(caught.value.within(("steps", 2, "when"), file="flow.yaml")).startswith(
        "flow.yaml: steps[2].when.any[0].op: unknown operator 'nope'"
    )


# --- both evaluators agree on random data ------------------------------------------------------------

TEXT = st.text(alphabet="abAB é-\n", max_size=4)
SMALL_INT = st.integers(-(2**53), 2**53) | st.integers(-3, 3)
FLOAT = st.floats(allow_nan=False, width=64) | st.sampled_from([0.5, -1.5, 2.0])
MOMENT = st.datetimes(min_value=datetime(2023, 12, 30), max_value=datetime(2024, 1, 3))
KINDS = {
    "i": SMALL_INT,
    "f": FLOAT,
    "n": SMALL_INT | FLOAT,  # a mixed column: Arrow infers double
    "s": TEXT,
    "b": st.booleans(),
    "t": MOMENT,
    "l": st.lists(st.none() | st.integers(-3, 3), max_size=3),
}
NESTED = st.fixed_dictionaries(
    {},
    optional={
        "x": st.none() | st.integers(-3, 3),
        "y": st.none() | TEXT,
        "z": st.none() | st.fixed_dictionaries({}, optional={"w": st.none() | st.integers(-3, 3)}),
    },
)
RECORD = st.fixed_dictionaries(
    {}, optional={**{name: st.none() | values for name, values in KINDS.items()}, "d": st.none() | NESTED}
)
FIELDS = [*KINDS, "d", "d.x", "d.y", "d.z", "d.z.w", "missing"]
SCALAR = (
    st.integers(-3, 3)
    | SMALL_INT
    | FLOAT
    | TEXT
    | st.booleans()
    | MOMENT
    | st.sampled_from(["2024-01-01", "2024-01-01T12:00:00+01:00", "", "a"])
)
PATTERNS = st.sampled_from(["a", "^a", "b$", "[aA]+", "(?i)ab", "a.b", "^$", "é|-", "\\s"])


@st.composite
def predicate_specs(draw) -> dict:
    field_name = draw(st.sampled_from(FIELDS))
    op = draw(st.sampled_from(list(Operator)))
    spec = {"field": field_name, "op": op.value}
    if op in (Operator.IN, Operator.NOT_IN):
        spec["value"] = draw(st.lists(SCALAR, max_size=4))
    elif op is Operator.BETWEEN:
        kind = draw(st.sampled_from([st.integers(-3, 3) | FLOAT, TEXT, MOMENT]))
        spec["value"] = sorted([draw(kind), draw(kind)])
    elif op is Operator.MATCHES:
        spec["value"] = draw(PATTERNS)
    elif op in (Operator.STARTS_WITH, Operator.ENDS_WITH):
        spec["value"] = draw(TEXT)
    elif op not in (Operator.EXISTS, Operator.IS_EMPTY):
        spec["value"] = draw(SCALAR)
    return spec


CONDITION_SPECS = st.recursive(
    predicate_specs(),
    lambda children: st.one_of(
        st.lists(children, min_size=1, max_size=3).map(lambda items: {"all": items}),
        st.lists(children, min_size=1, max_size=3).map(lambda items: {"any": items}),
        children.map(lambda item: {"not": item}),
    ),
    max_leaves=6,
)


@settings(max_examples=200, deadline=None)
@given(records=st.lists(RECORD, min_size=1, max_size=8), spec=CONDITION_SPECS)
def test_vectorised_and_per_record_evaluation_agree(records, spec):
    condition = parse_condition(spec)
    vectorised = evaluate_table(condition, table_of(records))
    assert vectorised.null_count == 0
    assert vectorised.to_pylist() == [evaluate(condition, record) for record in records]


def test_aware_timestamp_columns_compare_in_utc():
    table = pa.table(
        {"at": pa.array([datetime(2024, 5, 1, 9, tzinfo=UTC)], pa.timestamp("us", "Europe/Paris"))}
    )
    condition = parse_condition({"field": "at", "op": "eq", "value": "2024-05-01T11:00:00+02:00"})
    assert evaluate_table(condition, table).to_pylist() == [True]
