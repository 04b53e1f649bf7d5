"""`EventStreamResource`: the event stream as a Dagster resource, for ops, assets and sensors.

`redis_url` unset means the platform's setting (JUNCTION_REDIS_URL); when that is unset too, the SQL
backend on the platform store (`database_url`, default JUNCTION_DATABASE_URL / the embedded SQLite).
Set either with `dg.EnvVar(...)` where a deployment keeps the URL elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from pydantic import PrivateAttr

from resources.event_stream import EventStream, open_event_stream


class EventStreamResource(dg.ConfigurableResource):
    """Publish and read Junction event streams (Redis Streams, or the platform store)."""

    redis_url: str | None = None
    database_url: str | None = None

    _stream: EventStream | None = PrivateAttr(default=None)

    def get_stream(self) -> EventStream:
        """The resource's `EventStream` (opened on first use, closed with the execution)."""
        if self._stream is None:
            self._stream = open_event_stream(redis_url=self.redis_url, store_url=self.database_url)
        return self._stream

    @property
    def backend(self) -> str:
        return self.get_stream().backend

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    @contextmanager
    def open(self) -> Iterator[EventStream]:
        """A stream of its own, closed on exit (for sensors, which have no execution teardown)."""
        stream = open_event_stream(redis_url=self.redis_url, store_url=self.database_url)
        try:
            yield stream
        finally:
            stream.close()
