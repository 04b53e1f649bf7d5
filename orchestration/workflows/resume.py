"""The resume sensor: launches the next run of every parked execution whose time has come.

Due means the checkpoint is `waiting`, its `wake_at` has passed (a Delay's time, an Approval's
decision or timeout, a Sync step's timeout) or the run it waits on (a Sync step's child run) has
finished, and the run that
parked it has finished (a run still busy with other branches
must not race its successor). The sensor asks for a fresh run of the same job with the execution's
inputs, tagged with the execution id and where it resumes from, under the run key
`resume:{execution_id}:{step_id}`: Dagster launches at most one run per run key of a sensor, so
however many ticks see the execution due before the resumed run marks it running, it resumes once.

Only this sensor launches resumed runs; the gateway and the CLI only record decisions.
"""

from __future__ import annotations

import dagster as dg

from orchestration.workflows import parking
from orchestration.workflows.context import EXECUTION_ID_TAG
from sensors.event_triggers import COUNT_TAG, FIRST_ID_TAG, LAST_ID_TAG, STREAM_TAG

RESUME_SENSOR_NAME = "workflow_resume"
EVENT_TAGS = (STREAM_TAG, FIRST_ID_TAG, LAST_ID_TAG, COUNT_TAG)
# How often the daemon evaluates the sensor: the resolution of delays and the latency of approvals.
RESUME_INTERVAL_S = 15


def resume_requests(instance: dg.DagsterInstance, workflows: set[str]) -> list[dg.RunRequest]:
    requests = []
    now = parking.utc_now()
    for checkpoint in parking.due_checkpoints(now, workflows):
        parked_run = instance.get_run_by_id(checkpoint.parked_run_id) if checkpoint.parked_run_id else None
        if parked_run is not None and not parked_run.is_finished:
            continue
        # A stream-triggered execution's resumed runs read the same event (`trigger.event`).
        event_tags = {
            key: value for key, value in (parked_run.tags if parked_run else {}).items() if key in EVENT_TAGS
        }
        if checkpoint.waiting_on_run_id is not None:
            # A Sync step's child run: resume once it has finished (a run deleted meanwhile counts
            # as finished; the step then reports it missing), or once the step's timeout (`wake_at`)
            # has passed, so the step can fail and terminate the child.
            child = instance.get_run_by_id(checkpoint.waiting_on_run_id)
            timed_out = checkpoint.wake_at is not None and checkpoint.wake_at <= now
            if child is not None and not child.is_finished and not timed_out:
                continue
        requests.append(
            dg.RunRequest(
                run_key=checkpoint.resume_run_key,
                job_name=checkpoint.workflow,
                run_config=checkpoint.inputs,
                tags={
                    **event_tags,
                    EXECUTION_ID_TAG: checkpoint.execution_id,
                    parking.RESUMED_FROM_TAG: checkpoint.parked_run_id or "",
                    parking.RESUMED_STEP_TAG: checkpoint.parked_step or "",
                },
            )
        )
    return requests


def resume_sensor(jobs: list[dg.JobDefinition]) -> dg.SensorDefinition:
    """The sensor resuming the parked executions of `jobs` (the workflows with a parking step)."""
    workflows = {job.name for job in jobs}

    @dg.sensor(
        name=RESUME_SENSOR_NAME,
        jobs=jobs,
        minimum_interval_seconds=RESUME_INTERVAL_S,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Resumes parked workflow executions (delays due, approvals decided or timed out, "
        "sync child runs finished).",
    )
    def workflow_resume(context: dg.SensorEvaluationContext):
        requests = resume_requests(context.instance, workflows)
        if not requests:
            return dg.SkipReason("no parked workflow execution is due")
        return requests

    return workflow_resume
