"""The shipped example trigger (`assets/order_events.py`): a summary run per 100 orders."""

from __future__ import annotations

import dagster as dg
import pytest

from assets.order_events import ORDERS_PER_SUMMARY, order_summaries, order_summaries_trigger
from resources.event_stream import StreamRegistry, open_event_stream
from sensors.event_triggers import TriggerCursor


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_a_batch_of_orders_becomes_one_summary_run(store_url):
    StreamRegistry.for_url(store_url).sync_declared()  # the shipped sensors/streams/orders.yaml
    orders = [
        {"order_id": f"o{n}", "customer_id": "c", "amount": 2.5, "currency": "EUR" if n % 2 else "USD"}
        for n in range(ORDERS_PER_SUMMARY + 1)
    ]
    with open_event_stream() as events:
        ids = [result.id for result in events.publish_batch("orders", orders).results]
        ranges, cursor = order_summaries_trigger.evaluate_tick(events, TriggerCursor())
    assert [(r.first_id, r.last_id, r.count) for r in ranges] == [(ids[0], ids[-2], ORDERS_PER_SUMMARY)]
    assert cursor.open.first_id == ids[-1], "the 101st order waits for the next batch"

    request = order_summaries_trigger.run_request(ranges[0])
    with dg.instance_for_test() as instance:
        result = order_summaries.execute_in_process(run_config=request.run_config, instance=instance)
    assert result.output_for_node("summarize_orders") == {
        "orders": ORDERS_PER_SUMMARY,
        "amount_by_currency": {"USD": 125.0, "EUR": 125.0},
    }
    assert order_summaries_trigger.sensor().default_status == dg.DefaultSensorStatus.STOPPED
