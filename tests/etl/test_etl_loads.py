"""Loads below the assets: what the end-to-end tests cannot provoke."""

from __future__ import annotations

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
