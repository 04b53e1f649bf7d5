"""A parkable workflow's life on a real Dagster instance and a real platform store: start a run,
evaluate the resume sensor (`build_sensor_context`), launch what it asks for as the daemon would."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import dagster as dg

from orchestration.workflows import parking
from orchestration.workflows.factory import build_job
from orchestration.workflows.resume import RESUME_SENSOR_NAME, resume_sensor
from orchestration.workflows.spec import parse_workflow


def counted_step(step_id: str, depends_on: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": step_id,
        "type": "custom_script",
        "depends_on": depends_on or [],
        "config": {"callable": "workflow_scripts:counted", "arguments": {"label": step_id}},
        **extra,
    }


@dataclass
class Parking:
    instance: dg.DagsterInstance
    specs: list[dict[str, Any]]
    jobs: dict[str, dg.JobDefinition] = field(init=False)
    definitions: dg.Definitions = field(init=False)

    def __post_init__(self) -> None:
        self.jobs = {spec["name"]: build_job(parse_workflow(spec, "test.yaml")) for spec in self.specs}
        self.definitions = dg.Definitions(
            jobs=list(self.jobs.values()), sensors=[resume_sensor(list(self.jobs.values()))]
        )

    def start(
        self, name: str, tags: dict[str, str] | None = None, **inputs: Any
    ) -> dg.ExecuteInProcessResult:
        return self.jobs[name].execute_in_process(run_config=inputs, instance=self.instance, tags=tags)

    def tick(self) -> list[dg.RunRequest]:
        """One evaluation of the resume sensor."""
        sensor = self.definitions.resolve_sensor_def(RESUME_SENSOR_NAME)
        context = dg.build_sensor_context(instance=self.instance, definitions=self.definitions)
        return list(sensor.evaluate_tick(context).run_requests or [])

    def launch(self, request: dg.RunRequest) -> dg.ExecuteInProcessResult:
        """Run what the sensor asked for, with its tags (the daemon adds the run key as a tag)."""
        return self.jobs[request.job_name].execute_in_process(
            run_config=request.run_config,
            instance=self.instance,
            tags={**request.tags, "dagster/run_key": request.run_key},
        )

    def launch_allowing_failure(self, request: dg.RunRequest) -> dg.ExecuteInProcessResult:
        return self.jobs[request.job_name].execute_in_process(
            run_config=request.run_config,
            instance=self.instance,
            tags={**request.tags, "dagster/run_key": request.run_key},
            raise_on_error=False,
        )

    def run_tags(self, result: dg.ExecuteInProcessResult) -> dict[str, str]:
        return self.instance.get_run_by_id(result.run_id).tags

    def step_statuses(self, result: dg.ExecuteInProcessResult) -> dict[str, str]:
        return {s.step_key: s.status.value for s in self.instance.get_run_step_stats(result.run_id)}

    def output_metadata(self, result: dg.ExecuteInProcessResult, step_id: str) -> dict[str, Any]:
        for event in result.all_node_events:
            if event.step_key == step_id and event.is_successful_output:
                return {key: value.value for key, value in event.step_output_data.metadata.items()}
        raise AssertionError(f"no output of {step_id}")

    def execution_runs(self, execution_id: str) -> list[dg.DagsterRun]:
        return list(
            self.instance.get_runs(filters=dg.RunsFilter(tags={"junction/execution_id": execution_id}))
        )


class Clock:
    """`parking.utc_now`, moved forward by the test (the step and the sensor share it)."""

    def __init__(self, monkeypatch) -> None:
        self.offset = None
        self._real = parking.utc_now
        monkeypatch.setattr(parking, "utc_now", self.now)

    def now(self) -> datetime:
        moment = self._real()
        return moment + self.offset if self.offset is not None else moment

    def advance(self, **delta: float) -> None:
        from datetime import timedelta

        self.offset = (self.offset or timedelta()) + timedelta(**delta)
