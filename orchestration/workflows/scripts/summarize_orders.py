"""Example Pipes program for a Custom Script step (`command: [python, .../summarize_orders.py]`).

It runs as its own process and talks to the workflow through `dagster_pipes`: it reads the workflow's
inputs and the step's rendered arguments from `pipes.extras`, logs to the run, reports the step's
outputs and its metadata as custom messages, and a materialization of the asset it stands for.
"""

from __future__ import annotations

import sys

from dagster_pipes import open_dagster_pipes


def main() -> int:
    with open_dagster_pipes() as pipes:
        arguments = pipes.extras["arguments"]
        orders = pipes.extras["inputs"].get("orders") or []
        threshold = float(arguments.get("threshold", 1000))
        if any("amount" not in order for order in orders):
            print("every order needs an amount", file=sys.stderr)
            return 2
        amounts = [float(order["amount"]) for order in orders]
        large = [order["id"] for order in orders if float(order["amount"]) > threshold]
        pipes.log.info(f"summarized {len(orders)} order(s); {len(large)} above {threshold:g}")
        summary = {
            "count": len(orders),
            "total": round(sum(amounts), 2),
            "large_orders": large,
            "large_count": len(large),
        }
        # `outputs` become the step's output (steps.<id>.output.outputs.*), `metadata` the op's
        # output metadata in the Dagster UI.
        pipes.report_custom_message({"outputs": summary})
        pipes.report_custom_message({"metadata": {"orders": len(orders), "total": summary["total"]}})
        if arguments.get("asset_key"):
            pipes.report_asset_materialization(
                asset_key=arguments["asset_key"], metadata={"orders": len(orders), "large": len(large)}
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
