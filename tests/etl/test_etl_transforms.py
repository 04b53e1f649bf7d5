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

from assets.etl.quarantine import CountsInvariantError, RowCounts
from assets.etl.runner import ArrowTableSource, run_pipeline
from assets.etl.spec import PipelineSpec
from assets.etl.transforms import TransformError, cast_column


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
