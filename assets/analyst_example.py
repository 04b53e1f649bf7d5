"""An analyst's asset in plain Python with the ETL building blocks (`assets.etl`), no YAML spec.

Monthly paid revenue of the example shop: read the orders from its SQLite database
(`pipelines/shop/shop.db`), type and filter them, check them with the same rules and contract a spec
would declare, aggregate with pyarrow, and replace a Parquet file under $JUNCTION_HOME. The checks are
on this asset, so it decides itself: when a blocking one fails, nothing is loaded and Dagster fails
the step after recording the results.
"""

from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc

import assets.etl as etl

SHOP_FOLDER = Path(__file__).resolve().parent / "pipelines"  # relative source paths resolve here

PAID_ORDERS = etl.PipelineSpec.model_validate(
    {
        "source": {"kind": "sql", "url": "sqlite:///shop/shop.db", "table": "orders"},
        "transforms": [
            {"cast": {"ordered_at": "timestamp", "amount": "float64"}},
            {"filter": {"field": "status", "op": "eq", "value": "paid"}},
        ],
        "rules": [
            {
                "name": "amount_positive",
                "condition": {"field": "amount", "op": "gt", "value": 0},
                "blocking": True,
            }
        ],
        "contract": {"columns": {"id": {"type": "int64", "required": True, "unique": True}}},
    }
)
MONTHLY_REVENUE = etl.FileTargetSpec(kind="file", format="parquet", path="warehouse/monthly_revenue.parquet")
CHECKS = etl.quality_checks(PAID_ORDERS)


def revenue_by_month(orders: pa.Table) -> pa.Table:
    """The analyst's own step: paid revenue and order count per calendar month."""
    months = orders.append_column("month", pc.strftime(orders.column("ordered_at"), format="%Y-%m"))
    totals = months.group_by("month").aggregate([("amount", "sum"), ("id", "count")])
    revenue = pc.round(totals.column("amount_sum"), 2)
    return pa.table(
        {"month": totals.column("month"), "revenue": revenue, "orders": totals.column("id_count")}
    ).sort_by("month")


@dg.asset(
    group_name="shop",
    kinds={"python", "parquet"},
    owners=["data-platform@junction.dev"],
    tags={"domain": "sales"},
    check_specs=etl.asset_check_specs(CHECKS, "monthly_revenue"),
)
def monthly_revenue(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """Paid revenue per month of the example shop (written in Python; see the module's docstring)."""
    orders = etl.run_pipeline(PAID_ORDERS, base_dir=SHOP_FOLDER)
    paid = orders.to_table()
    report = etl.validate(paid, CHECKS, orders.counts.read - orders.counts.filtered_total)
    metadata = {
        **orders.counts.as_metadata(),
        "quality_summary": dg.MetadataValue.md(
            etl.summary_markdown(report, orders.quarantine.count_by_reason())
        ),
    }
    if not report.blocking_failures:
        months = revenue_by_month(paid)
        target = etl.open_target(MONTHLY_REVENUE, etl.target_base_dir(), context.run_id)
        try:
            outcome = etl.load_result(orders, target, mode="replace", run_id=context.run_id, table=months)
        finally:
            target.dispose()
        metadata |= {"target": target.description, "dagster/row_count": outcome.target_rows}
    return dg.MaterializeResult(metadata=metadata, check_results=etl.asset_check_results(report.outcomes))
