"""Loads below the assets: what the end-to-end tests cannot provoke."""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa
import pytest
import sqlalchemy as sa

from assets.etl.loads import SqlTarget
from assets.etl.spec import SqlTargetSpec


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
