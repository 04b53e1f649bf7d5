"""Schema drift policies against real SQLite and PostgreSQL targets, and through a Dagster run.

Each case loads a first input (the target's schema: id, name, amount), then a drifted one: a column
added, removed or retyped. The policy decides what the target and the quarantine hold afterwards.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pyarrow as pa
import pytest
import yaml

from assets.etl.drift import SchemaDriftError
from assets.etl.factory import build_pipeline, target_base_dir
from assets.etl.loads import LOAD_ID_COLUMN, SqlTarget, open_target
from assets.etl.runner import ArrowTableSource, load_result, run_pipeline
from assets.etl.spec import FileTargetSpec, PipelineSpec, SqlTargetSpec, load_pipelines

FIRST = pa.table(
    {
        "id": pa.array([1, 2], pa.int64()),
        "name": ["alice", "bob"],
        "amount": pa.array([1.5, 2.5], pa.float64()),
    }
)
DRIFTED = {
    # Row 11 carries no value in the drifted column: only row 10 (row 1 of the input) holds one.
    "added": pa.table(
        {"id": pa.array([10, 11]), "name": ["c", "d"], "amount": [3.0, 4.0], "note": ["hi", None]}
    ),
    "removed": pa.table({"id": pa.array([10, 11], pa.int64()), "amount": pa.array([3.0, 4.0])}),
    "retyped": pa.table({"id": pa.array([10, 11], pa.int64()), "name": ["x", "y"], "amount": ["ten", None]}),
}


def spec(policy: str, mode: str = "append") -> PipelineSpec:
    return PipelineSpec.model_validate(
        {
            "source": {"format": "csv", "path": "unused.csv"},
            "contract": {"drift": policy},
            "load": {"mode": mode, **({"keys": ["id"]} if mode == "merge" else {})},
        }
    )


def sql_target(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, table: str = "orders"
) -> SqlTarget:
    url = (
        f"sqlite:///{tmp_path / 'w.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("clean_postgres_url")
    )
    return SqlTarget(SqlTargetSpec(kind="sql", url=url, table=table), run_id="run-1")


def load(target, table: pa.Table, policy: str, mode: str = "append"):
    pipeline = spec(policy, mode)
    result = run_pipeline(pipeline, source=ArrowTableSource(table, name="input"), target=target)
    load_result(result, target, mode=mode, keys=pipeline.load.keys, run_id="run-1")
    return result


def rows(target) -> dict[int, dict]:
    table = target.read()
    return {row["id"]: {k: v for k, v in row.items() if k != LOAD_ID_COLUMN} for row in table.to_pylist()}


@pytest.fixture(params=["sqlite", "postgres"])
def target(request: pytest.FixtureRequest, tmp_path: Path):
    target = sql_target(request.param, tmp_path, request)
    yield target
    target.dispose()


@pytest.mark.parametrize("change", ["added", "removed", "retyped"])
def test_freeze_fails_before_anything_is_staged_naming_the_column(target, change: str):
    load(target, FIRST, "freeze")
    before = rows(target)
    with pytest.raises(SchemaDriftError) as failure:
        load(target, DRIFTED[change], "freeze")
    column = {"added": "note", "removed": "name", "retyped": "amount"}[change]
    assert f"{change} column {column!r}" in str(failure.value)
    assert list(getattr(failure.value.drift, change)) == [column]
    assert rows(target) == before and target.read_staged() is None


def test_evolve_adds_keeps_and_moves_retyped_values_to_a_variant_column(target):
    load(target, FIRST, "evolve")
    added = load(target, DRIFTED["added"], "evolve")
    assert added.drift.added == {"note": "string"}
    assert rows(target)[10]["note"] == "hi" and rows(target)[1]["note"] is None
    removed = load(target, DRIFTED["removed"].set_column(0, "id", pa.array([20, 21])), "evolve")
    assert list(removed.drift.removed) == ["name", "note"]  # note came with the load before
    assert rows(target)[20]["name"] is None and rows(target)[1]["name"] == "alice"  # kept, null in new rows
    retyped = load(target, DRIFTED["retyped"].set_column(0, "id", pa.array([30, 31])), "evolve")
    assert retyped.drift.variants == {"amount": "amount__v_string"}
    after = rows(target)
    assert after[30]["amount"] is None and after[30]["amount__v_string"] == "ten"
    assert after[1]["amount"] == 1.5 and after[1]["amount__v_string"] is None
    assert retyped.counts.loaded == 2 and retyped.counts.quarantined_total == 0


@pytest.mark.parametrize("change", ["added", "removed", "retyped"])
def test_discard_row_quarantines_rows_holding_values_in_drifted_columns(target, change: str):
    load(target, FIRST, "discard_row")
    result = load(target, DRIFTED[change], "discard_row")
    after = rows(target)
    assert set(after[1]) == {"id", "name", "amount"}  # the target's schema is kept
    counts = result.counts
    assert counts.read == counts.loaded + counts.filtered_total + counts.quarantined_total
    if change == "removed":  # nothing to discard: the missing column is null in the new rows
        assert counts.loaded == 2 and after[10]["name"] is None and result.drift.rows_quarantined == 0
        return
    column = "note" if change == "added" else "amount"
    assert counts.quarantined == {"contract.drift": 1} and sorted(after) == [1, 2, 11]
    quarantined = target.read_quarantine().to_pylist()
    assert [(q["row"], q["step"], q["field"]) for q in quarantined] == [(1, "contract.drift", column)]
    assert "discard_row" in quarantined[0]["reason"]


@pytest.mark.parametrize("change", ["added", "removed", "retyped"])
def test_discard_value_keeps_rows_and_counts_the_dropped_values(target, change: str):
    load(target, FIRST, "discard_value")
    result = load(target, DRIFTED[change], "discard_value")
    after = rows(target)
    assert sorted(after) == [1, 2, 10, 11] and set(after[10]) == {"id", "name", "amount"}
    expected = {"added": {"note": 1}, "removed": {}, "retyped": {"amount": 1}}[change]
    assert result.drift.values_discarded == expected
    if change == "retyped":
        assert after[10]["amount"] is None
    assert result.counts.quarantined_total == 0


def test_integers_for_a_floating_column_and_all_null_columns_are_no_drift(target):
    load(target, FIRST, "freeze")
    compatible = pa.table(
        {"id": pa.array([5], pa.int32()), "name": pa.nulls(1), "amount": pa.array([7], pa.int64())}
    )
    result = load(target, compatible, "freeze")
    assert not result.drift.found and rows(target)[5] == {"id": 5, "name": None, "amount": 7.0}


@pytest.mark.parametrize("file_format", ["parquet", "csv"])
def test_file_targets_compare_with_the_previous_file(tmp_path: Path, file_format: str):
    target = open_target(
        FileTargetSpec(kind="file", format=file_format, path=f"t.{file_format}"), tmp_path, "r"
    )
    load(target, FIRST, "evolve")
    result = load(target, DRIFTED["retyped"], "evolve")
    assert result.drift.retyped == {"amount": {"target": "double", "incoming": "string"}}
    assert rows(target)[10]["amount__v_string"] == "ten"
    with pytest.raises(SchemaDriftError, match="added column 'note'"):
        load(target, DRIFTED["added"], "freeze")


# --- through Dagster: metadata, summary, failure -------------------------------------------------------


def write_spec(folder: Path, url: str, policy: str, header: str, rows: list[str]) -> None:
    (folder / "orders.csv").write_text("\n".join([header, *rows]) + "\n")
    (folder / "orders.yaml").write_text(
        yaml.safe_dump(
            {
                "source": {"format": "csv", "path": "orders.csv"},
                "contract": {"drift": policy},
                "target": {"kind": "sql", "url": url, "table": "orders"},
                "load": {"mode": "append"},
            }
        )
    )


def run(folder: Path) -> dg.ExecuteInProcessResult:
    job = build_pipeline(load_pipelines([folder / "orders.yaml"])["orders"]).resolve_job_def(
        "orders_pipeline"
    )
    return job.execute_in_process(instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_the_drift_is_in_the_metadata_and_summary_and_freeze_fails_the_run(
    backend: str, junction_home: Path, tmp_path: Path, request: pytest.FixtureRequest
):
    url = (
        f"sqlite:///{tmp_path / 'w.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("clean_postgres_url")
    )
    write_spec(tmp_path, url, "discard_row", "id,name", ["1,alice", "2,bob"])
    assert run(tmp_path).success
    write_spec(tmp_path, url, "discard_row", "id,name,note", ["3,carol,hi", "4,dave,"])
    result = run(tmp_path)
    assert result.success
    staged = result.asset_materializations_for_node("orders_staged")[0].metadata
    assert staged["schema_drift"].value["added"] == {"note": "string"}
    assert staged["schema_drift"].value["rows_quarantined"] == 1
    assert staged["rows_read"].value == 2 and staged["rows_loaded"].value == 1
    assert staged["rows_quarantined"].value == 1
    assert "| note | added | - | string | rows with values quarantined |" in staged["quality_summary"].value
    published = result.asset_materializations_for_node("orders")[0].metadata
    assert published["schema_drift"].value["policy"] == "discard_row"

    write_spec(tmp_path, url, "freeze", "id,name,note", ["5,erin,hi"])
    frozen = run(tmp_path)
    assert not frozen.success
    failure = frozen.failure_data_for_node("orders_staged")
    assert "added column 'note'" in failure.error.message
    assert frozen.asset_materializations_for_node("orders_staged") == []
    target = open_target(load_pipelines([tmp_path / "orders.yaml"])["orders"].spec.target, target_base_dir())
    try:
        assert sorted(target.read().column("id").to_pylist()) == ["1", "2", "4"]  # CSV reads text
    finally:
        target.dispose()
