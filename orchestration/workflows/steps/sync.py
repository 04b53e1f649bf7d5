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

`timeout` (a duration: 90m, 12h, 2d) bounds the child run, counted from its creation. The parked
checkpoint's `wake_at` is that deadline, so the resume sensor resumes the execution when the deadline
passes even though the child is still queued or running — no worker waits for it. The resumed step
then fails naming the child run, its status and the timeout, and terminates the child through
Dagster (`run_coordinator.cancel_run`, what the UI's Terminate does: a queued run leaves the queue, a
started one is interrupted by its run launcher) unless `cancel_child_on_timeout: false`.

The child is created from the parent run's code location: the parent must have been launched through
Dagster (UI, gateway, schedule, sensor). A run executed in-process has no code location to launch
from, and the step says so.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import Field, model_validator

from orchestration.errors import JunctionError
from orchestration.kernel.times import DurationText
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
    timeout: DurationText | None = Field(
        default=None,
        description="How long the child run may take from its launch (90m, 12h, 2d); then the step fails.",
    )
    cancel_child_on_timeout: bool = Field(
        default=True, description="Terminate the child run when the timeout passes (as the UI's Terminate)."
    )

    not_templates = frozenset({"pipeline", "assets", "timeout"})

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


def child_deadline(config: SyncConfig, instance: Any, child: Any) -> datetime | None:
    """When the child run's time is up: its creation plus `timeout` (the same for a retried or
    resumed step, which finds the same child)."""
    if config.timeout is None:
        return None
    from orchestration.kernel.times import parse_duration

    record = instance.get_run_record_by_id(child.run_id)
    created = record.create_timestamp
    created = created.replace(tzinfo=UTC) if created.tzinfo is None else created
    return created + parse_duration(config.timeout)


def terminate_child(instance: Any, child: Any) -> str:
    """Terminate the child as the UI's Terminate does; returns what happened, for the step's error."""
    from dagster._core.storage.dagster_run import CANCELABLE_RUN_STATUSES

    # QUEUED or STARTED, as the UI allows (a child never queued was queued by `sync` before this).
    if child.status not in CANCELABLE_RUN_STATUSES:
        return f"did not terminate it (Dagster cannot terminate a {child.status.value} run)"
    try:
        terminated = instance.run_coordinator.cancel_run(child.run_id)
    except Exception as exc:  # noqa: BLE001 - the step fails anyway; say why the child may still run
        return f"could not terminate it: {type(exc).__name__}: {exc}"
    return "terminated it" if terminated else "asked to terminate it, which its run launcher refused"


def timed_out(config: SyncConfig, instance: Any, child: Any) -> JunctionError:
    outcome = (
        terminate_child(instance, child)
        if config.cancel_child_on_timeout
        else "left it running (cancel_child_on_timeout: false)"
    )
    return JunctionError(
        f"child run {child.run_id} ({child.job_name}) was still {child.status.value} when the step's "
        f"timeout of {config.timeout} passed; {outcome}"
    )


def sync(config: SyncConfig, context: StepContext) -> dict[str, Any]:
    import dagster as dg

    from orchestration.workflows import parking

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
        deadline = child_deadline(config, instance, child)
        if deadline is not None and deadline <= parking.utc_now():
            raise timed_out(config, instance, child)
        # The deadline is the checkpoint's wake-up time: the resume sensor resumes at it.
        raise parking.ParkStep(
            f"waiting for child run {child.run_id} ({child.job_name})"
            + (f" until {deadline.isoformat()}" if deadline else ""),
            deadline,
            waiting_on_run_id=child.run_id,
            summary=f"sync run {parking.short_id(child.run_id)} ({child.job_name})"
            + (f", until {parking.moment_text(deadline)}" if deadline else ""),
            guidance=(
                f"resumes by itself once run {child.run_id} ({child.job_name}) has finished"
                + (f", or fails at {parking.moment_text(deadline)} if it has not" if deadline else ""),
                f"the child run in the UI: /runs/{child.run_id}",
            ),
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
