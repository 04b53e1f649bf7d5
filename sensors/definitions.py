"""The streaming sensors as `Definitions`: triggers declared in pipeline specs and platform happenings.

Triggers written in Python are built with `sensors.event_triggers.StreamTrigger(...).sensor()` beside
the job or assets they launch (under `assets/`, picked up like any analyst definition).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg

from sensors.event_triggers import event_trigger_sensors, pipeline_triggers
from sensors.platform_events import platform_event_sensors
from sensors.poll_triggers import poll_sensors

if TYPE_CHECKING:
    from assets.etl.spec import LoadedPipeline


def streaming_definitions(
    pipelines_dir: str | Path | None = None, *, pipelines: Mapping[str, LoadedPipeline] | None = None
) -> dg.Definitions:
    """Sensors of the pipelines' `triggers:` (stream and poll; a bad trigger fails the code location)
    and the sensors publishing to `platform.runs` / `platform.assets`."""
    from assets.etl.spec import load_pipelines, pipeline_files

    if pipelines is None:
        pipelines = load_pipelines(pipeline_files(Path(pipelines_dir) if pipelines_dir is not None else None))
    triggers = pipeline_triggers(pipelines=pipelines)
    return dg.Definitions(
        sensors=[*event_trigger_sensors(triggers), *poll_sensors(pipelines), *platform_event_sensors()]
    )
