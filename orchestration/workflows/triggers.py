"""Stream triggers of workflows: one event → one execution, through the streaming sensor factory.

A spec's `triggers: [{type: stream, stream, filter}]` becomes a `StreamTrigger` (`sensors/event_triggers.py`)
in `EachEvent` mode with a `WorkflowTarget`: the sensor (named `<workflow>_on_<stream>`) asks for one
run per matching event with `run_key = evt:{stream}:{id}` and the tags `junction/stream`,
`junction/events_first`/`_last` (the event id) and `junction/execution_id`. The run gets no payload
through run config: its steps read the event themselves (`trigger_of`, once per run) and see it as
`trigger.event` (`{stream, id, time, payload}`).
"""

from __future__ import annotations

from collections import OrderedDict
from threading import Lock
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import dagster as dg

    from orchestration.workflows.spec import WorkflowSpec
    from sensors.event_triggers import StreamTrigger

# Steps of one run share its event; a run worker runs one run, the in-process tests several.
_EVENTS_BY_RUN: OrderedDict[str, dict[str, Any]] = OrderedDict()
_EVENTS_KEPT = 64
_lock = Lock()


def stream_triggers(spec: WorkflowSpec, job: dg.JobDefinition) -> list[StreamTrigger]:
    """The spec's stream triggers as `StreamTrigger`s launching `job`."""
    from sensors.event_triggers import EachEvent, StreamTrigger, WorkflowTarget, trigger_sensor_name

    declared = [trigger for trigger in spec.triggers if trigger.type == "stream"]
    streams = [trigger.stream for trigger in declared]
    return [
        StreamTrigger(
            name=trigger_sensor_name(spec.name, trigger.stream)
            + (f"_{index}" if streams.count(trigger.stream) > 1 else ""),
            stream=trigger.stream,
            target=WorkflowTarget(job),
            mode=EachEvent(),
            condition=trigger.filter,
            tags={"junction/workflow": spec.name},
        )
        for index, trigger in enumerate(declared)
    ]


def trigger_of(context: dg.OpExecutionContext) -> dict[str, Any] | None:
    """`{"event": {...}}` for a run launched by a stream trigger, else None (read once per run)."""
    from sensors.event_triggers import FIRST_ID_TAG, LAST_ID_TAG, STREAM_TAG

    tags = context.run.tags
    stream, event_id = tags.get(STREAM_TAG), tags.get(FIRST_ID_TAG)
    if stream is None or event_id is None:
        return None
    if tags.get(LAST_ID_TAG, event_id) != event_id:
        raise ValueError(f"run {context.run_id} covers several events; a workflow run handles one")
    with _lock:
        if context.run_id in _EVENTS_BY_RUN:
            return _EVENTS_BY_RUN[context.run_id]
    trigger = {"event": read_event(stream, event_id)}
    with _lock:
        _EVENTS_BY_RUN[context.run_id] = trigger
        while len(_EVENTS_BY_RUN) > _EVENTS_KEPT:
            _EVENTS_BY_RUN.popitem(last=False)
    return trigger


def read_event(stream: str, event_id: str) -> dict[str, Any]:
    """One event of the platform's event stream, as JSON; an event retention removed is an error."""
    from orchestration.errors import JunctionError
    from resources.event_stream import EventId, open_event_stream

    with open_event_stream() as events:
        found = list(
            events.iter_events(stream, after_id=str(EventId.parse(event_id).previous()), until_id=event_id)
        )
    if not found or found[0].id != event_id:
        raise JunctionError(f"event {event_id} of stream {stream!r} is no longer in the stream")
    return found[0].to_json()
