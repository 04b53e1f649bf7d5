"""Transforms over Arrow through the runner: quarantine with field and reason, counts that add up."""

from __future__ import annotations

import sys
import textwrap
from datetime import date
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from assets.etl.quarantine import Batch, CountsInvariantError, Quarantine, RowCounts
from assets.etl.runner import ArrowTableSource, run_pipeline
from assets.etl.spec import PipelineSpec, parse_arrow_type
from assets.etl.transforms import DedupeFirst, TransformError, cast_column, cast_valid


def pipeline(*transforms: dict, **extra) -> PipelineSpec:
    return PipelineSpec.model_validate(
        {"source": {"format": "csv", "path": "unused.csv"}, "transforms": list(transforms), **extra}
    )


def run(table: pa.Table, *transforms: dict, batch_size: int = 1000):
    return run_pipeline(pipeline(*transforms), source=ArrowTableSource(table, "memory", batch_size))


def test_cast_failures_go_to_quarantine_with_field_reason_and_position(tmp_path: Path):
    (tmp_path / "orders.csv").write_text(
        "id,amount,placed\n1,10.5,2024-05-01\n2,ten,2024-05-02\n3,7,2024-02-30\n4,,2024-05-04\n5,99999999999999999999,2024-05-05\n"
    )
    spec = PipelineSpec.model_validate(
        {
            "source": {"format": "csv", "path": "orders.csv"},
            "transforms": [
                {"cast": {"id": "int64", "amount": "float32", "placed": "date"}},
                {"cast": {"amount": "int8"}},
            ],
        }
    )
    result = run_pipeline(spec, base_dir=tmp_path)
    table = result.to_table()
    assert table.schema.field("placed").type == pa.date32()
    assert table.to_pylist() == [{"id": 4, "amount": None, "placed": date(2024, 5, 4)}]
    records = sorted(result.quarantine, key=lambda record: record.line)
    assert [(record.line, record.row, record.step, record.field) for record in records] == [
        (2, 1, "transforms[1].cast", "amount"),  # 10.5 does not fit an int8 without losing data
        (3, 2, "transforms[0].cast", "amount"),
        (4, 3, "transforms[0].cast", "placed"),
        (6, 5, "transforms[1].cast", "amount"),  # a float32 (1e20), but not an int8
    ]
    assert records[1].reason.startswith("cannot cast 'ten' to float")
    assert "2024-02-30" in records[2].reason
    assert '"id": 2' in records[1].record
    assert result.counts.read == 5 and result.counts.quarantined_total == 4 and result.counts.loaded == 1


def test_cast_keeps_the_rest_of_the_batch_and_matches_arrow_value_by_value():
    values = ["1", "x", None, "-7", "3.5", " 4", "9223372036854775808", "+2", "", "1e3"]
    cast, failures = cast_column(pa.array(values), pa.int64())
    assert cast is None
    expected = set()
    for index, value in enumerate(values):
        try:
            pa.array([value]).cast(pa.int64())
        except pa.ArrowInvalid:
            expected.add(index)
    assert set(failures) == expected and expected


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.none(), st.integers(-300, 300).map(str), st.text(max_size=4)), max_size=60))
def test_cast_isolates_exactly_the_values_arrow_refuses(values: list[str | None]):
    _, failures = cast_column(pa.array(values, pa.string()), pa.int8())
    for index, value in enumerate(values):
        try:
            pa.array([value], pa.string()).cast(pa.int8())
            refused = False
        except pa.ArrowInvalid:
            refused = True
        assert (index in failures) == refused


def test_an_impossible_cast_fails_the_run_not_the_rows():
    table = pa.table({"tags": pa.array([[1], [2]])})
    with pytest.raises(TransformError, match=r"transforms\[0\].cast.tags: cannot cast list"):
        run(table, {"cast": {"tags": "int64"}})


def test_select_rename_map_and_missing_fields():
    table = pa.table({"code": ["a", "b", "z", None], "n": [1, 2, 3, 4], "drop": [0, 0, 0, 0]})
    result = run(
        table,
        {"select": ["code", "n"]},
        {"rename": {"n": "number"}},
        {
            "map": {
                "field": "code",
                "values": {"a": "Alpha", "b": "Bravo"},
                "to": "label",
                "unmatched": "null",
            }
        },
        {"map": {"field": "code", "values": {"a": "A"}}},
        {"map": {"field": "number", "values": {"1": "one"}, "to": "word", "unmatched": "null"}},
    )
    assert result.to_table().to_pylist() == [
        {"code": "A", "number": 1, "label": "Alpha", "word": "one"},
        {"code": "b", "number": 2, "label": "Bravo", "word": None},
        {"code": "z", "number": 3, "label": None, "word": None},
        {"code": None, "number": 4, "label": None, "word": None},
    ]
    with pytest.raises(TransformError, match=r"transforms\[0\].select: no field 'nope'"):
        run(table, {"select": ["nope"]})


def test_cleanse_trim_null_tokens_replace_case_and_defaults():
    table = pa.table(
        {
            "name": ["  ann ", "N/A", " bob  smith", None],
            "city": ["köln", "-", "PARIS", "x"],
            "n": [1, None, 3, None],
        }
    )
    result = run(
        table,
        {
            "cleanse": {
                "trim": True,
                "null_tokens": ["N/A", "-"],
                "replace": [{"pattern": r"\s+", "with": " "}],
                "case": "title",
                "defaults": {"city": "Unknown", "n": 0},
            }
        },
    )
    assert result.to_table().to_pylist() == [
        {"name": "Ann", "city": "Köln", "n": 1},
        {"name": None, "city": "Unknown", "n": 0},
        {"name": "Bob Smith", "city": "Paris", "n": 3},
        {"name": None, "city": "X", "n": 0},
    ]
    with pytest.raises(TransformError, match="n is int64; cleanse strings"):
        run(table, {"cleanse": {"fields": ["n"], "trim": True}})


def test_derive_with_kernel_expressions():
    table = pa.table({"price": [10.0, 2.5, None], "qty": [2, 4, 1], "name": [" ann", "bob", None]})
    result = run(
        table,
        {
            "derive": {
                "total": "price * qty",
                "label": "upper(trim(name))",
                "big": "coalesce(total > 15, false)",
            }
        },
    )
    assert result.to_table().select(["total", "label", "big"]).to_pylist() == [
        {"total": 20.0, "label": "ANN", "big": True},
        {"total": 10.0, "label": "BOB", "big": False},
        {"total": None, "label": None, "big": False},
    ]


def test_filter_with_kernel_conditions_counts_the_rows_it_drops():
    table = pa.table({"status": ["paid", "open", "paid", None, "void"], "total": [5, 50, 500, 5000, 1]})
    result = run(
        table,
        {
            "filter": {
                "any": [
                    {"field": "status", "op": "eq", "value": "paid"},
                    {"field": "total", "op": "gt", "value": 1000},
                ]
            }
        },
        {"filter": {"not": {"field": "total", "op": "between", "value": [400, 600]}}},
        batch_size=2,
    )
    assert result.to_table().column("total").to_pylist() == [5, 5000]
    assert result.counts.filtered == {"transforms[0].filter": 2, "transforms[1].filter": 1}
    assert len(result.quarantine) == 0 and result.counts.loaded == 2 and result.counts.read == 5


@pytest.mark.parametrize(
    ("keep", "expected"),
    [
        ("first", [("a", 1), ("b", 2), (None, 4), ("c", 6)]),
        ("last", [("b", 5), ("a", 7), ("c", 8), (None, 9)]),
    ],
)
def test_dedupe_keeps_first_or_last_across_batches(keep: str, expected: list[tuple]):
    keys = ["a", "b", "a", None, "b", "c", "a", "c", None]
    table = pa.table({"key": keys, "n": list(range(1, 10))})
    result = run(table, {"dedupe": {"keys": ["key"], "keep": keep}}, batch_size=4 if keep == "first" else 3)
    rows = [(row["key"], row["n"]) for row in result.to_table().to_pylist()]
    if keep == "first":
        # Null keys do not match across batches (see the transforms module): one survives per batch here.
        assert rows == expected + [(None, 9)]
    else:
        assert rows == expected
    assert result.counts.loaded + result.counts.filtered_total == 9


def test_dedupe_last_then_further_steps_run_on_the_released_rows():
    table = pa.table({"id": [1, 2, 1, 3, 2], "v": [10, 20, 11, 30, 21]})
    result = run(
        table,
        {"dedupe": {"keys": ["id"], "keep": "last"}},
        {"filter": {"field": "v", "op": "gt", "value": 15}},
        {"derive": {"double": "v * 2"}},
        batch_size=2,
    )
    assert result.to_table().to_pylist() == [
        {"id": 3, "v": 30, "double": 60},
        {"id": 2, "v": 21, "double": 42},
    ]
    assert result.counts.filtered == {"transforms[0].dedupe": 2, "transforms[1].filter": 1}
    result.counts.check()


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "analyst_steps.py").write_text(
        textwrap.dedent(
            """
            import pyarrow.compute as pc

            def only_even(table):
                return table.filter(pc.equal(pc.bit_wise_and(table["n"], 1), 0))

            def with_square(frame):
                frame["square"] = frame["n"] ** 2
                return frame

            def duplicate(table):
                import pyarrow as pa
                return pa.concat_tables([table, table])
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "analyst_steps"
    sys.modules.pop("analyst_steps", None)


def test_python_functions_on_arrow_and_pandas(user_module: str):
    table = pa.table({"n": [1, 2, 3, 4]})
    result = run(
        table,
        {"python": {"function": f"{user_module}:with_square", "frame": "pandas"}},
        {"python": {"function": f"{user_module}.only_even"}},
    )
    assert result.to_table().to_pylist() == [{"n": 2, "square": 4}, {"n": 4, "square": 16}]
    assert result.counts.filtered == {"transforms[1].python": 2}
    with pytest.raises(TransformError, match="added rows"):
        run(table, {"python": {"function": f"{user_module}:duplicate"}})
    with pytest.raises(TransformError, match="cannot import no_such_module:f"):
        run(table, {"python": {"function": "no_such_module:f"}})


def test_the_counts_invariant_is_enforced():
    counts = RowCounts(read=10, loaded=6, filtered={"f": 3}, quarantined={"q": 1})
    assert counts.check() is counts
    counts.loaded = 7
    with pytest.raises(CountsInvariantError, match=r"rows read \(10\) != loaded \(7\)"):
        counts.check()


# A line of a generated CSV: good, a bad amount, a field too many, an unclosed quote, bytes that are
# not UTF-8, or blank (not a record at all).
LINE_KINDS = st.sampled_from(
    ["good", "bad_amount", "extra_field", "unclosed_quote", "bad_bytes", "blank", "filtered"]
)


@settings(max_examples=40, deadline=None)
@given(
    kinds=st.lists(LINE_KINDS, max_size=40),
    batch_size=st.integers(1, 7),
    keep=st.sampled_from(["first", "last"]),
)
def test_read_equals_loaded_plus_filtered_plus_quarantined(
    tmp_path_factory, kinds: list[str], batch_size: int, keep: str
):
    directory = tmp_path_factory.mktemp("counts")
    lines = {
        "good": b"%d,g,5",
        "bad_amount": b"%d,b,five",
        "extra_field": b"%d,e,1,2",
        "unclosed_quote": b'%d,"u,1',
        "bad_bytes": b"%d,\xff,1",
        "blank": b"",
        "filtered": b"%d,f,-1",
    }
    body = b"".join(
        (lines[kind] % (index % 5) if b"%d" in lines[kind] else lines[kind]) + b"\n"
        for index, kind in enumerate(kinds)
    )
    (directory / "data.csv").write_bytes(b"id,name,amount\n" + body)
    spec = PipelineSpec.model_validate(
        {
            "source": {"format": "csv", "path": "data.csv"},
            "batch_size": batch_size,
            "transforms": [
                {"cast": {"id": "int64", "amount": "int64"}},
                {"filter": {"field": "amount", "op": "gte", "value": 0}},
                {"dedupe": {"keys": ["id", "name"], "keep": keep}},
            ],
        }
    )
    result = run_pipeline(spec, base_dir=directory)
    counts = result.counts
    records = len(kinds) - kinds.count("blank")
    assert counts.read == records
    assert counts.read == counts.loaded + counts.filtered_total + counts.quarantined_total
    assert (
        counts.quarantined_total
        == len(result.quarantine)
        == sum(kinds.count(kind) for kind in ("bad_amount", "extra_field", "unclosed_quote", "bad_bytes"))
    )
    assert counts.filtered.get("transforms[1].filter", 0) == kinds.count("filtered")
    assert (
        counts.loaded
        == result.to_table().num_rows
        == len({index % 5 for index, kind in enumerate(kinds) if kind == "good"})
    )
    assert all(record.line is not None for record in result.quarantine)


def _refused(value: str | None, target: pa.DataType) -> bool:
    try:
        pa.array([value], pa.string()).cast(target)
    except pa.ArrowInvalid:
        return True
    return False


CAST_TYPES = {
    "tiny": "int8",
    "count": "int32",
    "id": "int64",
    "small": "uint16",
    "ratio": "float32",
    "price": "float64",
    "at": "timestamp[us]",
    "zoned": "timestamp[ms, UTC]",
    "day": "date",
    "ok": "bool",
    "amount": "decimal(8,2)",
}
GOOD = {
    "tiny": "7",
    "count": "-12",
    "id": "9007199254740993",
    "small": "65535",
    "ratio": "1.5e3",
    "price": "-0.25",
    "at": "2024-02-29 23:59:59.5",
    "zoned": "2024-02-29T10:00:00+01:00",
    "day": "2024-02-29",
    "ok": "true",
    "amount": "123456.78",
}
BAD = {
    "tiny": ["128", "N/A", "7.0"],
    "count": ["2147483648", "N/A", "1 2"],
    "id": ["12x", "N/A", "#REF!", "9223372036854775808"],
    "small": ["-1", "N/A", "65536"],
    "ratio": ["1,5", "N/A", "$3"],
    "price": ["1..2", "N/A", "e5"],
    "at": ["2024-02-30 00:00:00", "N/A", "yesterday", "2024-01-01 24:00:00", "2024-01-01T10:00:00Z"],
    "zoned": ["2024-01-01 10:00:00", "N/A", "2024-13-01T00:00:00Z"],
    "day": ["2023-02-29", "N/A", "2024-01-01 10:00"],
    "ok": ["maybe", "N/A", "2"],
    "amount": ["1234567.891", "N/A", "abc"],
}


def test_bad_values_of_every_cast_type_go_to_quarantine_once_with_field_and_reason():
    """Each bad value is quarantined with its field and Arrow's reason, a row failing in two fields
    once (for the first field of the spec), and the rest casts; repeated bad values ('N/A') each."""
    names = list(CAST_TYPES)
    columns: dict[str, list[str | None]] = {name: [] for name in names}
    for row in range(40):
        for index, name in enumerate(names):
            bad = BAD[name]
            # Rows 0-9 and 20-29 are clean; the others carry bad values, some in two fields.
            value = (
                GOOD[name]
                if row % 20 < 10
                else bad[(row + index) % len(bad)]
                if (row + index) % 3 == 0
                else GOOD[name]
            )
            columns[name].append(None if row == 5 else value)
    table = pa.table({name: pa.array(values, pa.string()) for name, values in columns.items()})
    result = run(table, {"cast": CAST_TYPES}, batch_size=7)
    types = {name: parse_arrow_type(type_name) for name, type_name in CAST_TYPES.items()}
    expected = {}
    for row in range(40):
        failing = [name for name in names if _refused(columns[name][row], types[name])]
        if failing:
            expected[row + 1] = failing[0]
    assert len(expected) >= 10 and any(
        sum(_refused(columns[name][row - 1], types[name]) for name in names) > 1 for row in expected
    )
    got = {record.row: record.field for record in result.quarantine}
    assert got == expected
    for record in result.quarantine:
        value = columns[record.field][record.row - 1]
        assert record.step == "transforms[0].cast"
        assert record.reason.startswith(f"cannot cast {value!r} to {types[record.field]}")
    clean = result.to_table()
    assert clean.schema == pa.schema([(name, types[name]) for name in names])
    survivors = [row for row in range(40) if row + 1 not in expected]
    assert (
        clean.to_pylist()
        == pa.table(
            {
                name: pa.array([columns[name][row] for row in survivors], pa.string()).cast(types[name])
                for name in names
            }
        ).to_pylist()
    )
    counts = result.counts
    assert counts.read == 40 == counts.loaded + counts.quarantined_total
    assert counts.quarantined == {"transforms[0].cast": len(expected)}


TIMESTAMP_TEXT = st.one_of(
    st.none(),
    st.builds(
        "{:04d}-{:02d}-{:02d}{}".format,
        st.integers(1969, 2100),
        st.integers(0, 13),
        st.integers(0, 32),
        st.sampled_from(
            ["", " 00:00", "T23:59:59", " 24:00:00", " 10:61:00", "T01:02:03.456", "Z", "+01:00"]
        ),
    ),
    st.text(max_size=6),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(TIMESTAMP_TEXT, max_size=60), st.sampled_from(["timestamp[us]", "timestamp[s, UTC]", "date"]))
def test_cast_of_timestamps_and_dates_isolates_exactly_the_values_arrow_refuses(values, type_name):
    target = parse_arrow_type(type_name)
    cast, failures = cast_valid(pa.array(values, pa.string()), target)
    for index, value in enumerate(values):
        refused = _refused(value, target)
        assert (index in failures) == refused
        if refused:
            assert cast[index].as_py() is None
        else:
            assert cast[index] == pa.array([value], pa.string()).cast(target)[0]


def _first_by_key(keys: list[int | None], batch_size: int) -> list[int]:
    """The row numbers `dedupe keep: first` keeps: the first of each key; null keys once per batch."""
    kept, seen = [], set()
    for start in range(0, len(keys), batch_size):
        null_kept = False
        for index in range(start, min(start + batch_size, len(keys))):
            key = keys[index]
            if key is None:
                if not null_kept:
                    kept.append(index)
                    null_kept = True
            elif key not in seen:
                seen.add(key)
                kept.append(index)
    return kept


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.integers(-5, 5)), min_size=1, max_size=80
    ),
    st.integers(1, 25),
    st.sampled_from([pa.int64(), pa.int32(), pa.uint64()]),
)
def test_dedupe_first_by_integer_key_matches_first_occurrence_per_key(keys, batch_size, key_type):
    if key_type != pa.int64():
        low, high = (-(2**31), 2**31 - 1) if key_type == pa.int32() else (0, 2**64 - 1)
        keys = [None if key is None else min(max(key, low), high) for key in keys]
    table = pa.table({"key": pa.array(keys, key_type), "n": list(range(len(keys)))})
    result = run(table, {"dedupe": {"keys": ["key"]}}, batch_size=batch_size)
    assert result.to_table().column("n").to_pylist() == _first_by_key(keys, batch_size)
    assert result.counts.loaded + result.counts.filtered_total == len(keys)


def test_dedupe_first_by_integer_key_refuses_a_key_type_change_between_batches():
    step, quarantine, counts = DedupeFirst("transforms[0].dedupe", ["key"]), Quarantine(), RowCounts()

    def apply(values, key_type):
        batch = Batch.from_table(pa.table({"key": pa.array(values, key_type)}), "memory")
        return step.apply(batch, quarantine, counts).table.column("key").to_pylist()

    assert apply([3, 1, 3, None, 2], pa.int64()) == [3, 1, None, 2]
    assert apply([2, 4, None, 4], pa.int64()) == [4, None]
    with pytest.raises(
        TransformError, match=r"transforms\[0\].dedupe: the key key is int32 here but was int64"
    ):
        apply([5], pa.int32())
    assert counts.filtered == {"transforms[0].dedupe": 3}
