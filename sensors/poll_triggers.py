"""Poll triggers: sensors that run a REST pipeline when its API has records past the committed cursor.

For APIs that publish no change events (`triggers: [{type: poll, every: 1m}]` in a pipeline spec).
Each tick reads the pipeline's committed cursor from its target, asks the API for the first page of
the incremental window (one request: the same URL, parameters and auth the run uses) and requests a
run only when a record on it is past the cursor. The run key is the newest cursor value seen
(`poll:<pipeline>:<value>`), so ticks that see the same changes before the run has published them
launch one run (Dagster's run-key deduplication), and a later change makes a new key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import dagster as dg

if TYPE_CHECKING:
    from assets.etl.spec import LoadedPipeline

POLL_TAG = "junction/trigger"


def poll_sensor_name(pipeline: str) -> str:
    return f"{pipeline}_poll"


def newest_past(records: list[dict[str, Any]], cursor: str, kind: str, last: Any | None) -> Any | None:
    """The newest cursor value among `records` past `last` (all of them on a first run), or None."""
    from assets.etl.state import parse_cursor
    from orchestration.errors import JunctionError

    newest = None
    for record in records:
        value = record.get(cursor)
        if value is None:
            continue
        try:
            parsed = parse_cursor(value, kind)
        except JunctionError:  # a record the run will quarantine: not a reason to run
            continue
        if (last is None or parsed > last) and (newest is None or parsed > newest):
            newest = parsed
    return newest


def poll_sensor(pipeline: LoadedPipeline) -> dg.SensorDefinition:
    from assets.etl.factory import pipeline_job_name
    from assets.etl.report import PIPELINE_TAG
    from orchestration.kernel.times import parse_duration

    name, spec = pipeline.name, pipeline.spec
    every = next(t.every for t in spec.triggers if t.type == "poll")
    interval = int((parse_duration(every) or parse_duration("1m")).total_seconds())  # type: ignore[union-attr]
    assert spec.incremental is not None and spec.target is not None  # checked by the spec

    def evaluate(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        from assets.etl.loads import open_target, target_base_dir
        from assets.etl.sources.rest import RestSource
        from assets.etl.state import IncrementalWindow, cursor_text

        target = open_target(spec.target, target_base_dir(), pipeline=name)
        try:
            state = target.read_state(name)
        finally:
            target.dispose()
        window = IncrementalWindow.of(name, spec.incremental, state, spec.load.mode)
        records = RestSource(spec.source, spec.batch_size, window).probe()
        newest = newest_past(records, spec.incremental.cursor, spec.incremental.kind, window.last_value)
        last = cursor_text(window.last_value)
        if newest is None:
            return dg.SkipReason(
                f"nothing past {spec.incremental.cursor} = {last or spec.incremental.initial} "
                f"({len(records)} record(s) on the first page)"
            )
        value = cursor_text(newest)
        context.log.info(f"{name}: records up to {value} past {last or 'the start'}: requesting a run")
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(run_key=f"poll:{name}:{value}", tags={PIPELINE_TAG: name, POLL_TAG: "poll"})
            ]
        )

    return dg.SensorDefinition(
        name=poll_sensor_name(name),
        evaluation_fn=evaluate,
        minimum_interval_seconds=interval,
        job_name=pipeline_job_name(name),
        description=f"Runs pipeline {name} when its API has records past the committed cursor (every {every}).",
        default_status=dg.DefaultSensorStatus.RUNNING,  # declared in the spec, like stream triggers
    )


def poll_sensors(pipelines: Mapping[str, LoadedPipeline]) -> list[dg.SensorDefinition]:
    return [
        poll_sensor(pipeline)
        for pipeline in pipelines.values()
        if any(trigger.type == "poll" for trigger in pipeline.spec.triggers)
    ]
