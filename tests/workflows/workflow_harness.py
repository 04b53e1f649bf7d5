"""Runs as the daemon launches them, on a real instance with a real run queue, without the daemon.

`Location` is a code location (`sync_definitions.definitions`, reconstructable like the code server's)
whose runs carry the origins a queued run needs; `start` creates a run and executes it in this process,
`run_queued` starts a run a step put in the queue (as the daemon's dequeuer would), `tick` evaluates a
sensor and `launch` runs what it asked for with its run key and tags.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster._core.definitions.reconstruct import ReconstructableJob, ReconstructableRepository
from dagster._core.events import DagsterEvent, DagsterEventType
from dagster._core.execution.api import execute_run
from dagster._core.remote_origin import InProcessCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

HERE = Path(__file__).parent
MODULE, ATTRIBUTE = "sync_definitions", "definitions"
QUEUED = {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator"}


@pytest.fixture
def queued_instance() -> Iterator[dg.DagsterInstance]:
    """A real (temporary, SQLite) Dagster instance whose runs go through the run queue."""
    with dg.instance_for_test(overrides={"run_coordinator": QUEUED}) as instance:
        yield instance


@dataclass
class Location:
    instance: dg.DagsterInstance
    repository: ReconstructableRepository = field(init=False)

    def __post_init__(self) -> None:
        # Dagster keeps the last job definition loaded per process; each test writes its own specs.
        ReconstructableJob.get_repository_definition.cache_clear()
        ReconstructableJob.get_definition.cache_clear()
        self.repository = ReconstructableRepository.for_module(MODULE, ATTRIBUTE, working_directory=str(HERE))

    @property
    def definitions(self) -> dg.Definitions:
        import sync_definitions

        return sync_definitions.definitions()

    def remote_origin(self, job_name: str) -> RemoteJobOrigin:
        target = LoadableTargetOrigin(module_name=MODULE, attribute=ATTRIBUTE, working_directory=str(HERE))
        return RemoteJobOrigin(
            repository_origin=RemoteRepositoryOrigin(
                code_location_origin=InProcessCodeLocationOrigin(loadable_target_origin=target),
                repository_name="__repository__",
            ),
            job_name=job_name,
        )

    def start(
        self, job_name: str, run_config: dict[str, Any] | None = None, tags: dict[str, str] | None = None
    ):
        """Create a run of `job_name` as a launch through the UI would, and execute it here."""
        job = self.repository.get_reconstructable_job(job_name)
        job_def = job.get_definition()
        run = self.instance.create_run_for_job(
            job_def=job_def,
            run_config=run_config or {},
            tags={**job_def.run_tags, **(tags or {})},
            remote_job_origin=self.remote_origin(job_name),
            job_code_origin=job.get_python_origin(),
        )
        return self._execute(job, run)

    def run_queued(self, run: dg.DagsterRun) -> dg.DagsterRun:
        """Start a queued run (what the daemon's dequeuer does) and execute it here."""
        assert self.instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.QUEUED
        self.instance.report_dagster_event(
            DagsterEvent(event_type_value=DagsterEventType.RUN_STARTING.value, job_name=run.job_name),
            run_id=run.run_id,
        )
        job = self.repository.get_reconstructable_job(run.job_name)
        if run.asset_selection:
            job = job.get_subset(asset_selection=run.asset_selection)
        return self._execute(job, self.instance.get_run_by_id(run.run_id))

    def _execute(self, job, run: dg.DagsterRun) -> dg.DagsterRun:
        execute_run(job, run, self.instance)
        return self.instance.get_run_by_id(run.run_id)

    def tick(self, sensor_name: str, cursor: str | None = None) -> dg.SensorExecutionData:
        definitions = self.definitions
        sensor = definitions.resolve_sensor_def(sensor_name)
        context = dg.build_sensor_context(instance=self.instance, definitions=definitions, cursor=cursor)
        return sensor.evaluate_tick(context)

    def launch(self, request: dg.RunRequest, job_name: str | None = None) -> dg.DagsterRun:
        """Run what a sensor asked for, with its tags and run key (as the daemon does)."""
        return self.start(
            request.job_name or job_name,
            request.run_config,
            {**request.tags, "dagster/run_key": request.run_key},
        )

    def runs(self, **tags: str) -> list[dg.DagsterRun]:
        return list(self.instance.get_runs(filters=dg.RunsFilter(tags=tags)))

    def step_statuses(self, run: dg.DagsterRun) -> dict[str, str]:
        return {s.step_key: s.status.value for s in self.instance.get_run_step_stats(run.run_id)}

    def outputs(self, run: dg.DagsterRun) -> dict[str, dict[str, Any]]:
        """Each step's output metadata in `run`, by step (and output name when not `result`)."""
        found = {}
        for record in self.instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_OUTPUT):
            event = record.dagster_event
            name = event.step_output_data.output_name
            key = event.step_key if name == "result" else f"{event.step_key}.{name}"
            found[key] = {k: v.value for k, v in event.step_output_data.metadata.items()}
        return found

    def failure_messages(self, run: dg.DagsterRun) -> list[str]:
        return [
            str(record.dagster_event.event_specific_data.error.message)
            for record in self.instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_FAILURE)
        ]
