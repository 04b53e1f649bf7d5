"""Loads below the assets: what the end-to-end tests cannot provoke."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

import pyarrow as pa
import pytest
import sqlalchemy as sa
import yaml

from assets.etl import factory
from assets.etl.loads import SqlTarget, _binary_copy_fits
from assets.etl.runner import run_pipeline
from assets.etl.spec import SqlTargetSpec, load_pipelines
from assets.etl.transforms import TransformError


def test_sqlite_targets_roll_back_ddl_with_the_transaction(tmp_path):
    """The swap (drop + rename) is one transaction on SQLite too, not two autocommitted statements."""
    target = SqlTarget(SqlTargetSpec(kind="sql", url=f"sqlite:///{tmp_path / 'w.db'}", table="orders"))
    try:
        target.stage(pa.table({"id": [1, 2]}), "load-1")
        assert target.publish("replace", []).target_rows == 2
        with pytest.raises(RuntimeError), target.engine.begin() as connection:
            connection.execute(sa.text("DROP TABLE orders"))
            raise RuntimeError("the publish failed halfway")
        assert target.read().column("id").to_pylist() == [1, 2]
    finally:
        target.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_bulk_paths_keep_empty_strings_nulls_quotes_and_types_apart(backend, tmp_path, request):
    """COPY's CSV tells '' from NULL only by quoting; executemany binds values. Both round-trip."""
    url = (
        f"sqlite:///{tmp_path / 'w.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("clean_postgres_url")
    )
    target = SqlTarget(SqlTargetSpec(kind="sql", url=url, table="things"))
    when = datetime(2013, 1, 1, 10, 0, tzinfo=UTC)
    rows = pa.table(
        {
            "id": pa.array([1, 2, 3], pa.int64()),
            "text": ["", None, 'say "hi",\nthen go'],
            "ok": [True, None, False],
            "at": pa.array([when, None, when], pa.timestamp("s", "UTC")),
        }
    )
    try:
        target.stage(rows, "load-1")
        target.publish("merge", ["id"])
        back = sorted(target.read().to_pylist(), key=lambda row: row["id"])
        assert [row["text"] for row in back] == ["", None, 'say "hi",\nthen go']
        assert [None if row["ok"] is None else bool(row["ok"]) for row in back] == [True, None, False]
        assert [row["at"] is None for row in back] == [False, True, False]
        if backend == "postgres":  # TIMESTAMPTZ: the same instant back; SQLite keeps ISO text
            assert back[0]["at"] == when
        assert all(row["_junction_load_id"] == "load-1" for row in back)
    finally:
        target.dispose()


def test_binary_and_csv_copy_stage_the_same_rows(clean_postgres_url):
    """Staging goes by ADBC's binary COPY when every type has an exact binary form, else by CSV COPY
    (an int8 column here): both give the same rows and column types back."""
    when = datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=UTC)
    columns = {
        "id": pa.array([1, 2, None], pa.int64()),
        "small": pa.array([-3, None, 32767], pa.int16()),
        "medium": pa.array([None, 7, -2_000_000_000], pa.int32()),
        "price": pa.array([0.1, None, -1e300], pa.float64()),
        "text": pa.array(["", None, 'quote " comma , \\ newline\n ünï'], pa.large_string()),
        "ok": pa.array([True, None, False]),
        "day": pa.array([when.date(), None, when.date()], pa.date32()),
        "naive": pa.array([when.replace(tzinfo=None), None, datetime(1970, 1, 1)], pa.timestamp("us")),
        "zoned": pa.array([when, None, when], pa.timestamp("ms", "UTC")),
    }
    assert all(_binary_copy_fits(values.type) for values in columns.values())
    assert not _binary_copy_fits(pa.int8())
    staged = {}
    for path, extra in (("binary", {}), ("csv", {"tiny": pa.array([1, None, -1], pa.int8())})):
        target = SqlTarget(SqlTargetSpec(kind="sql", url=clean_postgres_url, table=f"rows_{path}"))
        try:
            target.stage(pa.table({**columns, **extra}), "load-1")
            back = target.read_staged()
            assert back is not None
            staged[path] = sorted(
                back.drop_columns(list(extra)).to_pylist(), key=lambda row: row["small"] or 0
            )
            with target.engine.connect() as connection:
                types = dict(
                    connection.execute(
                        sa.text(
                            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = :t"
                        ),
                        {"t": f"rows_{path}_staged"},
                    ).all()
                )
            staged[f"{path} types"] = {name: kind for name, kind in types.items() if name != "tiny"}
        finally:
            target.dispose()
    assert staged["binary"] == staged["csv"]
    assert staged["binary types"] == staged["csv types"]
    assert staged["binary"][2]["text"] == 'quote " comma , \\ newline\n ünï'
    assert staged["binary"][0]["zoned"] == when.replace(microsecond=123000)
    assert all(row["_junction_load_id"] == "load-1" for row in staged["binary"])


def _streamed_pipeline(tmp_path, name: str, lines: list[str], transforms: list[dict], url: str):
    """A JSON Lines pipeline read one line per batch into a PostgreSQL target."""
    (tmp_path / f"{name}.jsonl").write_text("".join(line + "\n" for line in lines))
    spec = {
        "name": name,
        "source": {"format": "jsonl", "path": f"{name}.jsonl"},
        "batch_size": 1,
        "transforms": transforms,
        "target": {"kind": "sql", "url": url, "table": name},
    }
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    return load_pipelines([tmp_path / f"{name}.yaml"])[name]


def test_the_staging_stream_commits_every_batch_only_when_the_input_ends(clean_postgres_url, tmp_path):
    """Each clean batch goes into the staging COPY as it is produced; the staging table appears, with
    every row, only when the stream finishes (one transaction), never half-filled."""
    lines = [json.dumps({"id": i, "name": f"n{i}"}) for i in range(1, 6)]
    pipeline = _streamed_pipeline(tmp_path, "streamed", lines, [], clean_postgres_url)
    target = SqlTarget(pipeline.spec.target, run_id="run-streamed")
    try:
        result = run_pipeline(pipeline, target=target, stage_while_reading=True)
        assert result.staging is not None and result.staging.rows == 5
        assert target.read_staged() is None  # the COPY's transaction is still open
        assert result.staging.finish() is True
        staged = target.read_staged()
        assert staged is not None
        assert sorted(staged.column("id").to_pylist()) == [1, 2, 3, 4, 5]
        assert set(staged.column("_junction_load_id").to_pylist()) == {result.identity.load_id}
        # The load id is filled by a column default during the COPY only: none is left on the table,
        # which a replace publishes as the target itself.
        with target.engine.connect() as connection:
            default = connection.execute(
                sa.text(
                    "SELECT column_default FROM information_schema.columns "
                    "WHERE table_name = :table AND column_name = '_junction_load_id'"
                ),
                {"table": target.staged_name},
            ).scalar_one()
        assert default is None
    finally:
        target.dispose()


def test_the_staging_stream_gives_up_on_batches_of_another_type_and_the_table_is_staged_whole(
    clean_postgres_url, tmp_path
):
    """Batch types are promoted into one table only at the end (int, then double): the stream rolls
    back and the staged asset stages the promoted table instead, as without a stream."""
    pipeline = _streamed_pipeline(
        tmp_path, "promoted", ['{"id": 1, "v": 1}', '{"id": 2, "v": 2.5}'], [], clean_postgres_url
    )
    target = SqlTarget(pipeline.spec.target, run_id="run-promoted")
    try:
        factory.stage(pipeline, target, "run-promoted", logging.getLogger("test"))
        staged = target.read_staged()
        assert staged is not None
        assert sorted(staged.column("v").to_pylist()) == [1.0, 2.5]
    finally:
        target.dispose()


def test_a_pipeline_failing_after_its_first_batch_leaves_the_staging_place_as_it_was(
    clean_postgres_url, tmp_path
):
    """The stream has started when a later batch fails the run: its COPY rolls back, so an earlier
    attempt's staged rows are still there, untouched."""
    pipeline = _streamed_pipeline(
        tmp_path,
        "broken",
        ['{"id": 1, "v": "a"}', '{"id": 2, "v": {"nested": 1}}'],
        [{"cast": {"v": "string"}}],
        clean_postgres_url,
    )
    target = SqlTarget(pipeline.spec.target, run_id="run-broken")
    try:
        target.stage(pa.table({"id": [9]}), "earlier-attempt")
        with pytest.raises(TransformError, match="cast.v"):
            factory.stage(pipeline, target, "run-broken", logging.getLogger("test"))
        staged = target.read_staged()
        assert staged is not None and staged.column("id").to_pylist() == [9]
        assert target.read().num_rows == 0  # nothing was published
    finally:
        target.dispose()
