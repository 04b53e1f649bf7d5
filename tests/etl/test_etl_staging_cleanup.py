"""Staging places of finished runs are removed once a later publish supersedes them.

Real runs (`execute_in_process`) into a real Dagster instance, staging into real SQLite, PostgreSQL
and Parquet targets: a run whose blocking check fails keeps its staged rows (the rollback, for
inspection) until a later run publishes; then that publish removes them and records it. Places of
runs still in progress, of runs newer than the publish and of tokens no run of the pipeline carries
always stay.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pytest
import yaml
from click.testing import CliRunner
from dagster._core.test_utils import create_run_for_test

from assets.etl.factory import PIPELINE_TAG, build_pipeline
from assets.etl.loads import open_target, run_token, target_base_dir
from assets.etl.spec import load_pipelines
from orchestration.cli import cli

GOOD = ["id,amount", "1,10", "2,20"]
BAD = ["id,amount", "1,-10", "2,-20"]  # the blocking rule fails: nothing is published


def write_spec(folder: Path, target: dict) -> None:
    spec = {
        "source": {"format": "csv", "path": "orders.csv"},
        "transforms": [{"cast": {"id": "int64", "amount": "float64"}}],
        "rules": [{"name": "amount_positive", "condition": {"field": "amount", "op": "gt", "value": 0}, "blocking": True}],
        "target": target,
        "load": {"mode": "replace"},
    }  # fmt: skip
    (folder / "orders.yaml").write_text(yaml.safe_dump(spec))


def target_spec(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> dict:
    if backend == "parquet":
        return {"kind": "file", "format": "parquet", "path": "warehouse/orders.parquet"}
    url = (
        f"sqlite:///{tmp_path / 'warehouse.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("clean_postgres_url")
    )
    return {"kind": "sql", "url": url, "table": "orders"}


def definitions(folder: Path) -> dg.Definitions:
    return build_pipeline(load_pipelines([folder / "orders.yaml"])["orders"])


def run(folder: Path, instance: dg.DagsterInstance, rows: list[str]) -> dg.ExecuteInProcessResult:
    (folder / "orders.csv").write_text("\n".join(rows) + "\n")
    job = definitions(folder).resolve_job_def("orders_pipeline")
    return job.execute_in_process(instance=instance, raise_on_error=False)


def target_of(folder: Path, run_id: str | None = None):
    return open_target(
        load_pipelines([folder / "orders.yaml"])["orders"].spec.target, target_base_dir(), run_id
    )


def places(folder: Path) -> dict[str, str]:
    """The target's staging places: run token -> table or file."""
    target = target_of(folder)
    try:
        return {place.token: place.name for place in target.staging_places()}
    finally:
        target.dispose()


def stage_for(folder: Path, run_id: str) -> None:
    """Stage rows under `run_id`'s token, as that run's staged asset would."""
    target = target_of(folder, run_id)
    try:
        target.stage(pa.table({"id": [9], "amount": [9.0]}), f"load-{run_id[:8]}")
    finally:
        target.dispose()


def published_metadata(result: dg.ExecuteInProcessResult) -> dict:
    [materialization] = result.asset_materializations_for_node("orders")
    return {key: value.value for key, value in materialization.metadata.items()}


@pytest.mark.parametrize("backend", ["sqlite", "postgres", "parquet"])
def test_a_publish_removes_the_places_of_earlier_finished_runs_and_keeps_the_others(
    backend: str, pipelines_dir: Path, tmp_path: Path, request: pytest.FixtureRequest
):
    write_spec(pipelines_dir, target_spec(backend, tmp_path, request))
    instance = dg.DagsterInstance.ephemeral()
    assert run(pipelines_dir, instance, GOOD).success
    assert places(pipelines_dir) == {}  # a publish consumes its own place

    failed = run(pipelines_dir, instance, BAD)
    assert not failed.success
    # The UI's Materialize on the staged asset alone: the implicit asset job, no pipeline tag.
    (pipelines_dir / "orders.csv").write_text("\n".join(BAD) + "\n")
    untagged = (
        definitions(pipelines_dir)
        .resolve_implicit_global_asset_job_def()
        .get_subset(asset_selection={dg.AssetKey("orders_staged")})
        .execute_in_process(instance=instance, raise_on_error=False)
    )
    assert not untagged.success and PIPELINE_TAG not in instance.get_run_by_id(untagged.run_id).tags
    in_progress = create_run_for_test(
        instance,
        job_name="orders_pipeline",
        status=dg.DagsterRunStatus.STARTED,
        tags={PIPELINE_TAG: "orders"},
    )
    stage_for(pipelines_dir, in_progress.run_id)
    stranger = str(uuid.uuid4())  # a token no run of the pipeline carries (another pipeline's, say)
    stage_for(pipelines_dir, stranger)
    before = places(pipelines_dir)
    assert set(before) == {
        run_token(r) for r in (failed.run_id, untagged.run_id, in_progress.run_id, stranger)
    }
    # The failed runs' rows are still there to inspect, until a publish supersedes them.
    assert target_of(pipelines_dir, failed.run_id).read_staged().num_rows == 2

    published = run(pipelines_dir, instance, GOOD)
    assert published.success
    metadata = published_metadata(published)
    assert sorted(metadata["staging_removed"], key=lambda entry: entry["run_id"]) == sorted(
        [
            {"place": before[run_token(failed.run_id)], "run_id": failed.run_id, "status": "FAILURE"},
            {"place": before[run_token(untagged.run_id)], "run_id": untagged.run_id, "status": "FAILURE"},
        ],
        key=lambda entry: entry["run_id"],
    )
    assert sorted(metadata["staging_kept"], key=lambda entry: entry["place"]) == sorted(
        [
            {"place": before[run_token(in_progress.run_id)], "run_id": in_progress.run_id, "reason": "its run is STARTED"},
            {"place": before[run_token(stranger)], "run_id": None, "reason": f"no run of pipeline orders has the token {run_token(stranger)}"},
        ],
        key=lambda entry: entry["place"],
    )  # fmt: skip
    assert set(places(pipelines_dir)) == {run_token(in_progress.run_id), run_token(stranger)}
    # The unknown token is a warning in the run's log: worth a look, never a removal.
    warned = [
        entry.user_message
        for entry in instance.all_logs(published.run_id)
        if entry.level == logging.WARNING and "kept the staging place" in entry.user_message
    ]
    assert warned == [
        f"kept the staging place {before[run_token(stranger)]}: "
        f"no run of pipeline orders has the token {run_token(stranger)}"
    ]

    # Once the in-progress run has finished, the next publish takes its place too; the stranger's stays.
    instance.report_run_failed(instance.get_run_by_id(in_progress.run_id))
    again = published_metadata(run(pipelines_dir, instance, GOOD))
    assert [entry["run_id"] for entry in again["staging_removed"]] == [in_progress.run_id]
    assert set(places(pipelines_dir)) == {run_token(stranger)}


def test_clean_staging_applies_the_rule_on_demand_and_lists_what_it_removes(
    pipelines_dir: Path, tmp_path: Path
):
    from orchestration.instance import prepare_dagster_home

    write_spec(pipelines_dir, target_spec("sqlite", tmp_path, None))
    prepare_dagster_home()
    never = CliRunner().invoke(cli, ["pipelines", "clean-staging", "orders"])
    assert never.exit_code == 0 and "no run has published orders yet" in never.output

    with dg.DagsterInstance.get() as instance:
        old_failure = run(pipelines_dir, instance, BAD)
        publish = run(pipelines_dir, instance, GOOD)
        newer_failure = run(pipelines_dir, instance, BAD)
    assert publish.success and not old_failure.success and not newer_failure.success
    # The old failure's place was removed by the publish; stage it again as a version without this
    # rule would have left it.
    stage_for(pipelines_dir, old_failure.run_id)
    before = places(pipelines_dir)
    assert set(before) == {run_token(old_failure.run_id), run_token(newer_failure.run_id)}

    dry = CliRunner().invoke(cli, ["pipelines", "clean-staging", "orders", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert (
        f"would remove {before[run_token(old_failure.run_id)]} (run {old_failure.run_id}, FAILURE)"
        in dry.output
    )
    assert (
        f"kept {before[run_token(newer_failure.run_id)]} (run {newer_failure.run_id}): "
        "its run is not older than the publishing run"
    ) in dry.output
    assert f"would remove 1 staging place superseded by run {publish.run_id}, kept 1" in dry.output
    assert places(pipelines_dir) == before

    done = CliRunner().invoke(cli, ["pipelines", "clean-staging", "orders"])
    assert done.exit_code == 0, done.output
    assert (
        f"removed {before[run_token(old_failure.run_id)]} (run {old_failure.run_id}, FAILURE)" in done.output
    )
    assert set(places(pipelines_dir)) == {run_token(newer_failure.run_id)}

    unknown = CliRunner().invoke(cli, ["pipelines", "clean-staging", "nope"])
    assert unknown.exit_code == 1 and "no pipeline named 'nope'" in unknown.output
