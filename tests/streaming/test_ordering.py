"""Commit order: concurrent publishers never make a reader miss an event (all three backends).

An incremental reader keeps a cursor and reads after it, again and again, while several threads
publish. If ids could commit out of order (a PostgreSQL sequence would), an event committed with an
id below the reader's cursor would never be seen: the reader's collection would miss it.
"""

from __future__ import annotations

import threading

from resources.event_stream import EventId, EventStream

PUBLISHERS, ROUNDS, BATCH = 4, 25, 3


def test_concurrent_publishers_never_commit_below_a_seen_id(event_stream: EventStream, declare):
    declare("orders")
    stop = threading.Event()
    seen: list[str] = []
    failures: list[BaseException] = []

    def publisher(number: int) -> None:
        try:
            for round_ in range(ROUNDS):
                batch = [{"publisher": number, "round": round_, "i": i} for i in range(BATCH)]
                assert not event_stream.publish_batch("orders", batch).rejected
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failures.append(exc)

    def reader() -> None:
        cursor = None
        try:
            while True:
                done = stop.is_set()  # read once more after the publishers finished
                for event in event_stream.read("orders", after_id=cursor, limit=1000):
                    assert cursor is None or EventId.parse(event.id) > EventId.parse(cursor)
                    seen.append(event.id)
                    cursor = event.id
                if done:
                    return
        except BaseException as exc:  # noqa: BLE001
            failures.append(exc)

    reading = threading.Thread(target=reader)
    reading.start()
    publishers = [threading.Thread(target=publisher, args=(n,)) for n in range(PUBLISHERS)]
    for thread in publishers:
        thread.start()
    for thread in publishers:
        thread.join()
    stop.set()
    reading.join()

    assert not failures, failures
    everything = [event.id for event in event_stream.read("orders", limit=10_000)]
    assert len(everything) == PUBLISHERS * ROUNDS * BATCH
    assert seen == everything, "the incremental reader missed events that committed below its cursor"
    # Each publisher's own events keep their order.
    by_publisher: dict[int, list[tuple[int, int]]] = {}
    for event in event_stream.read("orders", limit=10_000):
        by_publisher.setdefault(event.payload["publisher"], []).append(
            (event.payload["round"], event.payload["i"])
        )
    assert all(order == sorted(order) for order in by_publisher.values())
