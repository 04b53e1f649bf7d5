"""The shipped examples materialize through a Dagster instance, with counts that add up.

`shop_customers` (SQL -> SQL merge), `station_readings` (JSON Lines with broken lines),
`product_catalogue` (XML with broken elements) and the analyst's `monthly_revenue` (`assets/analyst_example.py`). Their targets live under the test's own
$JUNCTION_HOME (fixture `junction_home`), their sources are the files shipped in `assets/pipelines/`.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq

from assets.etl.factory import build_pipeline
from assets.etl.spec import load_pipelines

SHIPPED = Path(__file__).resolve().parents[2] / "assets" / "pipelines"


def materialize(name: str, instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    definitions = build_pipeline(load_pipelines([SHIPPED / f"{name}.yaml"])[name])
    return definitions.resolve_job_def(f"{name}_pipeline").execute_in_process(
        instance=instance, raise_on_error=False
    )


def counts(result: dg.ExecuteInProcessResult, node: str) -> dict[str, int]:
    metadata = result.asset_materializations_for_node(node)[0].metadata
    found = {
        name: metadata[name].value
        for name in ("rows_read", "rows_loaded", "rows_filtered", "rows_quarantined")
    }
    assert found["rows_read"] == found["rows_loaded"] + found["rows_filtered"] + found["rows_quarantined"]
    return found


def passed_checks(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {evaluation.check_name: evaluation.passed for evaluation in result.get_asset_check_evaluations()}


def test_the_examples_are_in_the_code_location():
    import orchestration.definitions as code_location

    graph = code_location.defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert {"shop_customers_staged", "shop_customers", "station_readings_staged", "station_readings"} <= keys
    assert {"product_catalogue_staged", "product_catalogue"} <= keys
    assert "monthly_revenue" in keys and graph.get(dg.AssetKey("monthly_revenue")).group_name == "shop"


def test_shop_customers_merges_the_shipped_database_into_the_warehouse(junction_home: Path):
    instance = dg.DagsterInstance.ephemeral()
    first = materialize("shop_customers", instance)
    assert first.success
    # 25 customers; customer 17 signed up on 2023-02-30 and is quarantined by the cast.
    assert counts(first, "shop_customers_staged") == {
        "rows_read": 25, "rows_loaded": 24, "rows_filtered": 0, "rows_quarantined": 1
    }  # fmt: skip
    warehouse = junction_home / "warehouse" / "shop.db"
    with sqlite3.connect(warehouse) as connection:
        rows = dict(connection.execute("SELECT customer_id, country FROM customers").fetchall())
        quarantined = connection.execute("SELECT row, field FROM customers_quarantine").fetchall()
    connection.close()
    assert len(rows) == 24 and 17 not in rows and rows[9] == "US"  # cleansed: 'us' -> 'US'
    assert quarantined == [(17, "signed_up")]
    published = first.asset_materializations_for_node("shop_customers")[0].metadata
    assert published["rows_published"].value == 24 and published["dagster/row_count"].value == 24

    second = materialize("shop_customers", instance)  # a merge by key: the same rows, updated in place
    assert second.success
    assert (
        second.asset_materializations_for_node("shop_customers")[0].metadata["dagster/row_count"].value == 24
    )


def test_station_readings_quarantines_the_broken_lines_by_number(junction_home: Path):
    instance = dg.DagsterInstance.ephemeral()
    result = materialize("station_readings", instance)
    assert result.success
    assert counts(result, "station_readings_staged") == {
        "rows_read": 30, "rows_loaded": 28, "rows_filtered": 0, "rows_quarantined": 2
    }  # fmt: skip
    checks = passed_checks(result)
    assert not checks["temperature_plausible"]  # the 999.9 reading; a warning, not blocking
    assert checks["humidity_is_a_percentage"]
    warehouse = junction_home / "warehouse"
    assert pq.read_table(warehouse / "station_readings.parquet").num_rows == 28
    quarantined = pq.read_table(warehouse / "station_readings_quarantine.parquet").to_pylist()
    assert [(row["line"], row["step"]) for row in quarantined] == [(9, "read"), (21, "read")]
    assert "invalid JSON" in quarantined[0]["reason"]

    again = materialize("station_readings", instance)  # the same file again: its load id is there
    assert again.success
    assert pq.read_table(warehouse / "station_readings.parquet").num_rows == 28


def test_product_catalogue_quarantines_the_broken_xml_elements_by_line(junction_home: Path):
    instance = dg.DagsterInstance.ephemeral()
    result = materialize("product_catalogue", instance)
    assert result.success
    # 40 <product> elements: 2 broken (quarantined on read), 3 discontinued (filtered), one price "12,90"
    # (quarantined by the cast).
    assert counts(result, "product_catalogue_staged") == {
        "rows_read": 40, "rows_loaded": 34, "rows_filtered": 3, "rows_quarantined": 3
    }  # fmt: skip
    checks = passed_checks(result)
    assert checks["price_positive"] and checks["category_allowed"]
    assert not checks["stock_not_negative"]  # the oversold jug; a warning, not blocking
    warehouse = junction_home / "warehouse" / "catalogue.db"
    with sqlite3.connect(warehouse) as connection:
        products = {
            row[0]: row[1:] for row in connection.execute("SELECT sku, category, weight_g FROM products")
        }
        quarantined = connection.execute(
            "SELECT line, row, step, field, reason FROM products_quarantine ORDER BY row"
        ).fetchall()
    connection.close()
    assert len(products) == 34 and not {"KT-1006", "CF-2004", "TB-3003", "KT-1005"} & products.keys()
    assert products["KT-1009"] == ("kitchen", 60)  # "kitchen " trimmed and lower-cased
    assert products["KT-1010"] == ("kitchen", None)  # weight "N/A" is a null token
    assert [(line, row, step, field) for line, row, step, field, _ in quarantined] == [
        (44, 6, "read", None),
        (108, 14, "read", None),
        (180, 23, "transforms[3].cast", "price"),
    ]
    assert quarantined[0][4] == "malformed XML: not well-formed (invalid token) (line 45 column 17)"  # "&"
    assert quarantined[1][4] == "malformed XML: mismatched tag (line 111 column 19)"  # "</prize>"
    assert "'12,90'" in quarantined[2][4]

    again = materialize("product_catalogue", instance)  # merged by sku: the same rows, updated in place
    assert again.success
    with sqlite3.connect(warehouse) as connection:
        assert connection.execute("SELECT COUNT(*) FROM products").fetchone() == (34,)
        assert connection.execute("SELECT COUNT(*) FROM products_quarantine").fetchone() == (3,)
    connection.close()


def test_the_analysts_python_asset_materializes(junction_home: Path):
    from assets.analyst_example import monthly_revenue

    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([monthly_revenue], instance=instance)
    assert result.success
    assert counts(result, "monthly_revenue") == {
        "rows_read": 60, "rows_loaded": 46, "rows_filtered": 14, "rows_quarantined": 0
    }  # fmt: skip
    months = pq.read_table(junction_home / "warehouse" / "monthly_revenue.parquet")
    assert months.column("month").to_pylist() == [
        "2024-01",
        "2024-02",
        "2024-03",
        "2024-04",
        "2024-05",
        "2024-06",
    ]
    assert sum(months.column("orders").to_pylist()) == 46  # every paid order in one month
    record = instance.get_latest_asset_check_evaluation_record(
        dg.AssetCheckKey(dg.AssetKey("monthly_revenue"), "amount_positive")
    )
    assert record is not None and record.event.asset_check_evaluation.passed


def test_the_shipped_shop_database_is_what_the_seed_script_builds(tmp_path: Path):
    import runpy

    seed = runpy.run_path(str(SHIPPED / "shop" / "seed.py"))["seed"]
    built = seed(tmp_path / "shop.db")

    def dump(path: Path) -> list[str]:
        connection = sqlite3.connect(path)
        try:
            return list(connection.iterdump())
        finally:
            connection.close()

    assert dump(built) == dump(SHIPPED / "shop" / "shop.db")
