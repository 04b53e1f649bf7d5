"""Sync: materialize a pipeline's assets (or an asset selection) in a child run, and expose its result.

The step launches the child run through the instance's run queue (the daemon starts it within the
queue's limits), tagged `junction/execution_id`, `junction/parent_run` and `junction/sync_step`, and
then PARKS the workflow on that run (`ParkStep(waiting_on_run_id=…)`): waiting holds no run slot, so a
full queue cannot deadlock on parents waiting for their children. The resume sensor starts the next
run of the execution once the child has finished; there the step runs again, finds its child (by its
tags in Dagster's run storage, so a retried or resumed step never launches a second one) and reads
the result from the child's materialization metadata:

    steps.<id>.output.status    SUCCESS, FAILURE or CANCELED
    steps.<id>.output.read / loaded / quarantined / filtered   row counts summed over the assets
    steps.<id>.output.score     the quality score (share of checks passed; the lowest over the assets)
    steps.<id>.output.score_rows  the share of rows passing every check
    steps.<id>.output.assets    per asset key, the counts and scores it reported

A child run that did not succeed fails the step, naming the run (with `continue_on_failure` the error
becomes the step's output).

The child is created from the parent run's code location: the parent must have been launched through
Dagster (UI, gateway, schedule, sensor). A run executed in-process has no code location to launch
from, and the step says so.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from orchestration.errors import JunctionError
from orchestration.workflows.context import EXECUTION_ID_TAG, StepContext
from orchestration.workflows.steps.base import StepConfig, StepType

PARENT_RUN_TAG = "junction/parent_run"
SYNC_STEP_TAG = "junction/sync_step"
# Child materialization metadata -> the step's output fields (the ETL factory's names).
COUNT_FIELDS = {
    "rows_read": "read",
    "rows_loaded": "loaded",
    "rows_quarantined": "quarantined",
    "rows_filtered": "filtered",
}
SCORE_FIELDS = {"quality_score_checks": "score", "quality_score_rows": "score_rows"}


class SyncConfig(StepConfig):
    pipeline: str | None = Field(
        default=None, description="A pipeline spec's name: its job (<name>_pipeline) is launched."
    )
    assets: list[str] | None = Field(
        default=None, min_length=1, description="Asset keys to materialize ('a/b' for a multi-part key)."
    )
    tags: dict[str, str] = Field(default_factory=dict, description="Extra tags of the child run (templates).")

    not_templates = frozenset({"pipeline", "assets"})

    @model_validator(mode="after")
    def _one_target(self) -> SyncConfig:
        if (self.pipeline is None) == (self.assets is None):
            raise ValueError("give exactly one of pipeline and assets")
        return self


def _child_of(instance: Any, execution_id: str, step_id: str) -> Any:
    import dagster as dg

    runs = instance.get_runs(
        filters=dg.RunsFilter(tags={EXECUTION_ID_TAG: execution_id, SYNC_STEP_TAG: step_id}), limit=1
    )
    return runs[0] if runs else None


def _target_job(config: SyncConfig, repository: Any) -> tuple[Any, set | None]:
    import dagster as dg

    if config.pipeline is not None:
        from assets.etl.factory import pipeline_job_name

        job_name = pipeline_job_name(config.pipeline)
        if not repository.has_job(job_name):
            raise JunctionError(
                f"pipeline {config.pipeline!r}: no job {job_name!r} in this code location "
                "(is there a pipeline spec of that name?)"
            )
        return repository.get_job(job_name), None
    keys = [dg.AssetKey.from_user_string(key) for key in config.assets or []]
    known = repository.asset_graph.get_all_asset_keys()
    missing = [key.to_user_string() for key in keys if key not in known]
    if missing:
        raise JunctionError(f"assets: no asset {', '.join(missing)} in this code location")
    return repository.get_implicit_job_def_for_assets(keys), set(keys)


def launch_child(config: SyncConfig, context: StepContext) -> Any:
    """Create the child run from the parent's code location and submit it to the run queue."""
    from dagster._core.remote_origin import RemoteJobOrigin
    from dagster._core.run_coordinator import QueuedRunCoordinator

    op_context = context.op_context
    instance = op_context.instance
    parent = instance.get_run_by_id(context.run_id)
    if parent is None or parent.remote_job_origin is None or parent.job_code_origin is None:
        raise JunctionError(
            "a Sync step launches its child run through the run queue, from the code location of its "
            "own run: launch the workflow through Dagster (UI, gateway, schedule, sensor), not in-process"
        )
    if not isinstance(instance.run_coordinator, QueuedRunCoordinator):
        raise JunctionError("a Sync step needs the instance's run queue (QueuedRunCoordinator)")
    job_def, selection = _target_job(config, op_context.repository_def)
    tags = {
        **job_def.run_tags,
        **context.render(config.tags),
        EXECUTION_ID_TAG: context.execution_id,
        PARENT_RUN_TAG: context.run_id,
        SYNC_STEP_TAG: context.step_id,
    }
    child = instance.create_run_for_job(
        job_def=job_def,
        tags=tags,
        asset_selection=selection,
        remote_job_origin=RemoteJobOrigin(
            repository_origin=parent.remote_job_origin.repository_origin, job_name=job_def.name
        ),
        job_code_origin=parent.job_code_origin._replace(job_name=job_def.name),
    )
    # The queued run coordinator only enqueues; the daemon launches within the queue's limits.
    return instance.submit_run(child.run_id, workspace=None)


def child_result(instance: Any, run: Any) -> dict[str, Any]:
    """The child run's status, counts and scores from its materialization metadata."""
    import dagster as dg

    assets: dict[str, dict[str, Any]] = {}
    for record in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
        materialization = record.dagster_event.event_specific_data.materialization
        values = {
            name: materialization.metadata[key].value
            for key, name in {**COUNT_FIELDS, **SCORE_FIELDS}.items()
            if key in materialization.metadata
        }
        assets[materialization.asset_key.to_user_string()] = values
    result: dict[str, Any] = {"run_id": run.run_id, "job": run.job_name, "status": run.status.value}
    for name in COUNT_FIELDS.values():
        counts = [values[name] for values in assets.values() if name in values]
        result[name] = sum(counts) if counts else None
    for name in SCORE_FIELDS.values():
        scores = [values[name] for values in assets.values() if name in values]
        result[name] = min(scores) if scores else None
    result["assets"] = assets
    return result


def sync(config: SyncConfig, context: StepContext) -> dict[str, Any]:
    import dagster as dg

    from orchestration.workflows.parking import ParkStep

    instance = context.op_context.instance
    child = _child_of(instance, context.execution_id, context.step_id)
    if child is None:
        child = launch_child(config, context)
        if context.log is not None:
            context.log.info(f"launched child run {child.run_id} ({child.job_name}) through the run queue")
    elif child.status == dg.DagsterRunStatus.NOT_STARTED:
        # Created but never queued (the worker died in between): queue it now rather than wait forever.
        child = instance.submit_run(child.run_id, workspace=None)
    if not child.is_finished:
        raise ParkStep(
            f"waiting for child run {child.run_id} ({child.job_name})", None, waiting_on_run_id=child.run_id
        )
    result = child_result(instance, child)
    if result["status"] != "SUCCESS":
        raise JunctionError(f"child run {child.run_id} ({child.job_name}) ended {result['status']}")
    return result


STEP_TYPE = StepType(
    name="sync",
    description="Materialize a pipeline's assets in a child run (the workflow parks meanwhile); its "
    "counts and quality score become the output.",
    config_model=SyncConfig,
    run=sync,
    parks=True,
)
