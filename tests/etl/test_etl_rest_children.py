"""Parent -> child REST resources: `/customers/{{ parent.id }}/orders` read once per published customer,
the parent's key carried into each child row, up to `max_concurrency` children in flight; lineage
shows the child after the parent; an incremental cursor on a carried column reads only the changed
parents' children; a child answering 404 fails the run naming its URL; spec mistakes name the field."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
import yaml
from rest_api import Upstream, start_upstream

from assets.etl.factory import pipeline_definitions
from assets.etl.spec import PipelineSpec, load_pipelines
from orchestration.kernel.spec_errors import SpecError, load_specs

PAGES = {"type": "page_number", "total_pages_path": "total_pages"}


@pytest.fixture(scope="module")
def served() -> Iterator[Upstream]:
    upstream, server = start_upstream()
    yield upstream
    server.shutdown()


@pytest.fixture
def upstream(served: Upstream) -> Upstream:
    """12 customers (customer i updated on 2024-01-i), each with i % 4 + 1 orders (paged by two)."""
    served.set_records(12)
    for record in served.records:
        record["updated_at"] = f"2024-01-{record['id']:02d}T00:00:00Z"
    served.children = {
        record["id"]: [
            {"order_id": number, "amount": record["id"] * 100 + number}
            for number in range(1, record["id"] % 4 + 2)
        ]
        for record in served.records
    }
    served.page_size = 10
    served.child_delay = 0.0
    served.most_in_flight = 0
    served.faults.clear()
    with served.lock:
        served.requests.clear()
    return served


def write_specs(folder: Path, upstream: Upstream, **child_source: object) -> str:
    url = f"sqlite:///{folder / 'warehouse.db'}"
    customers = {
        "source": {"kind": "rest", "base_url": upstream.url, "path": "/page/records",
                   "params": {"since": "{{ incremental.start }}"}, "paginator": PAGES, "data_selector": "data"},
        "incremental": {"cursor": "updated_at", "initial": "2024-01-01T00:00:00Z"},
        "transforms": [{"select": ["id", "name", "updated_at"]}],
        "target": {"kind": "sql", "url": url, "table": "customers"},
        "load": {"mode": "merge", "keys": ["id"]},
    }  # fmt: skip
    orders = {
        "source": {
            "kind": "rest",
            "base_url": upstream.url,
            "path": "customers/{{ parent.id }}/orders",
            "paginator": PAGES,
            "data_selector": "data",
            "parent": {
                "pipeline": "customers",
                "carry": {"customer_id": "id", "customer_updated_at": "updated_at"},
            },
            **child_source,
        },
        "incremental": {"cursor": "customer_updated_at", "initial": "2024-01-01T00:00:00Z"},
        "target": {"kind": "sql", "url": url, "table": "customer_orders"},
        "load": {"mode": "merge", "keys": ["customer_id", "order_id"]},
    }
    (folder / "customers.yaml").write_text(yaml.safe_dump(customers))
    (folder / "customer_orders.yaml").write_text(yaml.safe_dump(orders))
    return url


def run(folder: Path, instance: dg.DagsterInstance, name: str) -> dg.ExecuteInProcessResult:
    definitions = pipeline_definitions(folder)
    return definitions.resolve_job_def(f"{name}_pipeline").execute_in_process(
        instance=instance, raise_on_error=False
    )


def orders(url: str) -> dict[tuple[int, int], int]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                sa.text("SELECT customer_id, order_id, amount FROM customer_orders")
            ).all()
    finally:
        engine.dispose()
    return {(row.customer_id, row.order_id): row.amount for row in rows}


def child_requests(upstream: Upstream) -> list[str]:
    return [path for _, path, _, _ in upstream.requests if path.startswith("/customers/")]


def test_each_parent_record_reads_its_children_with_the_parent_key_carried(
    upstream: Upstream, tmp_path: Path
):
    upstream.child_delay = 0.05
    url = write_specs(tmp_path, upstream, max_concurrency=3)
    with dg.instance_for_test() as instance:
        assert run(tmp_path, instance, "customers").success
        result = run(tmp_path, instance, "customer_orders")
    assert result.success
    expected = {
        (customer, order["order_id"]): order["amount"]
        for customer, placed in upstream.children.items()
        for order in placed
    }
    assert orders(url) == expected
    # Every child resource was paged (two orders a page): customer 3 has 4 orders, so 2 pages.
    assert child_requests(upstream).count("/customers/3/orders") == 2
    # Requests overlapped, never past the limit.
    assert 1 < upstream.most_in_flight <= 3


def test_max_concurrency_one_reads_the_children_one_at_a_time(upstream: Upstream, tmp_path: Path):
    upstream.child_delay = 0.02
    url = write_specs(tmp_path, upstream, max_concurrency=1)
    with dg.instance_for_test() as instance:
        assert run(tmp_path, instance, "customers").success
        assert run(tmp_path, instance, "customer_orders").success
    assert upstream.most_in_flight == 1
    assert len(orders(url)) == sum(len(placed) for placed in upstream.children.values())


def test_lineage_shows_the_child_after_its_parent(upstream: Upstream, tmp_path: Path):
    write_specs(tmp_path, upstream)
    graph = pipeline_definitions(tmp_path).resolve_asset_graph()
    assert dg.AssetKey("customers") in graph.get(dg.AssetKey("customer_orders_staged")).parent_keys
    assert load_pipelines([tmp_path / "customer_orders.yaml"])["customer_orders"].upstream.keys() == {
        "customers"
    }


def test_a_cursor_on_a_carried_column_reads_only_the_changed_parents_children(
    upstream: Upstream, tmp_path: Path
):
    url = write_specs(tmp_path, upstream)
    with dg.instance_for_test() as instance:
        assert run(tmp_path, instance, "customers").success
        assert run(tmp_path, instance, "customer_orders").success
        before = orders(url)
        # Customer 5 changes and places a new order; nobody else changes.
        for record in upstream.records:
            if record["id"] == 5:
                record["updated_at"] = "2024-02-01T00:00:00Z"
        upstream.children[5].append({"order_id": 99, "amount": 9999})
        with upstream.lock:
            upstream.requests.clear()
        assert run(tmp_path, instance, "customers").success
        result = run(tmp_path, instance, "customer_orders")
    assert result.success
    # Only customer 5 is past the cursor; customer 12 sits on it (a merge re-reads the boundary).
    assert set(child_requests(upstream)) == {"/customers/5/orders", "/customers/12/orders"}
    assert orders(url) == {**before, (5, 99): 9999}
    staged = result.asset_materializations_for_node("customer_orders_staged")[0].metadata
    assert staged["incremental"].value["after"] == "2024-02-01T00:00:00Z"


def test_a_child_that_answers_404_fails_the_run_naming_its_url(upstream: Upstream, tmp_path: Path):
    del upstream.children[7]
    write_specs(tmp_path, upstream)
    with dg.instance_for_test() as instance:
        assert run(tmp_path, instance, "customers").success
        result = run(tmp_path, instance, "customer_orders")
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.error
    assert failure is not None
    assert f"GET {upstream.url}/customers/7/orders?page=1 (page 1) answered 404" in failure.to_string()


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ({"path": "orders", "parent": {"pipeline": "customers", "carry": {"customer_id": "id"}}},
         "no template reads parent.*"),
        ({"path": "customers/{{ parent.id }}/orders"}, "declares no parent"),
        ({"path": "customers/{{ parent.id }}/orders", "parent": {"pipeline": "customers", "carry": {}}},
         "source.parent.carry"),
    ],
)  # fmt: skip
def test_parent_spec_mistakes_name_the_field(tmp_path: Path, source: dict, expected: str):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"source": {"kind": "rest", "base_url": "http://x", **source}}))
    with pytest.raises(SpecError) as failure:
        load_specs([path], PipelineSpec)
    assert expected in str(failure.value)


def test_a_parent_that_no_pipeline_publishes_is_named(upstream: Upstream, tmp_path: Path):
    write_specs(tmp_path, upstream)
    (tmp_path / "customers.yaml").unlink()
    with pytest.raises(SpecError) as failure:
        load_pipelines([tmp_path / "customer_orders.yaml"])
    assert "source.parent.pipeline" in str(failure.value) and "no pipeline named 'customers'" in str(
        failure.value
    )
