"""What a stream-triggered run carries: its stream and the inclusive id range of its events, as run
tags (written by `sensors/event_triggers.py`), and how a run reads those events back."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import NamedTuple

from resources.event_stream.core import Event, EventId, EventStream

STREAM_TAG = "junction/stream"
FIRST_ID_TAG = "junction/events_first"
LAST_ID_TAG = "junction/events_last"
COUNT_TAG = "junction/events_count"


class TriggeredRange(NamedTuple):
    stream: str
    first_id: str
    last_id: str
    count: int

    @classmethod
    def of_run(cls, tags: Mapping[str, str]) -> TriggeredRange | None:
        """The range a run was launched for, or None for a run no stream trigger launched."""
        if not all(tag in tags for tag in (STREAM_TAG, FIRST_ID_TAG, LAST_ID_TAG)):
            return None
        return cls(tags[STREAM_TAG], tags[FIRST_ID_TAG], tags[LAST_ID_TAG], int(tags.get(COUNT_TAG) or 0))

    def read(self, events: EventStream) -> Iterator[Event]:
        """Every event of the range, in id order."""
        after = str(EventId.parse(self.first_id).previous())
        yield from events.iter_events(self.stream, after_id=after, until_id=self.last_id)
