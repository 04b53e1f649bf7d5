"""Asset sources: a pipeline reads another pipeline's published asset, the lineage graph shows it, the
rows come from where that pipeline published them, and bad references fail at load time."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import yaml

from assets.etl.factory import pipeline_definitions
from assets.etl.loads import open_target, target_base_dir
from assets.etl.runner import run_pipeline
from assets.etl.spec import load_pipelines
from orchestration.errors import JunctionError
from orchestration.kernel.spec_errors import SpecError

ORDERS_CSV = "id,shop,amount\n1,north,10\n2,south,20\n3,north,30\n4,east,5\n"


def write(folder: Path, name: str, spec: dict) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def orders_spec(target: dict) -> dict:
    return {
        "source": {"format": "csv", "path": "orders.csv"},
        "transforms": [{"cast": {"id": "int64", "amount": "float64"}}],
        "target": target,
        "load": {"mode": "replace"},
    }


def totals_spec(reference: dict, **extra) -> dict:
    return {
        "source": {"kind": "asset", **reference},
        "transforms": [
            {"aggregate": {"by": ["shop"], "metrics": {"orders": {"fn": "count"}, "total": {"fn": "sum", "field": "amount"}}}}
        ],
        "target": {"kind": "file", "format": "parquet", "path": "warehouse/totals.parquet"},
        "load": {"mode": "replace"},
        "batch_size": 2,  # the upstream is read in chunks
        **extra,
    }  # fmt: skip


def problems(folder: Path) -> list[str]:
    with pytest.raises(SpecError) as caught:
        load_pipelines(sorted(folder.glob("*.yaml")))
    return [str(problem) for problem in caught.value.problems]


def materialize(
    definitions: dg.Definitions, job: str, instance: dg.DagsterInstance
) -> dg.ExecuteInProcessResult:
    return definitions.resolve_job_def(job).execute_in_process(instance=instance, raise_on_error=False)


# --- load-time problems ---------------------------------------------------------------------------------


def test_unknown_pipelines_and_assets_are_spec_errors_naming_file_and_field(tmp_path: Path):
    write(tmp_path, "orders", orders_spec({"kind": "file", "format": "parquet", "path": "o.parquet"}))
    write(tmp_path, "unstaged", {"source": {"format": "csv", "path": "orders.csv"}})  # no target
    write(tmp_path, "a", totals_spec({"pipeline": "ordres"}))
    write(tmp_path, "b", totals_spec({"asset": "orders_staged"}))
    write(tmp_path, "c", totals_spec({"asset": "sales/orders"}))
    write(tmp_path, "d", totals_spec({"pipeline": "unstaged"}))
    lookup = {"kind": "asset", "pipeline": "nope"}
    write(
        tmp_path,
        "e",
        {
            "source": {"format": "csv", "path": "orders.csv"},
            "transforms": [{"enrich": {"lookup": lookup, "on": ["shop"], "columns": ["x"]}}],
        },
    )
    assert problems(tmp_path) == [
        f"{tmp_path / 'a.yaml'}: source.pipeline: no pipeline named 'ordres' "
        "(pipelines: a, b, c, d, e, orders, unstaged)",
        f"{tmp_path / 'b.yaml'}: source.asset: 'orders_staged' is the staged asset of pipeline 'orders'; "
        "read its published asset 'orders'",
        f"{tmp_path / 'c.yaml'}: source.asset: no pipeline publishes the asset 'sales/orders' "
        "(published assets: a, b, c, d, orders)",
        f"{tmp_path / 'd.yaml'}: source.pipeline: pipeline 'unstaged' has no target, so it publishes nothing to read",
        f"{tmp_path / 'e.yaml'}: transforms[0].enrich.lookup.pipeline: no pipeline named 'nope' "
        "(pipelines: a, b, c, d, e, orders, unstaged)",
    ]
    # References are resolved once every file is valid on its own.
    write(tmp_path, "f", {"source": {"kind": "asset", "pipeline": "orders", "asset": "orders"}})
    assert problems(tmp_path) == [f"{tmp_path / 'f.yaml'}: source: give exactly one of pipeline and asset"]


def test_pipelines_reading_each_other_in_a_cycle_are_a_spec_error(tmp_path: Path):
    target = {"kind": "file", "format": "parquet", "path": "x.parquet"}
    write(tmp_path, "a", {"source": {"kind": "asset", "pipeline": "c"}, "target": target})
    write(tmp_path, "b", {"source": {"kind": "asset", "pipeline": "a"}, "target": target})
    write(
        tmp_path,
        "c",
        {
            "source": {"format": "csv", "path": "orders.csv"},
            "transforms": [
                {"enrich": {"lookup": {"kind": "asset", "asset": "b"}, "on": ["id"], "columns": ["x"]}}
            ],
            "target": target,
        },
    )
    write(tmp_path, "self_reader", {"source": {"kind": "asset", "pipeline": "self_reader"}, "target": target})
    assert problems(tmp_path) == [
        f"{tmp_path / 'b.yaml'}: source.pipeline: pipelines read each other in a cycle: a -> c -> b -> a",
        f"{tmp_path / 'self_reader.yaml'}: source.pipeline: pipelines read each other in a cycle: self_reader -> self_reader",
    ]


def test_validating_one_file_resolves_its_references_beside_it(tmp_path: Path):
    write(tmp_path, "orders", orders_spec({"kind": "file", "format": "parquet", "path": "o.parquet"}))
    write(tmp_path, "totals", totals_spec({"pipeline": "orders"}))
    (tmp_path / "broken.yaml").write_text("source: [")  # not named, so not reported
    loaded = load_pipelines([tmp_path / "totals.yaml"])
    assert list(loaded) == ["totals"]
    assert list(loaded["totals"].upstream) == ["orders"]


# --- lineage and reading ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["parquet", "sqlite", "postgres"])
def test_an_asset_source_is_a_dependency_and_reads_where_the_upstream_published(
    backend: str, junction_home: Path, tmp_path: Path, request: pytest.FixtureRequest
):
    folder = tmp_path / "pipelines"
    folder.mkdir()
    (folder / "orders.csv").write_text(ORDERS_CSV)
    if backend == "parquet":
        target = {"kind": "file", "format": "parquet", "path": "warehouse/orders.parquet"}
    else:
        url = (
            f"sqlite:///{tmp_path / 'w.db'}"
            if backend == "sqlite"
            else request.getfixturevalue("clean_postgres_url")
        )
        target = {"kind": "sql", "url": url, "table": "orders"}
    write(folder, "orders", orders_spec(target))
    write(folder, "totals", totals_spec({"asset": "orders"}))

    definitions = pipeline_definitions(folder)
    graph = definitions.resolve_asset_graph()
    assert graph.get(dg.AssetKey("totals_staged")).parent_keys == {dg.AssetKey("orders")}
    assert graph.get(dg.AssetKey("totals")).parent_keys == {dg.AssetKey("totals_staged")}
    assert dg.AssetKey("totals_staged") in graph.get(dg.AssetKey("orders")).child_keys

    instance = dg.DagsterInstance.ephemeral()
    not_yet = materialize(definitions, "totals_pipeline", instance)
    assert not not_yet.success
    failure = not_yet.failure_data_for_node("totals_staged").error.cause
    assert failure.cls_name == "JunctionError"
    assert "pipeline 'orders' has not published yet" in failure.message
    assert "materialize the asset orders first" in failure.message

    assert materialize(definitions, "orders_pipeline", instance).success
    result = materialize(definitions, "totals_pipeline", instance)
    assert result.success
    staged = result.asset_materializations_for_node("totals_staged")[0].metadata
    assert staged["rows_read"].value == 4 and staged["rows_loaded"].value == 3
    assert staged["aggregated_by_step"].value == {"transforms[0].aggregate": {"input_rows": 4, "groups": 3}}
    totals = open_target(
        load_pipelines(sorted(folder.glob("*.yaml")))["totals"].spec.target, target_base_dir()
    )
    published = totals.read().drop_columns(["_junction_load_id"])
    # The upstream's load id column is not carried into the downstream's rows.
    assert published.to_pylist() == [
        {"shop": "north", "orders": 2, "total": 40.0},
        {"shop": "south", "orders": 1, "total": 20.0},
        {"shop": "east", "orders": 1, "total": 5.0},
    ]
    first_load_id = staged["load_id"].value

    # Same upstream: same identity. A new publish upstream: a new load id downstream.
    assert (
        materialize(definitions, "totals_pipeline", instance)
        .asset_materializations_for_node("totals_staged")[0]
        .metadata["load_id"]
        .value
        == first_load_id
    )
    (folder / "orders.csv").write_text(ORDERS_CSV + "5,east,7\n")
    assert materialize(definitions, "orders_pipeline", instance).success
    again = materialize(definitions, "totals_pipeline", instance)
    assert (
        again.asset_materializations_for_node("totals_staged")[0].metadata["load_id"].value != first_load_id
    )
    assert {row["shop"]: row["orders"] for row in totals.read().to_pylist()}["east"] == 2


def test_an_analysts_spec_in_python_finds_the_upstream_in_the_spec_folder(
    junction_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from assets.etl.spec import PipelineSpec
    from orchestration.settings import reset_settings_cache

    folder = tmp_path / "pipelines"
    folder.mkdir()
    (folder / "orders.csv").write_text(ORDERS_CSV)
    write(folder, "orders", orders_spec({"kind": "file", "format": "csv", "path": "warehouse/orders.csv"}))
    monkeypatch.setenv("JUNCTION_PIPELINES_DIR", str(folder))
    reset_settings_cache()
    spec = PipelineSpec.model_validate({"source": {"kind": "asset", "pipeline": "orders"}})
    with pytest.raises(JunctionError, match="has not published yet"):
        run_pipeline(spec)
    definitions = pipeline_definitions(folder)
    assert materialize(definitions, "orders_pipeline", dg.DagsterInstance.ephemeral()).success
    # A CSV target reads back as strings, like any CSV source: cast it.
    table = run_pipeline(spec).to_table()
    assert table.column_names == ["id", "shop", "amount"]
    assert table.column("amount").to_pylist() == ["10", "20", "30", "5"]
