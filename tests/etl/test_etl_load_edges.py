"""Load edge cases on real SQLite and PostgreSQL: empty replaces, duplicate merge keys, what a replace
keeps of the target, and two runs of one pipeline staging at the same time."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import sqlalchemy as sa

from assets.etl.loads import LOAD_ID_COLUMN, SqlTarget
from assets.etl.runner import ArrowTableSource, load_result, run_pipeline
from assets.etl.spec import PipelineSpec, SqlTargetSpec
from orchestration.errors import JunctionError

ROWS = pa.table({"id": pa.array([1, 2, 3], pa.int64()), "amount": pa.array([1.0, 2.0, 3.0])})


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return (
        f"sqlite:///{tmp_path / 'w.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("clean_postgres_url")
    )


def target_for(url: str, run_id: str | None = "run-1") -> SqlTarget:
    return SqlTarget(SqlTargetSpec(kind="sql", url=url, table="orders"), run_id=run_id)


def load(target: SqlTarget, table: pa.Table, mode: str, *, transforms: list | None = None):
    spec = PipelineSpec.model_validate(
        {
            "source": {"format": "csv", "path": "unused.csv"},
            "transforms": transforms or [],
            "load": {"mode": mode, **({"keys": ["id"]} if mode == "merge" else {})},
        }
    )
    result = run_pipeline(spec, source=ArrowTableSource(table, name="input"), target=target)
    outcome = load_result(result, target, mode=mode, keys=spec.load.keys, run_id="run-1")
    return result, outcome


def columns_of(target: SqlTarget) -> list[str]:
    with target.engine.connect() as connection:
        return [column["name"] for column in sa.inspect(connection).get_columns("orders")]


def test_replace_with_zero_rows_empties_the_target_and_keeps_its_schema(url: str):
    target = target_for(url)
    try:
        load(target, ROWS, "replace")
        result, outcome = load(
            target, ROWS, "replace", transforms=[{"filter": {"field": "id", "op": "gt", "value": 9}}]
        )
        assert result.counts.filtered_total == 3 and outcome.rows_published == 0 and outcome.target_rows == 0
        assert target.read().num_rows == 0
        assert columns_of(target) == ["id", "amount", LOAD_ID_COLUMN]
    finally:
        target.dispose()


def test_replace_keeps_the_targets_indexes_and_constraints(url: str):
    target = target_for(url)
    try:
        load(target, ROWS, "replace")
        with target.engine.begin() as connection:
            if target.dialect == "postgresql":
                connection.execute(sa.text("ALTER TABLE orders ADD CONSTRAINT orders_pk PRIMARY KEY (id)"))
                connection.execute(
                    sa.text("ALTER TABLE orders ADD CONSTRAINT amount_positive CHECK (amount > 0)")
                )
            connection.execute(sa.text("CREATE INDEX orders_by_amount ON orders (amount)"))
            connection.execute(sa.text("CREATE UNIQUE INDEX orders_unique_id ON orders (id)"))
        load(target, ROWS.slice(0, 2), "replace")
        assert sorted(target.read().column("id").to_pylist()) == [1, 2]
        with target.engine.connect() as connection:
            inspector = sa.inspect(connection)
            indexes = {index["name"] for index in inspector.get_indexes("orders")}
            assert {"orders_by_amount", "orders_unique_id"} <= indexes
            if target.dialect == "postgresql":
                assert inspector.get_pk_constraint("orders")["constrained_columns"] == ["id"]
                assert [check["name"] for check in inspector.get_check_constraints("orders")] == [
                    "amount_positive"
                ]
        # The constraints hold on the swapped-in table: a replace that breaks one fails and changes nothing.
        with pytest.raises(sa.exc.IntegrityError):
            load(target, pa.table({"id": pa.array([7, 7]), "amount": [1.0, 2.0]}), "replace")
        assert sorted(target.read().column("id").to_pylist()) == [1, 2]
    finally:
        target.dispose()


def test_a_pipeline_merge_keeps_the_last_row_of_a_duplicated_key(url: str):
    target = target_for(url)
    try:
        load(target, ROWS, "merge")
        batch = pa.table({"id": pa.array([2, 4, 2, 4]), "amount": [20.0, 40.0, 21.0, 41.0]})
        result, outcome = load(target, batch, "merge")
        assert result.counts.filtered == {"load.merge": 2} and outcome.rows_published == 2
        assert {row["id"]: row["amount"] for row in target.read().to_pylist()} == {
            1: 1.0,
            2: 21.0,
            3: 3.0,
            4: 41.0,
        }
    finally:
        target.dispose()


def test_staged_rows_with_a_duplicated_key_are_refused_by_a_merge(url: str):
    target = target_for(url)
    try:
        target.stage(ROWS, "load-1")
        target.publish("merge", ["id"])
        target.stage(pa.table({"id": pa.array([5, 5]), "amount": [1.0, 2.0]}), "load-2")
        with pytest.raises(JunctionError, match=r"hold the key \(id=5\) 2 times"):
            target.publish("merge", ["id"])
        assert sorted(target.read().column("id").to_pylist()) == [1, 2, 3]
    finally:
        target.dispose()


def test_two_runs_stage_in_their_own_places_and_publish_their_own_rows(url: str):
    first, second = target_for(url, "1111aaaa-0000-0000-0000-000000000000"), target_for(url, "2222bbbb-0000")
    try:
        assert first.staged_name != second.staged_name
        first.stage(ROWS, "load-1")
        second.stage(ROWS.slice(0, 1), "load-2")  # would have replaced the first run's staged rows
        assert first.publish("append", []).rows_published == 3
        assert second.publish("append", []).rows_published == 1
        assert sorted(first.read().column(LOAD_ID_COLUMN).to_pylist()) == ["load-1"] * 3 + ["load-2"]
        assert first.read_staged() is None and second.read_staged() is None
    finally:
        first.dispose()
        second.dispose()


@pytest.mark.parametrize("file_format", ["parquet", "csv"])
def test_a_file_target_replaced_with_zero_rows_is_empty_with_its_columns(tmp_path: Path, file_format: str):
    from assets.etl.loads import open_target
    from assets.etl.spec import FileTargetSpec

    target = open_target(
        FileTargetSpec(kind="file", format=file_format, path=f"t.{file_format}"), tmp_path, "r"
    )
    load(target, ROWS, "replace")
    _, outcome = load(
        target, ROWS, "replace", transforms=[{"filter": {"field": "id", "op": "gt", "value": 9}}]
    )
    assert outcome.target_rows == 0 and target.path.exists()
    assert target.current_schema().names == ["id", "amount", LOAD_ID_COLUMN]


def test_a_postgres_table_name_too_long_for_its_staging_tables_is_refused():
    from orchestration.errors import ConfigurationError

    name = "t" * 50
    with pytest.raises(ConfigurationError, match=f"target table '{name}' is too long"):
        SqlTarget(
            SqlTargetSpec(kind="sql", url="postgresql://nobody@127.0.0.1:1/none", table=name), run_id="r"
        )
    SqlTarget(SqlTargetSpec(kind="sql", url="postgresql://nobody@127.0.0.1:1/none", table="t" * 43)).dispose()
