"""Incremental sync end to end through Dagster: a REST API read from the committed cursor, merged by
key into SQLite and PostgreSQL, the cursor committed with the rows; a re-run with nothing new asks
once and writes nothing; a staged-only run and a SIGKILLed publish leave the state where it was;
`junction pipelines state show|reset` (audited)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
import yaml
from click.testing import CliRunner
from rest_api import Upstream, start_upstream

from assets.etl.factory import build_pipeline
from assets.etl.loads import open_target
from assets.etl.spec import load_pipelines
from orchestration.cli import cli

NAME = "customers"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def served() -> Iterator[Upstream]:
    upstream, server = start_upstream()
    yield upstream
    server.shutdown()


def spread(upstream: Upstream) -> None:
    """25 records, record i updated on 2024-01-i (the newest, 25, on the 25th)."""
    upstream.set_records(25)
    for record in upstream.records:
        record["updated_at"] = f"2024-01-{record['id']:02d}T00:00:00Z"


@pytest.fixture
def upstream(served: Upstream) -> Upstream:
    spread(served)
    served.page_size = 10
    served.auth = ("none",)
    served.faults.clear()
    served.not_json.clear()
    served.slow.clear()
    with served.lock:
        served.requests.clear()
    return served


def target_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'warehouse.db'}"
    return request.getfixturevalue("clean_postgres_url")


def write_spec(folder: Path, upstream: Upstream, url: str) -> None:
    spec = {
        "source": {
            "kind": "rest",
            "base_url": upstream.url,
            "path": "/cursor/records",
            "params": {"since": "{{ incremental.start }}"},
            "paginator": {"type": "cursor", "cursor_path": "meta.next_cursor", "cursor_param": "cursor"},
            "data_selector": "records",
        },
        "incremental": {"cursor": "updated_at", "initial": "2024-01-01T00:00:00Z"},
        "transforms": [{"select": ["id", "name", "status", "updated_at", "address__city"]}],
        "target": {"kind": "sql", "url": url, "table": NAME},
        "load": {"mode": "merge", "keys": ["id"]},
    }
    (folder / f"{NAME}.yaml").write_text(yaml.safe_dump(spec))


def run(
    folder: Path, instance: dg.DagsterInstance, selection: str | None = None
) -> dg.ExecuteInProcessResult:
    definitions = build_pipeline(load_pipelines([folder / f"{NAME}.yaml"])[NAME])
    job = definitions.resolve_job_def(f"{NAME}_pipeline")
    return job.execute_in_process(
        instance=instance,
        raise_on_error=False,
        asset_selection=[dg.AssetKey(selection)] if selection else None,
    )


def published(result: dg.ExecuteInProcessResult) -> dict:
    return {
        name: value.value for name, value in result.asset_materializations_for_node(NAME)[0].metadata.items()
    }


def staged(result: dg.ExecuteInProcessResult) -> dict:
    materialization = result.asset_materializations_for_node(f"{NAME}_staged")[0]
    return {name: value.value for name, value in materialization.metadata.items()}


def state_value(folder: Path) -> str | None:
    spec = load_pipelines([folder / f"{NAME}.yaml"])[NAME].spec
    target = open_target(spec.target, folder)
    try:
        state = target.read_state(NAME)
    finally:
        target.dispose()
    return None if state is None else state.value


def target_rows(url: str) -> dict[int, tuple[str, str]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(sa.text(f"SELECT id, name, updated_at FROM {NAME}")).all()
    finally:
        engine.dispose()
    return {row.id: (row.name, row.updated_at) for row in rows}


def change(upstream: Upstream, ids: list[int], when: str) -> None:
    for record in upstream.records:
        if record["id"] in ids:
            record["name"] = f"renamed {record['id']}"
            record["updated_at"] = when


def add(upstream: Upstream, ids: list[int], when: str) -> None:
    for index in ids:
        upstream.records.append(
            {"id": index, "name": f"customer {index}", "status": "active", "updated_at": when,
             "address": {"city": "new city", "geo": {"lat": 0}}, "tags": []}
        )  # fmt: skip


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_incremental_merge_reads_only_what_changed_and_commits_the_cursor_with_the_rows(
    backend: str, upstream: Upstream, pipelines_dir: Path, tmp_path: Path, request: pytest.FixtureRequest
):
    url = target_url(backend, tmp_path, request)
    write_spec(pipelines_dir, upstream, url)
    instance = dg.DagsterInstance.ephemeral()

    # The first run starts at initial and reads all 25 records over three pages.
    first = run(pipelines_dir, instance)
    assert first.success
    assert staged(first)["incremental"] == {
        "cursor": "updated_at", "before": None, "start": "2024-01-01T00:00:00Z", "end": None,
        "after": "2024-01-25T00:00:00Z", "records_in_window": 25, "full": False,
    }  # fmt: skip
    assert staged(first)["source_requests_made"] == 3
    assert upstream.requests_to("cursor")[0]["since"] == ["2024-01-01T00:00:00Z"]
    assert (published(first)["rows_new"], published(first)["rows_updated"]) == (25, 0)
    assert published(first)["incremental"] == {
        "cursor": "updated_at",
        "before": None,
        "after": "2024-01-25T00:00:00Z",
    }
    assert state_value(pipelines_dir) == "2024-01-25T00:00:00Z"
    assert len(target_rows(url)) == 25

    # Nothing new: one request from the committed value, which returns the boundary record again
    # (a merge re-reads its last value: a record written in the same second is not missed), and the
    # merge writes no row.
    with upstream.lock:
        upstream.requests.clear()
    again = run(pipelines_dir, instance)
    assert again.success
    assert upstream.requests_to("cursor")[0]["since"] == ["2024-01-25T00:00:00Z"]
    assert staged(again)["source_requests_made"] == 1
    assert (published(again)["rows_new"], published(again)["rows_updated"]) == (0, 0)
    assert published(again)["rows_unchanged"] == 1
    assert state_value(pipelines_dir) == "2024-01-25T00:00:00Z"

    # Three change and two arrive: the API is asked from the committed value, five rows are written.
    change(upstream, [3, 7, 11], "2024-02-01T10:00:00Z")
    add(upstream, [26, 27], "2024-02-02T08:30:00Z")
    with upstream.lock:
        upstream.requests.clear()
    third = run(pipelines_dir, instance)
    assert third.success
    assert upstream.requests_to("cursor")[0]["since"] == ["2024-01-25T00:00:00Z"]
    assert staged(third)["incremental"]["records_in_window"] == 6
    assert (published(third)["rows_new"], published(third)["rows_updated"]) == (2, 3)
    assert published(third)["rows_unchanged"] == 1
    assert published(third)["incremental"]["after"] == "2024-02-02T08:30:00Z"
    rows = target_rows(url)
    assert len(rows) == 27 and rows[7] == ("renamed 7", "2024-02-01T10:00:00Z") and rows[1][0] == "customer 1"

    # The next run asks from the new value.
    with upstream.lock:
        upstream.requests.clear()
    fourth = run(pipelines_dir, instance)
    assert upstream.requests_to("cursor")[0]["since"] == ["2024-02-02T08:30:00Z"]
    assert staged(fourth)["source_requests_made"] == 1
    assert (published(fourth)["rows_new"], published(fourth)["rows_updated"]) == (0, 0)
    assert published(fourth)["rows_unchanged"] == 2


@pytest.mark.parametrize("target", ["sql", "parquet"])
def test_an_empty_window_publishes_nothing_and_keeps_the_target(
    target: str, upstream: Upstream, pipelines_dir: Path, tmp_path: Path
):
    """A window the API has nothing in (allowed by `allow_empty`) stages no columns at all; the merge
    leaves the target as it was instead of failing on keys it cannot find."""
    write_spec(pipelines_dir, upstream, f"sqlite:///{tmp_path / 'warehouse.db'}")
    path = pipelines_dir / f"{NAME}.yaml"
    spec = yaml.safe_load(path.read_text())
    spec["incremental"]["initial"] = "2030-01-01T00:00:00Z"
    spec["source"]["allow_empty"] = True
    if target == "parquet":
        spec["target"] = {"kind": "file", "path": str(tmp_path / "customers.parquet"), "format": "parquet"}
    path.write_text(yaml.safe_dump(spec))
    result = run(pipelines_dir, dg.DagsterInstance.ephemeral())
    assert result.success
    assert staged(result)["incremental"]["records_in_window"] == 0
    assert (published(result)["rows_new"], published(result)["rows_updated"]) == (0, 0)
    assert published(result)["rows_published"] == 0


def test_a_staged_only_run_reads_the_window_but_commits_no_state(
    upstream: Upstream, pipelines_dir: Path, tmp_path: Path, request: pytest.FixtureRequest
):
    url = target_url("sqlite", tmp_path, request)
    write_spec(pipelines_dir, upstream, url)
    instance = dg.DagsterInstance.ephemeral()
    assert run(pipelines_dir, instance).success
    add(upstream, [26], "2024-03-01T00:00:00Z")

    staged_only = run(pipelines_dir, instance, selection=f"{NAME}_staged")
    assert staged_only.success
    assert staged(staged_only)["incremental"]["after"] == "2024-03-01T00:00:00Z"
    assert state_value(pipelines_dir) == "2024-01-25T00:00:00Z"  # only a publish commits it
    assert 26 not in target_rows(url)

    # Publishing that staged run commits what it read, rows and cursor together.
    publish_only = run(pipelines_dir, instance, selection=NAME)
    assert publish_only.success
    assert state_value(pipelines_dir) == "2024-03-01T00:00:00Z"
    assert target_rows(url)[26][0] == "customer 26"


def test_state_show_and_reset_from_the_cli_are_audited(
    upstream: Upstream, pipelines_dir: Path, tmp_path: Path, request: pytest.FixtureRequest
):
    from orchestration.kernel import audit

    write_spec(pipelines_dir, upstream, target_url("sqlite", tmp_path, request))
    runner = CliRunner()
    shown = runner.invoke(cli, ["pipelines", "state", "show", NAME])
    assert shown.exit_code == 0, shown.output
    assert "no state" in shown.output and "initial 2024-01-01T00:00:00Z" in shown.output

    assert run(pipelines_dir, dg.DagsterInstance.ephemeral()).success
    shown = runner.invoke(cli, ["pipelines", "state", "show", NAME, "--json"])
    assert json.loads(shown.output)["value"] == "2024-01-25T00:00:00Z"

    moved = runner.invoke(cli, ["pipelines", "state", "reset", NAME, "--to", "2024-06-01", "--yes"])
    assert moved.exit_code == 0, moved.output
    assert state_value(pipelines_dir) == "2024-06-01T00:00:00Z"
    bad = runner.invoke(cli, ["pipelines", "state", "reset", NAME, "--to", "yesterday-ish", "--yes"])
    assert bad.exit_code == 2 and "not an ISO 8601 date or time" in bad.output
    assert state_value(pipelines_dir) == "2024-06-01T00:00:00Z"

    with upstream.lock:
        upstream.requests.clear()
    assert run(pipelines_dir, dg.DagsterInstance.ephemeral()).success
    assert upstream.requests_to("cursor")[0]["since"] == ["2024-06-01T00:00:00Z"]

    forgot = runner.invoke(cli, ["pipelines", "state", "reset", NAME, "--yes"])
    assert forgot.exit_code == 0 and state_value(pipelines_dir) is None
    entries = audit.query(action="pipeline.state_reset")[::-1]
    assert [(entry.details["before"], entry.details["after"]) for entry in entries] == [
        ("2024-01-25T00:00:00Z", "2024-06-01T00:00:00Z"),
        ("2024-06-01T00:00:00Z", None),
    ]
    not_incremental = runner.invoke(cli, ["pipelines", "state", "show", "nope"])
    assert not_incremental.exit_code == 1 and "no pipeline named 'nope'" in not_incremental.output


KILLED_RUN = """
import sys, dagster as dg
from assets.etl.factory import build_pipeline
from assets.etl.spec import load_pipelines
definitions = build_pipeline(load_pipelines([sys.argv[1]])["customers"])
definitions.resolve_job_def("customers_pipeline").execute_in_process(instance=dg.DagsterInstance.ephemeral())
"""


def test_a_publish_killed_after_writing_rows_commits_neither_rows_nor_state(
    upstream: Upstream, pipelines_dir: Path, clean_postgres_url: str
):
    write_spec(pipelines_dir, upstream, clean_postgres_url)
    assert run(pipelines_dir, dg.DagsterInstance.ephemeral()).success
    change(upstream, [5], "2024-04-01T00:00:00Z")
    add(upstream, [26], "2024-04-01T00:00:00Z")

    # Hold the state table against writes (reads go on): the publish merges its rows, then waits to write the cursor in the same
    # transaction - and is SIGKILLed there.
    engine = sa.create_engine(clean_postgres_url)
    holder = engine.connect()
    holder.execute(sa.text("LOCK TABLE _junction_state IN SHARE MODE"))
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, str(pipelines_dir / f"{NAME}.yaml")],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
    )  # fmt: skip
    try:
        waiting = False
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not waiting:
            with engine.connect() as probe:
                waiting = bool(
                    probe.execute(
                        sa.text(
                            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                            "AND query ILIKE '%_junction_state%'"
                        )
                    ).scalar()
                )
            time.sleep(0.2)
        assert waiting, "the publish never reached the state write"
        with engine.connect() as probe:  # the merge ran in the waiting transaction
            in_flight = probe.execute(
                sa.text("SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                        f"WHERE c.relname = '{NAME}' AND l.mode = 'RowExclusiveLock'")
            ).scalar()  # fmt: skip
        assert in_flight >= 1
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        holder.rollback()
        holder.close()
    time.sleep(0.5)  # the server notices the dead connection and rolls its transaction back
    rows = target_rows(clean_postgres_url)
    assert 26 not in rows and rows[5][0] == "customer 5"
    assert state_value(pipelines_dir) == "2024-01-25T00:00:00Z"

    # The next run reads the same range again and commits both.
    again = run(pipelines_dir, dg.DagsterInstance.ephemeral())
    assert again.success
    assert (published(again)["rows_new"], published(again)["rows_updated"]) == (1, 1)
    assert state_value(pipelines_dir) == "2024-04-01T00:00:00Z"
    assert 26 in target_rows(clean_postgres_url)
    engine.dispose()
