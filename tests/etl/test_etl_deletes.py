"""Delete detection through Dagster, on SQLite and PostgreSQL: a source's tombstones (`soft`) and a
full compare of the keys (`detect: full_compare`, every run or once per `every` beside incremental
reads), each deleting the target's rows or flagging them with `_junction_deleted_at`; a compare with
quarantined records deletes nothing; the counts reach the run's metadata and the quality report."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
import yaml
from rest_api import Upstream, start_upstream

from assets.etl.factory import build_pipeline
from assets.etl.loads import open_target
from assets.etl.report import RunReport, facts_from_instance
from assets.etl.spec import PipelineSpec, load_pipelines
from assets.etl.state import CursorState
from orchestration.kernel.spec_errors import SpecError, load_specs

NAME = "accounts"
TOMBSTONE = {"field": "status", "op": "eq", "value": "deleted"}


@pytest.fixture(scope="module")
def served() -> Iterator[Upstream]:
    upstream, server = start_upstream()
    yield upstream
    server.shutdown()


@pytest.fixture
def upstream(served: Upstream) -> Upstream:
    """10 records, record i updated on 2024-01-i."""
    served.set_records(10)
    for record in served.records:
        record["updated_at"] = f"2024-01-{record['id']:02d}T00:00:00Z"
    served.page_size = 4
    served.faults.clear()
    served.not_json.clear()
    with served.lock:
        served.requests.clear()
    return served


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'warehouse.db'}"
    return request.getfixturevalue("clean_postgres_url")


def write_spec(
    folder: Path, upstream: Upstream, url: str, deletes: dict[str, Any], incremental: bool = True
) -> None:
    spec: dict[str, Any] = {
        "source": {
            "kind": "rest",
            "base_url": upstream.url,
            "path": "/page/records",
            "paginator": {"type": "page_number", "total_pages_path": "total_pages"},
            "data_selector": "data",
        },
        "transforms": [{"select": ["id", "name", "status", "updated_at"]}, {"cast": {"id": "int64"}}],
        "target": (
            {"kind": "file", "format": "parquet", "path": url}
            if url.endswith(".parquet")
            else {"kind": "sql", "url": url, "table": NAME}
        ),
        "load": {"mode": "merge", "keys": ["id"], "deletes": deletes},
    }
    if incremental:
        spec["source"]["params"] = {"since": "{{ incremental.start }}"}
        spec["incremental"] = {"cursor": "updated_at", "initial": "2024-01-01T00:00:00Z"}
    (folder / f"{NAME}.yaml").write_text(yaml.safe_dump(spec))


def run(folder: Path, instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    definitions = build_pipeline(load_pipelines([folder / f"{NAME}.yaml"])[NAME])
    result = definitions.resolve_job_def(f"{NAME}_pipeline").execute_in_process(
        instance=instance, raise_on_error=False
    )
    assert result.success
    return result


def metadata(result: dg.ExecuteInProcessResult, node: str = NAME) -> dict[str, Any]:
    [materialization] = result.asset_materializations_for_node(node)
    return {name: value.value for name, value in materialization.metadata.items()}


def rows(url: str) -> dict[int, dict[str, Any]]:
    if url.endswith(".parquet"):
        return {row["id"]: row for row in pq.read_table(url).to_pylist()}
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            found = connection.execute(sa.text(f"SELECT * FROM {NAME}")).mappings().all()
    finally:
        engine.dispose()
    return {row["id"]: dict(row) for row in found}


def tombstone(upstream: Upstream, ids: list[int], when: str) -> None:
    for record in upstream.records:
        if record["id"] in ids:
            record["status"], record["updated_at"] = "deleted", when


def test_soft_deletes_remove_the_tombstoned_rows_and_never_insert_a_tombstone(
    upstream: Upstream, pipelines_dir: Path, url: str
):
    write_spec(pipelines_dir, upstream, url, {"soft": TOMBSTONE})
    instance = dg.DagsterInstance.ephemeral()
    first = run(pipelines_dir, instance)
    assert metadata(first)["rows_new"] == 10 and metadata(first)["rows_deleted"] == 0
    assert "_junction_deleted_at" not in next(iter(rows(url).values()))

    tombstone(upstream, [3, 4], "2024-02-01T00:00:00Z")
    upstream.records.append(
        {"id": 99, "name": "never seen", "status": "deleted", "updated_at": "2024-02-01T00:00:00Z"}
    )
    second = run(pipelines_dir, instance)
    assert metadata(second)["rows_deleted"] == 2
    assert metadata(second)["rows_new"] == 0  # the unseen key's tombstone is not inserted
    assert metadata(second, f"{NAME}_staged")["deletes"]["tombstones"] == 3
    assert sorted(rows(url)) == [1, 2, 5, 6, 7, 8, 9, 10]

    report = RunReport.from_facts(facts_from_instance(instance, NAME, second.run_id))
    assert report.sync == {
        "rows_new": 0, "rows_updated": 0, "rows_unchanged": 1, "rows_deleted": 2,
        "cursor": "updated_at", "cursor_before": "2024-01-10T00:00:00Z",
        "cursor_after": "2024-02-01T00:00:00Z", "full_compare": False,
    }  # fmt: skip
    assert "2 deleted" in report.summary_text()


def test_soft_deletes_in_flag_mode_keep_the_row_and_a_key_that_comes_back_is_live_again(
    upstream: Upstream, pipelines_dir: Path, url: str
):
    write_spec(pipelines_dir, upstream, url, {"soft": TOMBSTONE, "mode": "flag"})
    instance = dg.DagsterInstance.ephemeral()
    run(pipelines_dir, instance)
    assert all(row["_junction_deleted_at"] is None for row in rows(url).values())

    tombstone(upstream, [3], "2024-02-01T00:00:00Z")
    second = run(pipelines_dir, instance)
    assert metadata(second)["rows_deleted"] == 1
    flagged = rows(url)
    assert len(flagged) == 10 and flagged[3]["_junction_deleted_at"] is not None
    assert flagged[3]["status"] == "active"  # the row as it was last seen live
    first_flagged_at = flagged[3]["_junction_deleted_at"]

    # Read again (the boundary record is the tombstone): nothing more is deleted, the time stays.
    again = run(pipelines_dir, instance)
    assert metadata(again)["rows_deleted"] == 0
    assert rows(url)[3]["_junction_deleted_at"] == first_flagged_at

    for record in upstream.records:
        if record["id"] == 3:
            record["status"], record["updated_at"] = "active", "2024-03-01T00:00:00Z"
    back = run(pipelines_dir, instance)
    assert metadata(back)["rows_updated"] == 1 and metadata(back)["rows_deleted"] == 0
    assert rows(url)[3]["_junction_deleted_at"] is None


def test_a_full_compare_on_every_run_deletes_the_keys_the_source_no_longer_returns(
    upstream: Upstream, pipelines_dir: Path, url: str
):
    write_spec(pipelines_dir, upstream, url, {"detect": "full_compare"}, incremental=False)
    instance = dg.DagsterInstance.ephemeral()
    run(pipelines_dir, instance)
    upstream.records = [r for r in upstream.records if r["id"] not in (2, 9)]
    second = run(pipelines_dir, instance)
    assert metadata(second)["rows_deleted"] == 2
    assert metadata(second)["rows_unchanged"] == 8
    assert sorted(rows(url)) == [1, 3, 4, 5, 6, 7, 8, 10]
    assert metadata(second, f"{NAME}_staged")["deletes"]["full_compare"] is True


def test_a_full_compare_beside_incremental_reads_everything_once_per_interval_and_flags(
    upstream: Upstream, pipelines_dir: Path, url: str
):
    write_spec(pipelines_dir, upstream, url, {"detect": "full_compare", "every": "1d", "mode": "flag"})
    instance = dg.DagsterInstance.ephemeral()
    first = run(pipelines_dir, instance)
    state = read_state(pipelines_dir)
    assert state.value == "2024-01-10T00:00:00Z" and state.full_compare_at is not None

    # Not due: an incremental read of the window (the boundary record), nothing compared.
    upstream.records = [r for r in upstream.records if r["id"] not in (5, 6)]
    with upstream.lock:
        upstream.requests.clear()
    second = run(pipelines_dir, instance)
    assert metadata(second, f"{NAME}_staged")["deletes"]["full_compare"] is False
    assert metadata(second)["rows_deleted"] == 0
    assert upstream.requests_to("page")[0]["since"] == ["2024-01-10T00:00:00Z"]
    assert read_state(pipelines_dir).full_compare_at == state.full_compare_at  # carried over

    # A day later the run reads from initial, compares, flags the two missing keys and commits the
    # time of the compare; the cursor does not go back.
    write_state(
        pipelines_dir, CursorState(NAME, "updated_at", state.value, None, None, "2024-01-01T00:00:00Z")
    )
    with upstream.lock:
        upstream.requests.clear()
    third = run(pipelines_dir, instance)
    assert upstream.requests_to("page")[0]["since"] == ["2024-01-01T00:00:00Z"]
    assert metadata(third, f"{NAME}_staged")["incremental"]["full"] is True
    assert metadata(third)["rows_deleted"] == 2
    flagged = {key for key, row in rows(url).items() if row["_junction_deleted_at"] is not None}
    assert flagged == {5, 6}
    after = read_state(pipelines_dir)
    assert after.value == "2024-01-10T00:00:00Z" and after.full_compare_at > "2024-01-02"
    assert first.success


def test_a_full_compare_with_quarantined_records_deletes_nothing_and_says_why(
    upstream: Upstream, pipelines_dir: Path, url: str
):
    write_spec(pipelines_dir, upstream, url, {"detect": "full_compare"}, incremental=False)
    instance = dg.DagsterInstance.ephemeral()
    run(pipelines_dir, instance)
    # Record 4's id no longer casts: it is quarantined, so its key may well still exist upstream.
    upstream.records = [{**r, "id": "four"} if r["id"] == 4 else r for r in upstream.records if r["id"] != 7]
    second = run(pipelines_dir, instance)
    deletes = metadata(second, f"{NAME}_staged")["deletes"]
    assert "1 records were quarantined" in deletes["skipped"]
    assert metadata(second)["rows_deleted"] == 0
    assert len(rows(url)) == 10


def read_state(folder: Path) -> CursorState:
    spec = load_pipelines([folder / f"{NAME}.yaml"])[NAME].spec
    target = open_target(spec.target, folder)
    try:
        state = target.read_state(NAME)
    finally:
        target.dispose()
    assert state is not None
    return state


def write_state(folder: Path, state: CursorState) -> None:
    spec = load_pipelines([folder / f"{NAME}.yaml"])[NAME].spec
    target = open_target(spec.target, folder)
    try:
        target.write_state(state)
    finally:
        target.dispose()


@pytest.mark.parametrize(
    ("load", "extra", "message"),
    [
        ("{mode: append, deletes: {soft: {field: s, op: eq, value: x}}}", "", "deletes: apply to a merge"),
        ("{mode: merge, keys: [id], deletes: {mode: flag}}", "", "give soft"),
        ("{mode: merge, keys: [id], deletes: {every: 1d, soft: {field: s, op: eq, value: x}}}", "", "give detect"),
        ("{mode: merge, keys: [id], deletes: {detect: full_compare, every: 1d}}", "", "without incremental"),
        ("{mode: merge, keys: [id], deletes: {detect: full_compare}}", "inc", "how often"),
        ("{mode: merge, keys: [id], deletes: {detect: everything}}", "", "load.deletes.detect"),
    ],
)  # fmt: skip
def test_delete_detection_specs_fail_naming_the_field(tmp_path: Path, load: str, extra: str, message: str):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "source: {kind: rest, base_url: 'http://x', params: {since: '{{ incremental.start }}'}}\n"
        + ("incremental: {cursor: updated_at, initial: '2024-01-01'}\n" if extra else "")
        + "target: {kind: sql, url: 'sqlite:///x.db', table: t}\n"
        + f"load: {load}\n"
    )
    with pytest.raises(SpecError) as failure:
        load_specs([path], PipelineSpec)
    assert message in str(failure.value) and "bad.yaml" in str(failure.value)


def test_a_parquet_target_deletes_tombstoned_keys_in_its_one_atomic_rename(
    upstream: Upstream, pipelines_dir: Path
):
    path = str(pipelines_dir / "customers.parquet")
    write_spec(pipelines_dir, upstream, path, {"soft": TOMBSTONE})
    instance = dg.DagsterInstance.ephemeral()
    assert metadata(run(pipelines_dir, instance))["rows_deleted"] == 0
    tombstone(upstream, [3, 4], "2024-02-01T00:00:00Z")
    upstream.records.append(
        {"id": 99, "name": "never seen", "status": "deleted", "updated_at": "2024-02-01T00:00:00Z"}
    )
    second = run(pipelines_dir, instance)
    assert metadata(second)["rows_deleted"] == 2
    assert sorted(rows(path)) == [1, 2, 5, 6, 7, 8, 9, 10]  # the unseen key's tombstone is not inserted
    assert read_state(pipelines_dir).value == "2024-02-01T00:00:00Z"  # committed in the same file


def test_a_parquet_target_flags_what_a_full_compare_misses_and_unflags_a_key_that_comes_back(
    upstream: Upstream, pipelines_dir: Path
):
    path = str(pipelines_dir / "customers.parquet")
    write_spec(pipelines_dir, upstream, path, {"detect": "full_compare", "mode": "flag"}, incremental=False)
    instance = dg.DagsterInstance.ephemeral()
    run(pipelines_dir, instance)
    gone = [r for r in upstream.records if r["id"] in (2, 9)]
    upstream.records = [r for r in upstream.records if r["id"] not in (2, 9)]
    second = run(pipelines_dir, instance)
    assert metadata(second)["rows_deleted"] == 2
    flagged = rows(path)
    assert len(flagged) == 10
    assert {key for key, row in flagged.items() if row["_junction_deleted_at"] is not None} == {2, 9}
    flagged_at = flagged[2]["_junction_deleted_at"]

    assert metadata(run(pipelines_dir, instance))["rows_deleted"] == 0  # already flagged: not again
    assert rows(path)[2]["_junction_deleted_at"] == flagged_at
    upstream.records.append(gone[0])
    run(pipelines_dir, instance)
    assert (
        rows(path)[2]["_junction_deleted_at"] is None and rows(path)[9]["_junction_deleted_at"] == flagged_at
    )


def test_delete_detection_on_a_rest_target_is_refused_at_load(tmp_path: Path):
    path = tmp_path / "pushed.yaml"
    path.write_text(
        "source: {kind: rest, base_url: 'http://x'}\n"
        "target: {kind: rest, url: 'http://y/{{ row.id }}', method: PUT}\n"
        "load: {mode: merge, keys: [id], deletes: {detect: full_compare}}\n"
    )
    with pytest.raises(SpecError, match="applies to SQL and file targets"):
        load_specs([path], PipelineSpec)
