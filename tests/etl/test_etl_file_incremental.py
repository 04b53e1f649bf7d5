"""Incremental by file: a file source with `incremental: {}` reads only files that are new or
changed since the last publish (path + size + mtime, or the content hash with `identity: content`),
the files' prints committed with the rows, into SQLite and Parquet targets; `state show` lists them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
import yaml
from click.testing import CliRunner

from assets.etl.factory import build_pipeline
from assets.etl.spec import PipelineSpec, load_pipelines
from orchestration.cli import cli
from orchestration.kernel.spec_errors import SpecError, load_specs

NAME = "drops"


def write(folder: Path, name: str, rows: list[tuple[int, str]], mtime_ns: int | None = None) -> None:
    path = folder / "in" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("id,name\n" + "".join(f"{i},{n}\n" for i, n in rows))
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def write_spec(folder: Path, target: dict[str, Any], mode: str = "merge", identity: str = "stat") -> None:
    spec = {
        "source": {"kind": "file", "format": "csv", "path": "in/*.csv", "identity": identity},
        "incremental": {},
        "transforms": [{"cast": {"id": "int64"}}],
        "target": target,
        "load": {"mode": mode, "keys": ["id"]} if mode == "merge" else {"mode": mode},
    }
    (folder / f"{NAME}.yaml").write_text(yaml.safe_dump(spec))


def run(folder: Path, instance: dg.DagsterInstance) -> tuple[dict[str, Any], dict[str, Any]]:
    job = build_pipeline(load_pipelines([folder / f"{NAME}.yaml"])[NAME]).resolve_job_def(f"{NAME}_pipeline")
    result = job.execute_in_process(instance=instance, raise_on_error=False)
    assert result.success

    def metadata(node: str) -> dict[str, Any]:
        return {k: v.value for k, v in result.asset_materializations_for_node(node)[0].metadata.items()}

    return metadata(f"{NAME}_staged"), metadata(NAME)


@pytest.fixture(params=["sqlite", "parquet"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "sqlite":
        return {"kind": "sql", "url": f"sqlite:///{tmp_path / 'warehouse.db'}", "table": NAME}
    return {"kind": "file", "format": "parquet", "path": str(tmp_path / "drops.parquet")}


def names(target: dict[str, Any]) -> dict[int, str]:
    if target["kind"] == "file":
        return dict(
            zip(*pq.read_table(target["path"], columns=["id", "name"]).to_pydict().values(), strict=True)
        )
    engine = sa.create_engine(target["url"])
    try:
        with engine.connect() as connection:
            return dict(connection.execute(sa.text(f"SELECT id, name FROM {NAME}")).all())
    finally:
        engine.dispose()


def test_only_new_or_changed_files_are_read(pipelines_dir: Path, target: dict[str, Any]):
    write(pipelines_dir, "a.csv", [(1, "ada"), (2, "alan")])
    write(pipelines_dir, "b.csv", [(3, "barbara")])
    write_spec(pipelines_dir, target)
    instance = dg.DagsterInstance.ephemeral()

    staged, published = run(pipelines_dir, instance)
    assert len(staged["incremental"]["files_read"]) == 2 and staged["rows_read"] == 3
    assert published["incremental"] == {"cursor": "files", "before": None, "after": 2}

    staged, published = run(pipelines_dir, instance)  # nothing new: nothing read, nothing written
    assert staged["incremental"]["files_read"] == [] and staged["incremental"]["files_unchanged"] == 2
    assert staged["rows_read"] == 0 and published["rows_published"] == 0

    write(pipelines_dir, "c.csv", [(4, "carl")])
    write(pipelines_dir, "b.csv", [(3, "barbara l.")], mtime_ns=1_900_000_000_000_000_000)
    staged, published = run(pipelines_dir, instance)
    assert sorted(Path(p).name for p in staged["incremental"]["files_read"]) == ["b.csv", "c.csv"]
    assert (published["rows_new"], published["rows_updated"]) == (1, 1)
    assert names(target) == {1: "ada", 2: "alan", 3: "barbara l.", 4: "carl"}

    shown = CliRunner().invoke(cli, ["pipelines", "state", "show", NAME, "--json"])
    assert shown.exit_code == 0, shown.output
    assert sorted(Path(p).name for p in yaml.safe_load(shown.output)["files"]) == ["a.csv", "b.csv", "c.csv"]


@pytest.mark.parametrize(("identity", "reread"), [("content", False), ("stat", True)])
def test_content_prints_ignore_a_touched_file_and_stat_prints_do_not(
    pipelines_dir: Path, tmp_path: Path, identity: str, reread: bool
):
    target = {"kind": "sql", "url": f"sqlite:///{tmp_path / 'warehouse.db'}", "table": NAME}
    write(pipelines_dir, "a.csv", [(1, "ada")])
    instance = dg.DagsterInstance.ephemeral()
    write_spec(pipelines_dir, target, mode="append", identity=identity)
    run(pipelines_dir, instance)
    os.utime(pipelines_dir / "in" / "a.csv", ns=(1_900_000_000_000_000_000,) * 2)
    staged, _ = run(pipelines_dir, instance)
    assert len(staged["incremental"]["files_read"]) == (1 if reread else 0)


@pytest.mark.parametrize(
    ("source", "incremental", "message"),
    [
        ("{kind: file, format: csv, path: x.csv}", "{cursor: updated_at, initial: 0}", "incremental by file"),
        ("{kind: rest, base_url: 'http://x'}", "{}", "needs the field that grows"),
        ("{kind: file, format: csv, path: x.csv}", "{initial: 0}", "go with a cursor"),
    ],
)
def test_file_incremental_specs_fail_naming_the_field(
    tmp_path: Path, source: str, incremental: str, message: str
):
    path = tmp_path / "bad.yaml"
    path.write_text(
        f"source: {source}\nincremental: {incremental}\ntarget: {{kind: sql, url: 'sqlite:///x.db', table: t}}\n"
        "load: {mode: append}\n"
    )
    with pytest.raises(SpecError, match=message):
        load_specs([path], PipelineSpec)
