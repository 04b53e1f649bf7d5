"""An example stream trigger written in Python: a summary run per 100 events of the `orders` stream.

The trigger's sensor (`order_summaries_on_orders`) ships stopped: switch it on in the UI. Replays
work whether it runs or not (`POST /gateway/v1/streams/orders/replays`). The run receives only the
stream and the id range (`EventRangeConfig`) and reads the events itself, through the
`EventStreamResource`; its summary is the op's output metadata, shown in the UI.
"""

# No `from __future__ import annotations`: Dagster reads the op's annotations at definition time.

from collections import defaultdict

import dagster as dg

from resources.event_stream.resource import EventStreamResource
from sensors.event_triggers import CountBatches, EventRangeConfig, JobTarget, StreamTrigger

ORDERS_PER_SUMMARY = 100


@dg.op
def summarize_orders(
    context: dg.OpExecutionContext, config: EventRangeConfig, event_stream: EventStreamResource
) -> dict:
    """Orders and amount per currency of the run's events."""
    totals: dict[str, float] = defaultdict(float)
    orders = 0
    for event in config.read(event_stream.get_stream()):
        orders += 1
        totals[event.payload.get("currency", "?")] += float(event.payload.get("amount", 0))
    summary = {"orders": orders, "amount_by_currency": dict(totals)}
    context.add_output_metadata(
        {
            "orders": orders,
            "amount_by_currency": dg.MetadataValue.json(dict(totals)),
            "events": config.first_id,
        }
    )
    return summary


@dg.job(resource_defs={"event_stream": EventStreamResource()})
def order_summaries():
    summarize_orders()


order_summaries_trigger = StreamTrigger(
    name="order_summaries_on_orders",
    stream="orders",
    target=JobTarget(order_summaries, config_op="summarize_orders"),
    mode=CountBatches(ORDERS_PER_SUMMARY),
    default_status=dg.DefaultSensorStatus.STOPPED,
)
order_summaries_sensor = order_summaries_trigger.sensor()
