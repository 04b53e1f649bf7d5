"""Stream triggers: sensors that turn events of a declared stream into Dagster runs exactly once.

A trigger names a stream, an optional filter (a kernel condition, evaluated per payload), a target
(what a run launches: a job, an asset selection; pluggable through `RunTarget`) and a mode:

- `EachEvent`: one run per matching event, `run_key = evt:{stream}:{id}`.
- `CountBatches(size)`: exactly `size` matching events per run, keyed by the first id
  (`batch:{stream}:{first_id}`); a partial batch waits for more events.
- `TimeWindows(seconds)`: the matching events of one closed window `[start, start + seconds)` of
  publish time per run, keyed by the window start (`window:{stream}:{start_ms}`). A window closes
  when an event of a later window has been read, or - once the tick has read to the end of the
  stream - `grace_seconds` after its end (ids come from the publishing clock; the grace covers skew
  between it and the sensor's). An event that still lands in a window the clock closed gets a run
  of its own (`window:{stream}:{start_ms}:late:{first_id}`), never a silent dedup.

Exactly once: batch boundaries depend only on the sequence of events after the origin, never on
how many events one tick happened to read, and the partial batch is part of the cursor. If the
daemon dies after launching runs but before saving the cursor, the next tick recomputes the same
run keys from the old cursor, and Dagster's run-key deduplication skips the runs that already exist.

Runs receive the stream and the id range (tags `junction/stream`, `junction/events_first`, ...,
and, when the target names a config op, `EventRangeConfig` as its run config) and read the events
themselves with `EventRangeConfig.read` - never the payloads through run config.

Ticks stay short (Dagster gives a sensor call 60 s): each tick reads at most `max_events_per_tick`
events, requests at most `max_runs_per_tick` runs and stops after `tick_budget_seconds`; a backlog
is paged through across ticks. A tick whose
read hits `EventsLost` fails, naming the lost range; it never skips. Replays (`replay_run_requests`)
use their own run-key namespace, `replay:{replay_id}:...`, so they deliberately re-run.
"""

from __future__ import annotations

import json
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import dagster as dg

from assets.etl.spec import DEFAULT_TRIGGER_INTERVAL_S
from orchestration.kernel.conditions import Condition, evaluate, parse_condition
from orchestration.kernel.spec_errors import SpecError, SpecProblem
from resources.event_stream import Event, EventId, EventsLost, EventStream
from resources.event_stream.triggered import COUNT_TAG, FIRST_ID_TAG, LAST_ID_TAG, STREAM_TAG, TriggeredRange

if TYPE_CHECKING:
    from assets.etl.spec import LoadedPipeline

TRIGGER_TAG = "junction/trigger"
REPLAY_TAG = "junction/replay"
# The sensor metadata entry describing a trigger (stream, mode, filter, how its runs are launched).
TRIGGER_METADATA = "junction/trigger"

DEFAULT_MAX_EVENTS_PER_TICK = 5_000
DEFAULT_MAX_RUNS_PER_TICK = 500
DEFAULT_TICK_BUDGET_S = 20.0
READ_PAGE_SIZE = 500


# --- what a run receives ------------------------------------------------------------------------------


class EventRangeConfig(dg.Config):
    """The events one triggered run handles: a stream and an inclusive id range (plus the filter).

    Use it as an op's or asset's config and read the events with `read`.
    """

    stream: str
    first_id: str
    last_id: str
    count: int
    condition_json: str | None = None

    def read(self, events: EventStream) -> Iterator[Event]:
        """The range's events that match the trigger's filter, in id order."""
        condition = parse_condition(json.loads(self.condition_json)) if self.condition_json else None
        for event in TriggeredRange(self.stream, self.first_id, self.last_id, self.count).read(events):
            if condition is None or matches(condition, event):
                yield event


@dataclass(frozen=True)
class EventRange:
    """One run's worth of events, as computed by a tick."""

    run_key: str
    stream: str
    first_id: str
    last_id: str
    count: int

    def tags(self) -> dict[str, str]:
        return {
            STREAM_TAG: self.stream,
            FIRST_ID_TAG: self.first_id,
            LAST_ID_TAG: self.last_id,
            COUNT_TAG: str(self.count),
        }

    def config(self, condition_source: Any) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "first_id": self.first_id,
            "last_id": self.last_id,
            "count": self.count,
            "condition_json": json.dumps(condition_source) if condition_source is not None else None,
        }


# --- targets -------------------------------------------------------------------------------------------


class RunTarget(ABC):
    """What a triggered run launches: a job, an asset selection, or a workflow (`WorkflowTarget`)."""

    @property
    @abstractmethod
    def label(self) -> str:
        """A short name for sensor names and descriptions."""

    @abstractmethod
    def sensor_arguments(self) -> dict[str, Any]:
        """Keyword arguments for `dg.SensorDefinition` that name the target (`job`, `target`, ...)."""

    @abstractmethod
    def run_request(self, events: EventRange, condition_source: Any, tags: dict[str, str]) -> dg.RunRequest:
        """The request that launches a run for `events` (run key, tags, run config)."""

    def launch_metadata(self) -> dict[str, Any]:
        """How a run is launched from outside the sensor (a replay through the gateway), recorded in
        the sensor's metadata: `kind` "job" (the sensor's job) or "assets" (its asset selection), and
        `config_op`, the op that receives `EventRangeConfig` (or None). Empty: not replayable."""
        return {}


class LaunchedJob(NamedTuple):
    """A job known by name only (a replay rebuilds its trigger from the sensor's metadata)."""

    name: str


def _op_config(op_name: str | None, config: dict[str, Any]) -> dict[str, Any]:
    return {"ops": {op_name: {"config": config}}} if op_name else {}


@dataclass(frozen=True)
class JobTarget(RunTarget):
    """Launch `job`. With `config_op`, that op gets `EventRangeConfig` as its run config."""

    job: Any  # a JobDefinition, or an asset job from `dg.define_asset_job`
    config_op: str | None = None

    @property
    def label(self) -> str:
        return self.job.name

    def sensor_arguments(self) -> dict[str, Any]:
        return {"job": self.job}

    def launch_metadata(self) -> dict[str, Any]:
        return {"kind": "job", "config_op": self.config_op}

    def run_request(self, events: EventRange, condition_source: Any, tags: dict[str, str]) -> dg.RunRequest:
        return dg.RunRequest(
            run_key=events.run_key,
            run_config=_op_config(self.config_op, events.config(condition_source)),
            tags=tags,
        )


@dataclass(frozen=True)
class AssetSelectionTarget(RunTarget):
    """Materialize `selection`. With `config_asset` (its op name), that asset gets `EventRangeConfig`."""

    selection: dg.AssetSelection
    name: str
    config_asset: str | None = None

    @property
    def label(self) -> str:
        return self.name

    def sensor_arguments(self) -> dict[str, Any]:
        return {"target": self.selection}

    def launch_metadata(self) -> dict[str, Any]:
        return {"kind": "assets", "config_op": self.config_asset}

    def run_request(self, events: EventRange, condition_source: Any, tags: dict[str, str]) -> dg.RunRequest:
        return dg.RunRequest(
            run_key=events.run_key,
            run_config=_op_config(self.config_asset, events.config(condition_source)),
            tags=tags,
        )


@dataclass(frozen=True)
class WorkflowTarget(RunTarget):
    """Launch a workflow's job (`orchestration/workflows/`): one run is one new execution.

    The run config is the workflow's inputs (their defaults unless `inputs` sets some); the run reads
    its event itself from the range tags (`orchestration/workflows/triggers.py`). The execution id is
    derived from the run key, so a request re-emitted after a crash carries the same one.
    """

    job: Any  # the workflow's JobDefinition
    inputs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"workflow {self.job.name}"

    def sensor_arguments(self) -> dict[str, Any]:
        return {"job": self.job}

    def launch_metadata(self) -> dict[str, Any]:
        import json

        # Inputs as JSON (a date default becomes its ISO text, as the launchpad shows it).
        return {"kind": "workflow", "inputs": json.loads(json.dumps(dict(self.inputs), default=str))}

    def run_request(self, events: EventRange, condition_source: Any, tags: dict[str, str]) -> dg.RunRequest:
        import uuid

        from orchestration.workflows.context import EXECUTION_ID_TAG

        execution_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"junction:{self.job.name}:{events.run_key}"))
        return dg.RunRequest(
            run_key=events.run_key,
            run_config=dict(self.inputs),
            tags={**tags, EXECUTION_ID_TAG: execution_id},
        )


# --- modes ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EachEvent:
    """One run per matching event."""


@dataclass(frozen=True)
class CountBatches:
    """Exactly `size` matching events per run."""

    size: int

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError("a batch holds at least one event")


@dataclass(frozen=True)
class TimeWindows:
    """The matching events of each closed window of `seconds` (aligned to the epoch) per run."""

    seconds: int
    grace_seconds: float = 5.0

    def __post_init__(self) -> None:
        if self.seconds < 1:
            raise ValueError("a window lasts at least one second")

    @property
    def width_ms(self) -> int:
        return self.seconds * 1000

    def start_of(self, event_id: EventId) -> int:
        return event_id.ms - event_id.ms % self.width_ms


Mode = EachEvent | CountBatches | TimeWindows


def matches(condition: Condition, event: Event) -> bool:
    # Conditions test mappings; a payload of another shape (a list, a number) matches no filter.
    return isinstance(event.payload, Mapping) and evaluate(condition, event.payload)


# --- the cursor ----------------------------------------------------------------------------------------


@dataclass
class OpenGroup:
    """The matching events read so far of a batch or window not yet emitted."""

    first_id: str
    last_id: str
    count: int
    window_start: int | None = None


@dataclass
class TriggerCursor:
    """Where the sensor is: the last event read (None: the oldest retained) and the open group."""

    after: str | None = None
    open: OpenGroup | None = None
    closed_window: int | None = None  # start (ms) of the latest window emitted

    @classmethod
    def parse(cls, text: str | None) -> TriggerCursor:
        if not text:
            return cls()
        data = json.loads(text)
        group = data.get("open")
        return cls(
            after=data.get("after"),
            open=OpenGroup(**group) if group else None,
            closed_window=data.get("closed_window"),
        )

    def serialize(self) -> str:
        return json.dumps(
            {
                "after": self.after,
                "open": self.open.__dict__ if self.open else None,
                "closed_window": self.closed_window,
            }
        )


# --- the trigger and its sensor ------------------------------------------------------------------------


class StreamSensorEventsLost(EventsLost):
    """A trigger's sensor found that retention removed events it had not read yet."""

    def __init__(self, sensor_name: str, lost: EventsLost):
        self.sensor_name = sensor_name
        super().__init__(lost.stream, lost.from_id, lost.to_id)
        self.args = (
            f"sensor {sensor_name!r}: stream {lost.stream!r}: events {lost.from_id} .. {lost.to_id} were "
            f"removed by retention before the sensor read them; no run was launched for them. To accept "
            f"the loss, set the sensor's cursor to {TriggerCursor(after=lost.to_id).serialize()}",
        )

    def __str__(self) -> str:
        return self.args[0]


@dataclass(frozen=True)
class StreamTrigger:
    """Turn events of `stream` (matching `condition`) into runs of `target` according to `mode`."""

    name: str
    stream: str
    target: RunTarget
    mode: Mode = field(default_factory=EachEvent)
    condition: Any = None  # the kernel condition as written (YAML/JSON); parsed once below
    # Dagster's default (30 s) would add up to half a minute to every event; the daemon loops every ~5 s.
    minimum_interval_seconds: int = DEFAULT_TRIGGER_INTERVAL_S
    max_events_per_tick: int = DEFAULT_MAX_EVENTS_PER_TICK
    max_runs_per_tick: int = DEFAULT_MAX_RUNS_PER_TICK
    tick_budget_seconds: float = DEFAULT_TICK_BUDGET_S
    default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.RUNNING
    tags: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Parsed here so a bad filter fails the code location at load, naming the problem.
        object.__setattr__(
            self, "_parsed", parse_condition(self.condition) if self.condition is not None else None
        )

    @property
    def parsed_condition(self) -> Condition | None:
        return self._parsed  # type: ignore[attr-defined]

    # -- one tick ----------------------------------------------------------------------------------

    def evaluate_tick(
        self, events: EventStream, cursor: TriggerCursor, *, now_ms: Callable[[], int] | None = None
    ) -> tuple[list[EventRange], TriggerCursor]:
        """The ranges completed after `cursor` and the cursor to save with their run requests."""
        clock = now_ms or (lambda: time.time_ns() // 1_000_000)
        deadline = time.monotonic() + self.tick_budget_seconds
        state = TriggerCursor(cursor.after, cursor.open, cursor.closed_window)
        emitted: list[EventRange] = []
        read, reached_end = 0, False
        while read < self.max_events_per_tick and len(emitted) < self.max_runs_per_tick:
            if time.monotonic() >= deadline:
                break
            page_size = min(READ_PAGE_SIZE, self.max_events_per_tick - read)
            try:
                page = events.read(self.stream, state.after, limit=page_size)
            except EventsLost as lost:
                raise StreamSensorEventsLost(self.name, lost) from lost
            taken = 0
            for event in page:
                self._take(event, state, emitted)
                taken += 1
                if len(emitted) >= self.max_runs_per_tick:
                    break
            read += taken
            if len(page) < page_size:
                reached_end = taken == len(page)
                break
        # Closing a window by the clock is only safe once every event published so far was read:
        # an unread event of the open window would otherwise start a second group with its key.
        if reached_end and isinstance(self.mode, TimeWindows) and state.open is not None:
            window_end = state.open.window_start + self.mode.width_ms
            if clock() >= window_end + self.mode.grace_seconds * 1000:
                self._close_window(state, emitted)
        return emitted, state

    def _take(self, event: Event, state: TriggerCursor, emitted: list[EventRange]) -> None:
        """Add one event (the cursor moves past it); append whatever it completes to `emitted`."""
        mode = self.mode
        state.after = event.id
        if isinstance(mode, TimeWindows) and state.open is not None:
            # Ids only increase, so an event of a later window closes the open one for good.
            if mode.start_of(event.event_id) != state.open.window_start:
                self._close_window(state, emitted)
        if self.parsed_condition is not None and not matches(self.parsed_condition, event):
            return
        if isinstance(mode, EachEvent):
            emitted.append(EventRange(f"evt:{self.stream}:{event.id}", self.stream, event.id, event.id, 1))
            return
        group = state.open
        if group is None:
            start = mode.start_of(event.event_id) if isinstance(mode, TimeWindows) else None
            state.open = OpenGroup(first_id=event.id, last_id=event.id, count=1, window_start=start)
        else:
            state.open = OpenGroup(group.first_id, event.id, group.count + 1, group.window_start)
        if isinstance(mode, CountBatches) and state.open.count == mode.size:
            emitted.append(self._range(state.open, f"batch:{self.stream}:{state.open.first_id}"))
            state.open = None

    def _close_window(self, state: TriggerCursor, emitted: list[EventRange]) -> None:
        group = state.open
        assert group is not None and group.window_start is not None
        key = f"window:{self.stream}:{group.window_start}"
        if state.closed_window is not None and group.window_start <= state.closed_window:
            # An event whose id falls in a window already closed by the clock (a publisher's clock
            # behind the grace): its own run, under a key of its own, rather than a silent dedup.
            key += f":late:{group.first_id}"
        emitted.append(self._range(group, key))
        state.closed_window = max(group.window_start, state.closed_window or group.window_start)
        state.open = None

    def _range(self, group: OpenGroup, run_key: str) -> EventRange:
        return EventRange(run_key, self.stream, group.first_id, group.last_id, group.count)

    def run_request(self, events: EventRange, *, replay_id: str | None = None) -> dg.RunRequest:
        tags = {**self.tags, **events.tags(), TRIGGER_TAG: self.name}
        if replay_id is not None:
            tags[REPLAY_TAG] = replay_id
            events = EventRange(
                f"replay:{replay_id}:{events.run_key}",
                events.stream,
                events.first_id,
                events.last_id,
                events.count,
            )
        return self.target.run_request(events, self.condition, tags)

    def replay_run_requests(
        self, events: EventStream, from_id: str, to_id: str, replay_id: str
    ) -> list[dg.RunRequest]:
        """Run requests for the events `from_id`..`to_id` again, in their own run-key namespace.

        Boundaries are recomputed from `from_id` (give the first id of an original batch to replay it
        as it was); a trailing partial batch or window is not replayed, as a tick would not emit it.
        """
        emitted: list[EventRange] = []
        state = TriggerCursor()
        after = str(EventId.parse(from_id).previous())
        try:
            for event in events.iter_events(self.stream, after_id=after, until_id=to_id):
                self._take(event, state, emitted)
        except EventsLost as lost:
            raise StreamSensorEventsLost(self.name, lost) from lost
        return [self.run_request(item, replay_id=replay_id) for item in emitted]

    # -- the Dagster sensor --------------------------------------------------------------------------

    def sensor(self, open_events: Callable[[], EventStream] | None = None) -> dg.SensorDefinition:
        """The sensor; `open_events` opens the event stream per tick (default: the platform's)."""
        if open_events is None:
            from resources.event_stream import open_event_stream

            open_events = open_event_stream
        trigger = self

        def evaluate(context: dg.SensorEvaluationContext) -> dg.SensorResult:
            cursor = TriggerCursor.parse(context.cursor)
            with open_events() as events:
                ranges, next_cursor = trigger.evaluate_tick(events, cursor)
            if ranges:
                context.log.info(
                    f"{len(ranges)} run(s) for events {ranges[0].first_id} .. {ranges[-1].last_id}"
                )
            return dg.SensorResult(
                run_requests=[trigger.run_request(item) for item in ranges],
                cursor=next_cursor.serialize(),
            )

        return dg.SensorDefinition(
            name=self.name,
            evaluation_fn=evaluate,
            minimum_interval_seconds=self.minimum_interval_seconds,
            description=f"Runs {self.target.label} on events of stream {self.stream!r} ({self.describe_mode()}).",
            default_status=self.default_status,
            metadata={TRIGGER_METADATA: dg.MetadataValue.json(self.metadata())},
            **self.target.sensor_arguments(),
        )

    def metadata(self) -> dict[str, Any]:
        """What the sensor's metadata records (shown in the UI; the gateway rebuilds replays from it)."""
        mode: dict[str, Any] = {"kind": "each"}
        if isinstance(self.mode, CountBatches):
            mode = {"kind": "count", "size": self.mode.size}
        elif isinstance(self.mode, TimeWindows):
            mode = {"kind": "window", "seconds": self.mode.seconds, "grace_seconds": self.mode.grace_seconds}
        return {
            "stream": self.stream,
            "mode": mode,
            "condition": self.condition,
            "target": self.target.launch_metadata(),
            "tags": dict(self.tags),
        }

    @classmethod
    def from_metadata(cls, name: str, metadata: Mapping[str, Any], job_name: str) -> StreamTrigger:
        """The trigger as recorded by `metadata()`, launching `job_name` (for replays outside the sensor)."""
        mode_data = metadata["mode"]
        mode: Mode = EachEvent()
        if mode_data["kind"] == "count":
            mode = CountBatches(mode_data["size"])
        elif mode_data["kind"] == "window":
            mode = TimeWindows(mode_data["seconds"], mode_data["grace_seconds"])
        target = metadata.get("target") or {}
        return cls(
            name=name,
            stream=metadata["stream"],
            target=WorkflowTarget(LaunchedJob(job_name), inputs=target.get("inputs") or {})
            if target.get("kind") == "workflow"
            else JobTarget(LaunchedJob(job_name), config_op=target.get("config_op")),
            mode=mode,
            condition=metadata.get("condition"),
            tags=metadata.get("tags") or {},
        )

    def describe_mode(self) -> str:
        if isinstance(self.mode, CountBatches):
            return f"batches of {self.mode.size} events"
        if isinstance(self.mode, TimeWindows):
            return f"windows of {self.mode.seconds} s"
        return "one run per event"


def event_trigger_sensors(
    triggers: Sequence[StreamTrigger], open_events: Callable[[], EventStream] | None = None
) -> list[dg.SensorDefinition]:
    """One sensor per trigger (the factory `orchestration/definitions.py` merges)."""
    names = [trigger.name for trigger in triggers]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"stream trigger names must be unique: {', '.join(duplicates)}")
    return [trigger.sensor(open_events) for trigger in triggers]


# --- triggers declared in pipeline specs ---------------------------------------------------------------


def trigger_sensor_name(pipeline: str, stream: str) -> str:
    """`orders_etl_on_platform_runs` for stream `platform.runs`: Dagster names allow only [A-Za-z0-9_]."""
    return f"{pipeline}_on_{re.sub(r'[^A-Za-z0-9_]', '_', stream)}"


def pipeline_triggers(
    pipelines_dir: str | Path | None = None, *, pipelines: Mapping[str, LoadedPipeline] | None = None
) -> list[StreamTrigger]:
    """The `triggers:` of every pipeline spec, each targeting the pipeline's asset group.

    The specs come from `pipelines` when already loaded, else from `pipelines_dir` (default:
    settings.pipelines_dir) with the ETL loader's own file rule.
    `max_events_per_run` makes count batches, `debounce_seconds` closed time windows of that length;
    the two together would make boundaries depend on both and are rejected at load.
    """
    from assets.etl.spec import load_pipelines, pipeline_files

    if pipelines is None:
        pipelines = load_pipelines(pipeline_files(Path(pipelines_dir) if pipelines_dir is not None else None))
    triggers: list[StreamTrigger] = []
    problems: list[SpecProblem] = []
    for name, pipeline in pipelines.items():
        group = pipeline.spec.group or name
        # Stream triggers only (poll triggers are `sensors/poll_triggers.py`'s), with their place in the spec.
        declared_streams = [(at, t) for at, t in enumerate(pipeline.spec.triggers) if t.type == "stream"]
        names = [trigger_sensor_name(name, declared.stream) for _, declared in declared_streams]
        for index, (at, declared) in enumerate(declared_streams):
            if declared.max_events_per_run and declared.debounce_seconds:
                problems.append(
                    SpecProblem(
                        f"triggers[{at}]",
                        "set either max_events_per_run (count batches) or debounce_seconds (time windows)",
                        str(pipeline.file),
                    )
                )
                continue
            mode: Mode = EachEvent()
            if declared.max_events_per_run:
                mode = CountBatches(declared.max_events_per_run)
            elif declared.debounce_seconds:
                mode = TimeWindows(declared.debounce_seconds)
            triggers.append(
                StreamTrigger(
                    # The index only where several triggers of one pipeline would share a name.
                    name=names[index] + (f"_{index}" if names.count(names[index]) > 1 else ""),
                    stream=declared.stream,
                    target=AssetSelectionTarget(dg.AssetSelection.groups(group), name=f"pipeline {name}"),
                    mode=mode,
                    condition=declared.condition.source if declared.condition is not None else None,
                    minimum_interval_seconds=declared.minimum_interval_seconds,
                    tags={"junction/pipeline": name},
                )
            )
    if problems:
        raise SpecError(problems)
    return triggers
