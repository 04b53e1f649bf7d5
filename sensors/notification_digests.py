"""The `notification_digests` sensor: every 30 s, sends the digests throttled and digesting channels
hold (`resources/notifications/held.py`), so a held message goes out when its channel allows even if
nothing else is sent to it. Visible in the Dagster UI with each tick's count as its skip reason."""

from __future__ import annotations

import dagster as dg

DIGEST_INTERVAL_S = 30


@dg.sensor(
    name="notification_digests",
    description="Sends the digests of throttled and digesting notification channels when they are due.",
    minimum_interval_seconds=DIGEST_INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def notification_digests(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    from resources.notifications import held, load_channels

    channels = {name: channel for name, channel in load_channels().items() if held.holds(channel)}
    if not channels:
        return dg.SkipReason("no channel declares a throttle or a digest")
    sent = held.flush_held(channels=channels)
    waiting = held.held_counts()
    for record in sent:
        context.log.info("digest delivered to channel %r (delivery %d)", record.channel, record.id)
    still = ", ".join(f"{name}: {count}" for name, count in sorted(waiting.items())) or "none"
    return dg.SkipReason(f"{len(sent)} digest(s) sent; messages still held: {still}")


def notification_definitions() -> dg.Definitions:
    return dg.Definitions(sensors=[notification_digests])
