"""The event stream contract: one suite, run against Redis, SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from resources.event_stream import (
    EventId,
    EventsLost,
    EventStream,
    EventToPublish,
    GroupNotFound,
    StreamNotFound,
    dead_letter_stream,
)

ORDER_SCHEMA = {
    "type": "object",
    "required": ["order_id", "amount"],
    "properties": {"order_id": {"type": "string"}, "amount": {"type": "number", "minimum": 0}},
}


def ids(events) -> list[str]:
    return [event.id for event in events]


def test_publish_and_read_in_order(event_stream: EventStream, declare):
    declare("orders")
    published = [event_stream.publish("orders", {"n": n}).id for n in range(5)]
    published += [
        r.id for r in event_stream.publish_batch("orders", [{"n": n} for n in range(5, 25)]).results
    ]

    events = event_stream.read("orders", limit=100)
    assert ids(events) == published
    assert [event.payload["n"] for event in events] == list(range(25))
    parsed = [EventId.parse(i) for i in published]
    assert parsed == sorted(parsed) and len(set(parsed)) == 25

    # Resuming after an id continues exactly there, page by page.
    assert ids(event_stream.read("orders", after_id=published[9], limit=5)) == published[10:15]
    assert ids(event_stream.iter_events("orders", after_id=published[3], page_size=4)) == published[4:]
    assert event_stream.read("orders", after_id=published[-1]) == []
    assert abs(events[0].time - datetime.now(UTC)) < timedelta(seconds=30)


def test_undeclared_stream_is_refused(event_stream: EventStream):
    with pytest.raises(StreamNotFound, match="'nowhere' is not declared"):
        event_stream.publish("nowhere", {})


def test_schema_rejections_are_reported_by_index(event_stream: EventStream, declare):
    declare("orders", payload_schema=ORDER_SCHEMA)
    batch = event_stream.publish_batch(
        "orders",
        [
            {"order_id": "a", "amount": 1},
            {"order_id": "b"},
            {"order_id": "c", "amount": -5},
            {"order_id": "d", "amount": 2.5},
        ],
    )
    assert [r.status for r in batch.results] == ["accepted", "rejected", "rejected", "accepted"]
    assert [r.index for r in batch.rejected] == [1, 2]
    assert batch.rejected[0].reason == 'payload: "amount" is a required property'
    assert batch.rejected[1].reason == "payload.amount: -5 is less than the minimum of 0"
    assert [e.payload["order_id"] for e in event_stream.read("orders")] == ["a", "d"]

    single = event_stream.publish("orders", {"order_id": 7, "amount": 1})
    assert single.status == "rejected" and single.reason == 'payload.order_id: 7 is not of type "string"'


def test_payloads_that_are_not_json_are_rejected_and_the_rest_stored_as_json_has_them(
    event_stream: EventStream, declare
):
    declare("readings")
    batch = event_stream.publish_batch(
        "readings",
        [
            {"value": float("nan")},
            {"value": None, "note": "null"},
            {"value": float("-inf")},
            {"value": 2**70, 7: "key"},
            {"at": datetime(2026, 11, 28, tzinfo=UTC)},
            {"value": [1.5, "é"]},
        ],
    )
    assert [r.status for r in batch.results] == [
        "rejected",
        "accepted",
        "rejected",
        "accepted",
        "rejected",
        "accepted",
    ]
    assert [r.reason for r in batch.rejected] == [
        "payload is not JSON: Out of range float values are not JSON compliant",
        "payload is not JSON: Out of range float values are not JSON compliant",
        "payload is not JSON: Object of type datetime is not JSON serializable",
    ]
    assert [e.payload for e in event_stream.read("readings")] == [
        {"value": None, "note": "null"},
        {"value": 2**70, "7": "key"},
        {"value": [1.5, "é"]},
    ]


def test_idempotency_key_reports_a_duplicate_and_stores_once(event_stream: EventStream, declare):
    declare("orders")
    first = event_stream.publish("orders", {"n": 1}, idempotency_key="order-1")
    again = event_stream.publish("orders", {"n": 1}, idempotency_key="order-1")
    assert first.status == "accepted" and again.status == "duplicate" and again.id == first.id

    batch = event_stream.publish_batch(
        "orders",
        [
            EventToPublish({"n": 2}, "order-2"),
            EventToPublish({"n": 2}, "order-2"),
            EventToPublish({"n": 1}, "order-1"),
            {"n": 3},
        ],
    )
    assert [r.status for r in batch.results] == ["accepted", "duplicate", "duplicate", "accepted"]
    assert batch.results[1].id == batch.results[0].id
    assert [e.payload["n"] for e in event_stream.read("orders")] == [1, 2, 3]


def test_blocking_read_returns_when_an_event_arrives(event_stream: EventStream, declare):
    declare("orders")
    started = time.monotonic()
    assert event_stream.read("orders", after_id="$", block_ms=150) == []
    assert time.monotonic() - started >= 0.14

    timer = threading.Timer(0.2, lambda: event_stream.publish("orders", {"late": True}))
    timer.start()
    started = time.monotonic()
    events = event_stream.read("orders", after_id="$", block_ms=5000)
    timer.join()
    assert [e.payload for e in events] == [{"late": True}]
    assert time.monotonic() - started < 3


def test_read_by_time_range(event_stream: EventStream, declare):
    declare("orders")
    event_stream.publish_batch("orders", [{"phase": "before"}] * 3)
    time.sleep(0.02)
    start = datetime.now(UTC)
    middle = [r.id for r in event_stream.publish_batch("orders", [{"phase": "during"}] * 4).results]
    time.sleep(0.01)
    end = datetime.now(UTC)
    time.sleep(0.02)
    event_stream.publish("orders", {"phase": "after"})

    assert ids(event_stream.read_range("orders", start, end)) == middle
    assert ids(event_stream.read_range("orders", start, end, limit=2)) == middle[:2]


def test_retention_by_count_reports_lost_events(event_stream: EventStream, declare):
    declare("orders", retention={"max_count": 10})
    first = event_stream.publish("orders", {"n": 0}).id
    event_stream.publish_batch("orders", [{"n": n} for n in range(1, 400)])

    stats = event_stream.stats("orders")
    assert 10 <= stats.length < 400, "approximate trimming while publishing keeps at least max_count"
    event_stream.trim("orders")
    stats = event_stream.stats("orders")
    assert stats.length == 10 and stats.events_added == 400
    assert EventId.parse(stats.max_deleted_id) < EventId.parse(stats.first_id)

    with pytest.raises(EventsLost) as lost:
        event_stream.read("orders", after_id=first)
    assert lost.value.stream == "orders"
    assert lost.value.from_id == str(EventId.parse(first).next())
    assert lost.value.to_id == stats.max_deleted_id
    assert "removed by retention" in str(lost.value)

    # Accepting the loss: resume after the range; a reader from the oldest is never told of a loss.
    assert [e.payload["n"] for e in event_stream.read("orders", after_id=lost.value.to_id)] == list(
        range(390, 400)
    )
    assert len(event_stream.read("orders")) == 10
    with pytest.raises(EventsLost):
        list(event_stream.iter_events("orders", after_id=first))


def test_retention_by_age(event_stream: EventStream, declare):
    declare("metrics", retention={"max_age": 1})
    old = [r.id for r in event_stream.publish_batch("metrics", [{"n": n} for n in range(5)]).results]
    time.sleep(1.1)
    fresh = event_stream.publish("metrics", {"n": 5}).id
    event_stream.trim("metrics")
    assert ids(event_stream.read("metrics")) == [fresh]
    with pytest.raises(EventsLost) as lost:
        event_stream.read("metrics", after_id=old[0])
    assert lost.value.to_id == old[-1]


def test_consumer_group_delivers_once_and_claims_from_a_dead_consumer(event_stream: EventStream, declare):
    declare("orders")
    assert event_stream.create_group("orders", "billing", start_id="0") is True
    assert event_stream.create_group("orders", "billing", start_id="0") is False
    published = [r.id for r in event_stream.publish_batch("orders", [{"n": n} for n in range(6)]).results]

    alive = event_stream.read_group("orders", "billing", "alive", limit=3)
    doomed = event_stream.read_group("orders", "billing", "doomed", limit=3)
    assert ids(alive) + ids(doomed) == published
    assert event_stream.read_group("orders", "billing", "alive") == []
    assert event_stream.ack("orders", "billing", ids(alive)) == 3
    assert event_stream.ack("orders", "billing", ids(alive)) == 0

    # "doomed" dies holding its events: they stay pending, and are not claimable while fresh.
    pending = event_stream.pending("orders", "billing")
    assert [(p.id, p.consumer, p.deliveries) for p in pending] == [(i, "doomed", 1) for i in ids(doomed)]
    assert event_stream.claim_stale("orders", "billing", "alive", min_idle_ms=10_000).events == []
    time.sleep(0.05)
    claimed = event_stream.claim_stale("orders", "billing", "alive", min_idle_ms=20)
    assert ids(claimed.events) == ids(doomed)
    assert [e.payload for e in claimed.events] == [{"n": 3}, {"n": 4}, {"n": 5}]
    assert {(p.consumer, p.deliveries) for p in event_stream.pending("orders", "billing")} == {("alive", 2)}
    event_stream.ack("orders", "billing", ids(claimed.events))

    stats = event_stream.stats("orders")
    assert [(g.name, g.pending, g.last_delivered_id, g.lag) for g in stats.groups] == [
        ("billing", 0, published[-1], 0)
    ]
    with pytest.raises(GroupNotFound):
        event_stream.read_group("orders", "nobody", "c")


def test_blocking_group_read(event_stream: EventStream, declare):
    declare("orders")
    event_stream.create_group("orders", "g")
    timer = threading.Timer(0.2, lambda: event_stream.publish("orders", {"n": 1}))
    timer.start()
    events = event_stream.read_group("orders", "g", "c", block_ms=5000)
    timer.join()
    assert [e.payload for e in events] == [{"n": 1}]


def test_dead_letter_after_max_deliveries(event_stream: EventStream, declare):
    declare("orders")
    event_stream.create_group("orders", "billing", start_id="0")
    poison = event_stream.publish("orders", {"poison": True}).id
    assert ids(event_stream.read_group("orders", "billing", "c1")) == [poison]
    for _ in range(2):  # delivered 2 more times, never acknowledged
        time.sleep(0.03)
        assert ids(
            event_stream.claim_stale("orders", "billing", "c2", min_idle_ms=10, max_deliveries=3).events
        ) == [poison]
    time.sleep(0.03)
    result = event_stream.claim_stale("orders", "billing", "c2", min_idle_ms=10, max_deliveries=3)
    assert result.events == [] and result.dead_lettered == [poison]
    assert event_stream.pending("orders", "billing") == []

    [dead] = event_stream.read(dead_letter_stream("orders"))
    assert dead.payload == {
        "stream": "orders",
        "group": "billing",
        "event_id": poison,
        "consumer": "c2",
        "deliveries": 3,
        "payload": {"poison": True},
    }
    assert event_stream.stats("orders").dead_lettered == 1


def test_touch_keeps_a_working_consumers_events_and_dead_letter_moves_them_whole(
    event_stream: EventStream, declare
):
    declare("orders")
    event_stream.create_group("orders", "hooks", start_id="0")
    first, second = [r.id for r in event_stream.publish_batch("orders", [{"n": 1}, {"n": 2}]).results]
    assert ids(event_stream.read_group("orders", "hooks", "worker")) == [first, second]
    time.sleep(0.06)
    # Still working on them: touched, they are not idle enough for another consumer's claim.
    assert event_stream.touch("orders", "hooks", "worker", [first, second]) == 2
    assert event_stream.touch("orders", "hooks", "someone-else", [first]) == 0  # not theirs
    assert event_stream.claim_stale("orders", "hooks", "thief", min_idle_ms=50).events == []
    assert {p.deliveries for p in event_stream.pending("orders", "hooks")} == {1}  # touching is no delivery

    record = {"group": "hooks", "event_id": first, "last_status": 500}
    assert event_stream.dead_letter("orders", "hooks", {first: record}) == [first]
    assert event_stream.dead_letter("orders", "hooks", {first: record}) == []  # once: no longer pending
    assert [p.id for p in event_stream.pending("orders", "hooks")] == [second]
    assert [e.payload for e in event_stream.read(dead_letter_stream("orders"))] == [record]

    assert event_stream.delete_group("orders", "hooks") is True
    assert event_stream.delete_group("orders", "hooks") is False
    with pytest.raises(GroupNotFound):
        event_stream.pending("orders", "hooks")


def test_group_behind_retention_is_told_of_the_loss(event_stream: EventStream, declare):
    declare("orders", retention={"max_count": 5})
    event_stream.create_group("orders", "slow", start_id="0")
    event_stream.publish_batch("orders", [{"n": n} for n in range(20)])
    event_stream.trim("orders")
    with pytest.raises(EventsLost) as lost:
        event_stream.read_group("orders", "slow", "c")
    event_stream.set_group_position("orders", "slow", lost.value.to_id)
    assert [e.payload["n"] for e in event_stream.read_group("orders", "slow", "c")] == list(range(15, 20))


CONSUMER = """
import sys
from orchestration.store import get_engine
from resources.event_stream import StreamRegistry
backend, store_url, redis_url = sys.argv[1:4]
registry = StreamRegistry(get_engine(store_url))
if backend == "redis":
    from resources.event_stream.redis_backend import RedisEventStream
    events = RedisEventStream(redis_url, registry)
else:
    from resources.event_stream.sql import SqlEventStream
    events = SqlEventStream(registry.engine, registry)
got = events.read_group("orders", "billing", "worker-1", limit=2, block_ms=10000)
print(" ".join(event.id for event in got), flush=True)
sys.stdin.read()  # "working" on them until killed, never acknowledging
"""


def test_a_killed_consumers_events_are_claimed(event_stream: EventStream, declare):
    """A real consumer process takes two events and is SIGKILLed; another consumer claims them."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    declare("orders")
    event_stream.create_group("orders", "billing", start_id="0")
    published = [r.id for r in event_stream.publish_batch("orders", [{"n": n} for n in range(3)]).results]
    store_url = event_stream.registry.engine.url.render_as_string(hide_password=False)
    redis_url = getattr(event_stream, "url", "")
    worker = subprocess.Popen(
        [sys.executable, "-c", CONSUMER, event_stream.backend, store_url, redis_url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        taken = worker.stdout.readline().split()
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
    assert taken == published[:2]
    assert {(p.id, p.consumer) for p in event_stream.pending("orders", "billing")} == {
        (i, "worker-1") for i in taken
    }

    assert ids(event_stream.read_group("orders", "billing", "worker-2")) == published[2:]
    assert event_stream.ack("orders", "billing", published[2:]) == 1
    time.sleep(0.05)
    claimed = event_stream.claim_stale("orders", "billing", "worker-2", min_idle_ms=20)
    assert ids(claimed.events) == taken
    assert event_stream.ack("orders", "billing", taken) == 2
    assert event_stream.pending("orders", "billing") == []


def test_publish_rates_over_one_and_five_minutes(event_stream: EventStream, declare):
    declare("orders")
    assert (event_stream.stats("orders").rate_1m, event_stream.stats("orders").rate_5m) == (0, 0)
    event_stream.publish_batch("orders", [{"n": n} for n in range(100)])
    for n in range(20):
        event_stream.publish("orders", {"n": n}, idempotency_key=f"k{n}")
    assert event_stream.publish("orders", {"n": 0}, idempotency_key="k0").status == "duplicate"
    stats = event_stream.stats("orders")
    # 120 stored events over the window (Redis counts in 10 s buckets: the window is 50-60 s long),
    # rounded to 3 decimals: 120 / 290.2 s is reported as 0.414, just over 120 / 290.
    rounding = 0.0005
    assert 120 / 60 - rounding <= stats.rate_1m <= 120 / 50 + rounding
    assert 120 / 300 - rounding <= stats.rate_5m <= 120 / 290 + rounding
    assert stats.to_json()["rate_1m"] == stats.rate_1m
