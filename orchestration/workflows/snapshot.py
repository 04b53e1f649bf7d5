"""The context snapshot attached at the end of every workflow run (secrets masked).

Dagster has no "end of run" hook inside the run, but it tears a run's resources down once all of its
steps are done — succeeded, failed, skipped or parked alike. Every workflow job has the resource
`workflow_context`: each op records its step's state in it as it completes, and its teardown reports
one engine event, "workflow context snapshot", whose metadata holds the inputs, the execution and
run ids, and every step state of the run (restored ones included). It shows in the run's event log in
the UI (and in `instance.all_logs`). Masking: keys that look secret (`mask_secrets`) and the values of
every secret environment variable a step of the run read.
"""

import json
from collections.abc import Iterator
from typing import Any

import dagster as dg

from orchestration.workflows.context import EXECUTION_ID_TAG, mask_secrets

SNAPSHOT_RESOURCE_KEY = "workflow_context"
SNAPSHOT_MESSAGE = "workflow context snapshot"


class ContextSnapshot:
    """What the run's steps recorded, in the order they completed."""

    def __init__(self) -> None:
        self.steps: dict[str, Any] = {}
        self.secrets: set[str] = set()
        self.inputs: dict[str, Any] | None = None  # as the ops received them: defaults applied

    def record(self, step_id: str, state: Any, secrets: list[str]) -> None:
        self.steps[step_id] = state
        self.secrets.update(secret for secret in secrets if secret)

    def as_metadata(self, run: dg.DagsterRun) -> dict[str, Any]:
        snapshot = {
            "inputs": self.inputs if self.inputs is not None else dict(run.run_config or {}),
            "execution": {"id": run.tags.get(EXECUTION_ID_TAG, run.run_id), "workflow": run.job_name},
            "run": {"id": run.run_id},
            "steps": self.steps,
        }
        masked = mask_secrets(json.loads(json.dumps(snapshot, default=str)), sorted(self.secrets))
        return {"context": dg.MetadataValue.json(masked), "steps_recorded": len(self.steps)}


@dg.resource(description="Collects the workflow context; attaches it to the run when the run ends.")
def context_snapshot_resource(init_context: dg.InitResourceContext) -> Iterator[ContextSnapshot]:
    from dagster._core.events import EngineEventData

    snapshot = ContextSnapshot()
    try:
        yield snapshot
    finally:
        run = init_context.dagster_run
        if run is not None and init_context.instance is not None:
            # Read back: the execution id may have been tagged by the first op, after the run started.
            stored = init_context.instance.get_run_by_id(run.run_id) or run
            init_context.instance.report_engine_event(
                SNAPSHOT_MESSAGE, stored, EngineEventData(metadata=snapshot.as_metadata(stored))
            )
