"""The pipeline asset factory end to end: staged + published assets, checks, loads, metadata, CLI.

Every run is a real Dagster execution (`execute_in_process`) into a real SQLite file or the real
PostgreSQL. Great Expectations is imported once per test process; each later validation costs well
under a second, so the runs here stay few and small.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml
from click.testing import CliRunner

from assets.etl.factory import build_pipeline, pipeline_definitions
from assets.etl.loads import LOAD_ID_COLUMN, open_target
from assets.etl.spec import load_pipelines
from orchestration.cli import cli

GOOD_ROWS = [
    "id,customer,amount,status",
    "1,alice,10.5,paid",
    "2,bob,not-a-number,paid",  # quarantined by the cast
    "3,carol,7,cancelled",  # filtered
    "4,dave,3.25,paid",
    "5,erin,-1,paid",  # fails amount_positive, which tolerates a third of the rows (mostly)
]
# Two of three rows with a negative amount: amount_positive (blocking) fails.
BAD_ROWS = ["id,customer,amount,status", "1,alice,-10.5,paid", "4,dave,-3,paid", "6,frank,2,paid"]


def write_pipeline(folder: Path, target: dict, mode: str = "append", keys: list[str] | None = None) -> Path:
    spec = {
        "source": {"format": "csv", "path": "orders.csv"},
        "transforms": [
            {"cast": {"id": "int64", "amount": "float64"}},
            {"filter": {"field": "status", "op": "ne", "value": "cancelled"}},
        ],
        "rules": [
            {
                "name": "amount_positive",
                "condition": {"field": "amount", "op": "gt", "value": 0},
                "blocking": True,
                "mostly": 0.6,
            },
            # A compound condition: GX has no expectation for it, the kernel evaluates it.
            {
                "name": "customer_named",
                "condition": {"any": [{"field": "customer", "op": "starts_with", "value": "a"}, {"field": "id", "op": "gt", "value": 1}]},
                "severity": "warn",
            },
        ],
        "contract": {"columns": {"id": {"type": "int64", "required": True, "unique": True}, "status": {"allowed": ["paid"]}}},
        "target": target,
        "load": {"mode": mode, **({"keys": keys} if keys else {})},
        "owners": ["data-platform@junction.dev"],
        "tags": {"domain": "sales"},
        "group": "sales",
        "schedule": "0 6 * * *",
    }  # fmt: skip
    path = folder / "orders.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def write_input(folder: Path, rows: list[str]) -> None:
    (folder / "orders.csv").write_text("\n".join(rows) + "\n")


def run(folder: Path, instance: dg.DagsterInstance | None = None) -> dg.ExecuteInProcessResult:
    definitions = build_pipeline(load_pipelines([folder / "orders.yaml"])["orders"])
    job = definitions.resolve_job_def("orders_pipeline")
    return job.execute_in_process(instance=instance or dg.DagsterInstance.ephemeral(), raise_on_error=False)


def target_of(folder: Path, run_id: str | None = None):
    """The pipeline's target; with `run_id`, as that run saw it (its staging place)."""
    from assets.etl.factory import target_base_dir

    return open_target(
        load_pipelines([folder / "orders.yaml"])["orders"].spec.target, target_base_dir(), run_id
    )


def sorted_rows(table: pa.Table) -> list[dict]:
    table = table.drop_columns([LOAD_ID_COLUMN]) if LOAD_ID_COLUMN in table.column_names else table
    return sorted(table.to_pylist(), key=lambda row: row["id"])


def sql_target(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> dict:
    url = (
        f"sqlite:///{tmp_path / 'warehouse.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("clean_postgres_url")
    )
    return {"kind": "sql", "url": url, "table": "orders"}


# --- one run, looked at from every side ------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_run_stages_checks_and_publishes_with_metadata_that_adds_up(
    backend: str, pipelines_dir: Path, tmp_path: Path, request: pytest.FixtureRequest
):
    write_pipeline(pipelines_dir, sql_target(backend, tmp_path, request))
    write_input(pipelines_dir, GOOD_ROWS)
    instance = dg.DagsterInstance.ephemeral()
    result = run(pipelines_dir, instance)
    assert result.success

    staged = result.asset_materializations_for_node("orders_staged")[0].metadata
    counts = {
        name: staged[name].value for name in ("rows_read", "rows_loaded", "rows_filtered", "rows_quarantined")
    }
    assert counts == {"rows_read": 5, "rows_loaded": 3, "rows_filtered": 1, "rows_quarantined": 1}
    schema = staged["dagster/column_schema"].value
    assert [(column.name, column.type) for column in schema.columns] == [
        ("id", "int64"), ("customer", "string"), ("amount", "double"), ("status", "string")
    ]  # fmt: skip
    assert staged["quality_score_checks"].value == 1.0
    assert staged["quality_score_rows"].value == pytest.approx(
        2 / 4
    )  # erin fails a rule, bob was quarantined
    summary = staged["quality_summary"].value
    assert "100.0% of checks passed" in summary and "| transforms[0].cast | amount | 1 |" in summary
    assert staged["rows_per_second"].value > 0

    evaluations = {evaluation.check_name: evaluation for evaluation in result.get_asset_check_evaluations()}
    assert set(evaluations) == {
        "amount_positive",
        "customer_named",
        "id_type",
        "id_required",
        "id_unique",
        "status_allowed",
    }
    assert evaluations["amount_positive"].blocking and evaluations["amount_positive"].passed
    assert evaluations["amount_positive"].metadata["sample_bad_values"].value == [-1.0]
    assert evaluations["amount_positive"].metadata["evaluated_by"].value == "great_expectations"
    assert evaluations["customer_named"].metadata["evaluated_by"].value.startswith("junction kernel")
    assert evaluations["customer_named"].severity == dg.AssetCheckSeverity.WARN
    # The instance keeps them: what the UI shows.
    record = instance.get_latest_asset_check_evaluation_record(
        dg.AssetCheckKey(dg.AssetKey("orders_staged"), "amount_positive")
    )
    assert record is not None and record.event.asset_check_evaluation.passed

    published = result.asset_materializations_for_node("orders")[0].metadata
    assert published["rows_published"].value == 3 and published["dagster/row_count"].value == 3
    assert published["dagster/column_schema"].value == schema
    target = target_of(pipelines_dir)
    try:
        assert sorted(target.read().column("id").to_pylist()) == [1, 4, 5]
        assert target_of(pipelines_dir, result.run_id).read_staged() is None  # publishing consumed it
        quarantined = target.read_quarantine()
        assert quarantined.column("line").to_pylist() == [3]
        assert quarantined.column("step").to_pylist() == ["transforms[0].cast"]
        assert quarantined.column("_junction_run_id").to_pylist() == [result.run_id]
    finally:
        target.dispose()


# --- idempotence of every load mode ------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
@pytest.mark.parametrize("mode", ["append", "replace", "merge"])
def test_rerunning_the_same_input_changes_nothing(
    backend: str, mode: str, pipelines_dir: Path, tmp_path: Path, request: pytest.FixtureRequest
):
    write_pipeline(
        pipelines_dir, sql_target(backend, tmp_path, request), mode, ["id"] if mode == "merge" else None
    )
    write_input(pipelines_dir, GOOD_ROWS)
    assert run(pipelines_dir).success
    target = target_of(pipelines_dir)
    try:
        first = sorted_rows(target.read())
        second_run = run(pipelines_dir)
        assert second_run.success
        assert sorted_rows(target.read()) == first
        assert len(target.read_quarantine()) == 1  # the same input's quarantine replaced, not repeated
        if mode == "append":
            published = second_run.asset_materializations_for_node("orders")[0].metadata
            assert (
                published["rows_published"].value == 0
                and "already in the target" in published["skipped"].value
            )
    finally:
        target.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_merge_updates_by_key_and_append_adds_a_new_input(
    backend: str, pipelines_dir: Path, tmp_path: Path, request: pytest.FixtureRequest
):
    write_pipeline(pipelines_dir, sql_target(backend, tmp_path, request), "merge", ["id"])
    write_input(pipelines_dir, GOOD_ROWS)
    assert run(pipelines_dir).success
    write_input(pipelines_dir, ["id,customer,amount,status", "4,dave,99,paid", "7,grace,1,paid"])
    assert run(pipelines_dir).success
    target = target_of(pipelines_dir)
    try:
        rows = {row["id"]: row["amount"] for row in sorted_rows(target.read())}
        assert rows == {1: 10.5, 4: 99.0, 5: -1.0, 7: 1.0}
    finally:
        target.dispose()

    write_pipeline(pipelines_dir, sql_target(backend, tmp_path, request) | {"table": "orders_log"}, "append")
    assert run(pipelines_dir).success
    write_input(pipelines_dir, GOOD_ROWS)
    assert run(pipelines_dir).success
    target = target_of(pipelines_dir)
    try:
        appended = target.read()
        assert appended.num_rows == 2 + 3
        assert len(pc.unique(appended.column(LOAD_ID_COLUMN))) == 2
    finally:
        target.dispose()


@pytest.mark.parametrize("file_format", ["parquet", "csv"])
@pytest.mark.parametrize("mode", ["append", "merge"])
def test_file_targets_publish_atomically_and_idempotently(file_format: str, mode: str, pipelines_dir: Path):
    target_spec = {"kind": "file", "format": file_format, "path": f"warehouse/orders.{file_format}"}
    write_pipeline(pipelines_dir, target_spec, mode, ["id"] if mode == "merge" else None)
    write_input(pipelines_dir, GOOD_ROWS)
    assert run(pipelines_dir).success
    assert run(pipelines_dir).success
    target = target_of(pipelines_dir)
    assert target.path.is_relative_to(pipelines_dir.parent / "junction-home")  # under JUNCTION_HOME
    assert sorted(target.read().column("id").to_pylist()) == [1, 4, 5]
    assert target.read_quarantine().num_rows == 1
    leftovers = [
        path.name for path in target.path.parent.iterdir() if path.name.endswith((".tmp", ".staged.parquet"))
    ]
    assert leftovers == []


# --- a failed blocking check is the rollback ------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_failed_blocking_check_leaves_the_target_untouched(
    backend: str, pipelines_dir: Path, tmp_path: Path, request: pytest.FixtureRequest
):
    write_pipeline(pipelines_dir, sql_target(backend, tmp_path, request), "replace")
    write_input(pipelines_dir, GOOD_ROWS)
    assert run(pipelines_dir).success
    target = target_of(pipelines_dir)
    try:
        before = sorted_rows(target.read())
        write_input(pipelines_dir, BAD_ROWS)
        instance = dg.DagsterInstance.ephemeral()
        result = run(pipelines_dir, instance)
        assert not result.success
        failed = [e.check_name for e in result.get_asset_check_evaluations() if not e.passed]
        assert failed == ["amount_positive"]
        assert result.asset_materializations_for_node("orders") == []
        # The staged step recorded its materialization, then failed; the published step never started.
        assert len(result.asset_materializations_for_node("orders_staged")) == 1
        assert result.failure_data_for_node("orders_staged") is not None
        assert not any(event.step_key == "orders" for event in result.all_events)
        assert sorted_rows(target.read()) == before
        staged = target_of(pipelines_dir, result.run_id).read_staged()
        assert staged is not None and sorted(staged.column("id").to_pylist()) == [1, 4, 6]
        record = instance.get_latest_asset_check_evaluation_record(
            dg.AssetCheckKey(dg.AssetKey("orders_staged"), "amount_positive")
        )
        assert record is not None and not record.event.asset_check_evaluation.passed
    finally:
        target.dispose()


# --- definitions and CLI --------------------------------------------------------------------------------


def test_each_spec_becomes_two_assets_a_job_and_a_schedule(pipelines_dir: Path, tmp_path: Path):
    write_pipeline(pipelines_dir, {"kind": "sql", "url": f"sqlite:///{tmp_path / 'w.db'}", "table": "orders"})
    definitions = pipeline_definitions(pipelines_dir)
    graph = definitions.resolve_asset_graph()
    staged, published = dg.AssetKey("orders_staged"), dg.AssetKey("orders")
    assert graph.get(published).parent_keys == {staged}
    assert graph.get(published).group_name == "sales" and graph.get(published).owners == [
        "data-platform@junction.dev"
    ]
    assert graph.get(published).tags["domain"] == "sales"
    assert set(graph.get(published).kinds) == {"sqlite"}
    blocking = {spec.name: spec.blocking for spec in definitions.resolve_assets_def(staged).check_specs}
    assert blocking["amount_positive"] and not blocking["customer_named"] and blocking["id_unique"]
    schedule = definitions.resolve_schedule_def("orders_schedule")
    assert schedule.cron_schedule == "0 6 * * *" and schedule.job_name == "orders_pipeline"


def test_cli_run_records_the_run_in_the_instance_and_fails_on_a_blocking_check(
    pipelines_dir: Path, tmp_path: Path
):
    write_pipeline(
        pipelines_dir, {"kind": "sql", "url": f"sqlite:///{tmp_path / 'w.db'}", "table": "orders"}, "replace"
    )
    write_input(pipelines_dir, GOOD_ROWS)
    result = CliRunner().invoke(cli, ["pipelines", "run", "orders"])
    assert result.exit_code == 0, result.output
    assert "succeeded" in result.output and "**Quality score**" in result.output

    write_input(pipelines_dir, BAD_ROWS)
    failed = CliRunner().invoke(cli, ["pipelines", "run", "orders"])
    assert failed.exit_code == 1
    assert "blocking check failed: amount_positive" in failed.output

    from orchestration.instance import prepare_dagster_home

    prepare_dagster_home()
    with dg.DagsterInstance.get() as instance:
        runs = instance.get_runs(dg.RunsFilter(job_name="orders_pipeline"))
    assert [run.status for run in runs] == [dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.SUCCESS]

    unknown = CliRunner().invoke(cli, ["pipelines", "run", "nope"])
    assert unknown.exit_code == 1 and "no pipeline named 'nope'" in unknown.output


def test_a_spec_without_target_is_a_checked_staged_asset_only(pipelines_dir: Path):
    path = write_pipeline(pipelines_dir, {"kind": "file", "format": "csv", "path": "unused.csv"})
    spec = yaml.safe_load(path.read_text())
    del spec["target"]
    path.write_text(yaml.safe_dump(spec))
    write_input(pipelines_dir, GOOD_ROWS)
    definitions = pipeline_definitions(pipelines_dir)
    assert set(definitions.resolve_asset_graph().get_all_asset_keys()) == {dg.AssetKey("orders_staged")}
    result = run(pipelines_dir)
    assert result.success
    staged = result.asset_materializations_for_node("orders_staged")[0].metadata
    assert staged["staged_in"].value == "memory (the spec has no target)"
    assert staged["rows_loaded"].value == 3
    assert len(result.get_asset_check_evaluations()) == 6


def test_publishing_alone_takes_the_rows_staged_by_the_latest_staged_run(pipelines_dir: Path, tmp_path: Path):
    """Staging places are per run: a later run of only the published asset finds the staged run's rows."""
    write_pipeline(pipelines_dir, {"kind": "sql", "url": f"sqlite:///{tmp_path / 'w.db'}", "table": "orders"})
    write_input(pipelines_dir, GOOD_ROWS)
    definitions = build_pipeline(load_pipelines([pipelines_dir / "orders.yaml"])["orders"])
    instance = dg.DagsterInstance.ephemeral()
    staged_only = definitions.resolve_implicit_global_asset_job_def().get_subset(
        asset_selection={dg.AssetKey("orders_staged")}
    )
    staging_run = staged_only.execute_in_process(instance=instance)
    assert staging_run.success
    publish_only = definitions.resolve_implicit_global_asset_job_def().get_subset(
        asset_selection={dg.AssetKey("orders")}
    )
    assert publish_only.execute_in_process(instance=instance).success
    target = target_of(pipelines_dir)
    try:
        assert sorted(target.read().column("id").to_pylist()) == [1, 4, 5]
        assert target_of(pipelines_dir, staging_run.run_id).read_staged() is None
    finally:
        target.dispose()
