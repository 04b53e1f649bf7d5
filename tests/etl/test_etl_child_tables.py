"""Child tables: a list field published as `<table>__<field>`, one row per element with the parent's
key and its place in the list, in the publish transaction, on SQLite and PostgreSQL; a merge
replaces the children of the parents it publishes (a shrunk list loses what it no longer has) and
leaves the others alone; scalars go under `value`; the spec asks for a merge key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
import yaml
from rest_api import Upstream, start_upstream

from assets.etl.factory import pipeline_definitions
from assets.etl.spec import PipelineSpec
from orchestration.kernel.spec_errors import SpecError, load_specs


@pytest.fixture(scope="module")
def served() -> Iterator[Upstream]:
    upstream, server = start_upstream()
    yield upstream
    server.shutdown()


@pytest.fixture
def upstream(served: Upstream) -> Upstream:
    """6 customers, customer i with i lines (sku, qty) and tags (scalars) on odd ids."""
    served.set_records(6)
    for record in served.records:
        record["updated_at"] = f"2024-01-{record['id']:02d}T00:00:00Z"
        record["lines"] = [{"sku": f"s{record['id']}-{n}", "qty": n} for n in range(1, record["id"] + 1)]
    served.page_size = 10
    served.faults.clear()
    return served


def write_spec(folder: Path, upstream: Upstream, url: str) -> None:
    spec = {
        "source": {"kind": "rest", "base_url": upstream.url, "path": "/page/records",
                   "params": {"since": "{{ incremental.start }}"},
                   "paginator": {"type": "page_number", "total_pages_path": "total_pages"}, "data_selector": "data"},
        "incremental": {"cursor": "updated_at", "initial": "2024-01-01T00:00:00Z"},
        "transforms": [{"select": ["id", "name", "updated_at", "lines", "tags"]}],
        "target": {"kind": "sql", "url": url, "table": "customers", "children": ["lines", "tags"]},
        "load": {"mode": "merge", "keys": ["id"]},
    }  # fmt: skip
    (folder / "customers.yaml").write_text(yaml.safe_dump(spec))


def run(folder: Path, instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    job = pipeline_definitions(folder).resolve_job_def("customers_pipeline")
    return job.execute_in_process(instance=instance, raise_on_error=False)


def rows(url: str, sql: str) -> list[tuple]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(sa.text(sql)).all()]
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_list_fields_become_child_tables_replaced_per_parent_on_merge(
    upstream: Upstream, tmp_path: Path, backend: str, request: pytest.FixtureRequest
):
    url = (
        f"sqlite:///{tmp_path / 'w.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("clean_postgres_url")
    )
    write_spec(tmp_path, upstream, url)
    lines_sql = 'SELECT customers_id, "_junction_list_index", sku, qty FROM customers__lines ORDER BY 1, 2'
    with dg.instance_for_test() as instance:
        first = run(tmp_path, instance)
        assert first.success
        assert len(rows(url, lines_sql)) == 1 + 2 + 3 + 4 + 5 + 6
        assert rows(url, lines_sql)[:3] == [(1, 0, "s1-1", 1), (2, 0, "s2-1", 1), (2, 1, "s2-2", 2)]
        # Scalars go under `value`; an empty list leaves no row.
        assert rows(url, "SELECT customers_id, value FROM customers__tags ORDER BY 1, 2") == [
            (1, "a"), (1, "b"), (3, "a"), (3, "b"), (5, "a"), (5, "b")
        ]  # fmt: skip
        # The parent table keeps its other columns, not the lists.
        columns = {column["name"] for column in sa.inspect(sa.create_engine(url)).get_columns("customers")}
        assert "lines" not in columns and {"id", "name", "updated_at"} <= columns
        published = first.asset_materializations_for_node("customers")[0].metadata
        assert published["child_rows"].value == {"customers__lines": 21, "customers__tags": 6}

        # Customer 4's list shrinks to one line, past the cursor; nobody else changes.
        for record in upstream.records:
            if record["id"] == 4:
                record["lines"] = [{"sku": "s4-new", "qty": 9}]
                record["updated_at"] = "2024-02-01T00:00:00Z"
        second = run(tmp_path, instance)
    assert second.success
    after = rows(url, lines_sql)
    assert [row for row in after if row[0] == 4] == [(4, 0, "s4-new", 9)]
    assert len([row for row in after if row[0] == 6]) == 6  # customer 6 (on the cursor) re-read: same rows
    assert len(after) == 21 - 4 + 1
    # The list fields are still the records' fields: no drift is seen for them.
    drift = second.asset_materializations_for_node("customers_staged")[0].metadata["schema_drift"].value
    assert drift["added"] == {} and drift["removed"] == {}


def test_child_tables_need_a_merge_key(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "source: {kind: file, format: jsonl, path: x.jsonl}\n"
        "target: {kind: sql, url: 'sqlite:///x.db', table: t, children: [lines]}\n"
    )
    with pytest.raises(SpecError, match="target.children: each child row carries its parent's key"):
        load_specs([path], PipelineSpec)
