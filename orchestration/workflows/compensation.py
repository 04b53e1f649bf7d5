"""After a failure: compensation runs and on-failure notifications, from one run-failure sensor.

Dagster skips the ops downstream of a failure, so a rollback cannot happen inside the failed run. The
sensor `workflow_failures` (a `run_failure_sensor` over the workflow jobs that declare compensations
or `on_failure`) reacts to every failed run of them — a first run or a resumed one:

- it sends the workflow's `on_failure` notifications through the notification channels (each
  delivery recorded by the channels module) and appends `workflow.failure_notified` to the audit log.
  Once per (execution, failed run, notification): the sensor's cursor moves only after its tick, so
  a crash after sending would otherwise send again on the next tick. Each delivery is claimed in
  the platform store under the key `workflow-failure:{execution}:{run}:{index}:{channel}` before it
  is sent (`send(dedupe_key=…)`): a later tick finds it and sends nothing; a claim a crash left
  `sending` is sent again with the same message id and counted in the record's `resends`
  (at-least-once with a dedupe key the receiver sees — see `resources/notifications/delivery.py`);
- when steps with `compensate` completed in the execution — in this run or in an earlier run of it
  (the steps of such workflows are checkpointed, numbered in the order they completed) — it asks for
  one run of the workflow's compensation job `<workflow>_compensate` with
  `run_key = compensate:{execution_id}` (one per execution, however often it fails) and the tags
  `junction/execution_id`, `junction/compensating=true` and `junction/failed_run`.

The compensation job has one op, `compensate`, with one output per compensation step: it runs the
planned compensations one after the other, in the reverse order of their steps' completion (a
step's own compensations in the order written), each seeing the context its step saw plus the
step's output, and records each as an output with its metadata, so the UI shows what was undone.
A compensation that fails does not stop the others; the op fails at the end, naming them.
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import dagster as dg

from orchestration.workflows import parking
from orchestration.workflows.context import (
    EXECUTION_ID_TAG,
    KIND_TAG,
    WORKFLOW_TAG,
    StepContext,
    mask_secrets,
)
from orchestration.workflows.spec import WorkflowSpec
from orchestration.workflows.steps import STEP_TYPES

COMPENSATING_TAG = "junction/compensating"
FAILED_RUN_TAG = "junction/failed_run"
# On the failed run, so its row in the Runs page says what became of it: `requested` (by the
# sensor), then `running`, `done` or `failed`, with the compensating run in `junction/compensated_by`.
COMPENSATION_TAG = "junction/compensation"
COMPENSATED_BY_TAG = "junction/compensated_by"
FAILURE_SENSOR_NAME = "workflow_failures"
COMPENSATE_OP = "compensate"
SENSOR_ACTOR = f"sensor:{FAILURE_SENSOR_NAME}"


def compensation_job_name(workflow: str) -> str:
    return f"{workflow}_compensate"


def has_compensations(spec: WorkflowSpec) -> bool:
    return any(step.compensate for step in spec.steps)


@dataclass(frozen=True)
class PlannedCompensation:
    step_id: str  # the step it undoes
    compensation: Any  # a CompensationStep model


def compensation_plan(spec: WorkflowSpec, checkpoint: parking.Checkpoint | None) -> list[PlannedCompensation]:
    """The compensations of the steps that completed successfully, last completed first."""
    if checkpoint is None:
        return []
    steps = {step.id: step for step in spec.steps}
    completed = [
        (entry.get("completed", 0), step_id)
        for step_id, entry in checkpoint.step_outputs.items()
        if step_id in steps and entry.get("state") and entry["state"].get("status") == "succeeded"
    ]
    return [
        PlannedCompensation(step_id, compensation)
        for _, step_id in sorted(completed, reverse=True)
        for compensation in steps[step_id].compensate
    ]


def _metadata_value(value: Any) -> dg.MetadataValue:
    return dg.MetadataValue.json(json.loads(json.dumps(value, default=str)))


def build_compensation_job(spec: WorkflowSpec) -> dg.JobDefinition:
    """`<workflow>_compensate`: one op running the planned compensations (see the module doc)."""
    from orchestration.workflows.factory import op_definition_name, run_with_timeout

    compensations = {c.id: (step, c) for step in spec.steps for c in step.compensate}
    resource_keys = {key for _, c in compensations.values() for key in STEP_TYPES[c.type].resource_keys}

    def compute(context: dg.OpExecutionContext, _inputs: Any) -> Iterator[dg.Output]:
        execution_id = context.op_config["execution_id"]
        failed_run_id = context.run.tags.get(FAILED_RUN_TAG)

        def tell_failed_run(state: str) -> None:
            if failed_run_id:
                context.instance.add_run_tags(
                    failed_run_id, {COMPENSATION_TAG: state, COMPENSATED_BY_TAG: context.run_id}
                )

        tell_failed_run("running")
        try:
            yield from compensate_all(context, execution_id)
        except BaseException:
            tell_failed_run("failed")
            raise
        tell_failed_run("done")

    def compensate_all(context: dg.OpExecutionContext, execution_id: str) -> Iterator[dg.Output]:
        import os

        checkpoint = parking.get_checkpoint(execution_id)
        if checkpoint is None:
            raise dg.Failure(description=f"execution {execution_id} has no checkpoint to compensate from")
        states = {
            step_id: entry["state"]
            for step_id, entry in checkpoint.step_outputs.items()
            if entry.get("state") is not None
        }
        failed: list[str] = []
        for compensation_id in context.op_config["plan"]:
            step, compensation = compensations[compensation_id]
            step_type = STEP_TYPES[compensation.type]
            secrets = [os.environ.get(name, "") for name in compensation.config.secret_env_names()]
            step_context = StepContext(
                step_id=compensation.id,
                workflow=spec.name,
                inputs=checkpoint.inputs,
                steps=states,
                execution_id=execution_id,
                run_id=context.run_id,
                env_names=tuple(spec.env),
                resources={key: getattr(context.resources, key) for key in step_type.resource_keys},
                log=context.log,
                run_tags=dict(context.run.tags),
                op_context=context,
            )
            context.log.info(f"compensating step {step.id!r} with {compensation.id!r} ({compensation.type})")
            try:
                output = run_with_timeout(
                    lambda c=compensation, s=step_context, t=step_type: t.run(c.config, s),
                    compensation.timeout_s,
                    compensation.id,
                )
                status = "succeeded"
            except Exception as exc:  # noqa: BLE001 - recorded; the other compensations still run
                context.log.error(f"compensation {compensation.id!r} failed: {type(exc).__name__}: {exc}")
                output = {"error": {"type": type(exc).__name__, "message": str(exc)}}
                status = "failed"
                failed.append(compensation.id)
            yield dg.Output(
                output,
                output_name=compensation.id,
                metadata={
                    "compensates": step.id,
                    "status": status,
                    "output": _metadata_value(mask_secrets(output, secrets)),
                },
            )
        if failed:
            raise dg.Failure(description=f"compensation(s) failed: {', '.join(failed)}")

    op = dg.OpDefinition(
        compute_fn=compute,
        name=op_definition_name(compensation_job_name(spec.name), COMPENSATE_OP),
        description=f"Undo the completed steps of a failed {spec.name} execution, last completed first.",
        config_schema={
            "execution_id": dg.Field(str, description="The failed execution."),
            "plan": dg.Field([str], description="Compensation step ids, in the order they run."),
        },
        outs={
            c.id: dg.Out(is_required=False, description=f"compensates {step.id}: {c.description or c.type}")
            for step, c in compensations.values()
        },
        required_resource_keys=resource_keys,
    )
    resources: dict[str, Any] = {}
    if "notifications" in resource_keys:
        from resources.notifications import NotificationsResource

        resources["notifications"] = NotificationsResource()
    return dg.GraphDefinition(
        name=compensation_job_name(spec.name),
        description=f"Compensation of the {spec.name} workflow: launched by the {FAILURE_SENSOR_NAME} sensor.",
        node_defs=[op],
        dependencies={dg.NodeInvocation(op.name, alias=COMPENSATE_OP): {}},
    ).to_job(
        resource_defs=resources,
        executor_def=dg.in_process_executor,
        tags={WORKFLOW_TAG: spec.name, KIND_TAG: "workflow_compensation"},
    )


def step_failures(instance: dg.DagsterInstance, run_id: str) -> dict[str, str]:
    """The failed steps of a run and why (the step's own message, not the run's summary)."""
    failures: dict[str, str] = {}
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE):
        event = record.dagster_event
        data = event.event_specific_data
        user = getattr(data, "user_failure_data", None)
        error = getattr(data, "error", None)
        reason = (user.description if user and user.description else None) or (error.message if error else "")
        failures[event.step_key] = str(reason).strip()
    return failures


def failure_notification_key(execution_id: str, run_id: str, index: int, channel: str) -> str:
    """The dedupe key of one on-failure notification (its place in `on_failure`: two may share a channel)."""
    return f"workflow-failure:{execution_id}:{run_id}:{index}:{channel}"


def notify_failure(
    spec: WorkflowSpec, run: dg.DagsterRun, message: str, steps: list[str], log: Any
) -> list[Any]:
    """Send the workflow's on-failure notifications; a channel that fails is logged (and its delivery
    recorded as failed), not raised: it must not hold back the compensation."""
    import os

    from orchestration.kernel import audit
    from resources.notifications import NotificationError, NotificationsResource

    execution_id = run.tags.get(EXECUTION_ID_TAG, run.run_id)
    variables = {
        "inputs": dict(run.run_config or {}),
        "execution": {"id": execution_id, "workflow": spec.name},
        "run": {"id": run.run_id},
        "env": {name: os.environ.get(name, "") for name in spec.env},
        "failure": {"run_id": run.run_id, "message": message, "steps": steps},
    }
    notifications = NotificationsResource()
    records = []
    for index, notification in enumerate(spec.on_failure):
        try:
            record = notifications.send(
                notification.channel,
                notification.subject,
                notification.body,
                variables,
                html_template=notification.html,
                recipients=notification.recipients,
                metadata={"workflow": spec.name, "execution_id": execution_id, "failed_run": run.run_id},
                origin=f"workflow:{spec.name}/on_failure",
                dedupe_key=failure_notification_key(execution_id, run.run_id, index, notification.channel),
            )
        except NotificationError as exc:
            log.error(f"on-failure notification to {notification.channel!r} failed: {exc}")
            record = exc.record
        except Exception as exc:  # noqa: BLE001 - a template error: logged, the others still go out
            log.error(f"on-failure notification to {notification.channel!r} not sent: {exc}")
            continue
        if record is not None and record.repeated:
            log.info(
                f"on-failure notification to {notification.channel!r} already handled for run "
                f"{run.run_id} (delivery {record.id}: {record.status}); not sent again"
            )
            continue
        records.append(record)
    if records:
        audit.append(
            "workflow.failure_notified",
            actor=SENSOR_ACTOR,
            target=f"workflow:{spec.name}",
            origin=run.run_id,
            details={
                "execution_id": execution_id,
                "deliveries": [
                    {"channel": r.channel, "id": r.id, "status": r.status, "resends": r.resends}
                    for r in records
                    if r
                ],
            },
        )
    return records


def compensation_request(spec: WorkflowSpec, run: dg.DagsterRun) -> dg.RunRequest | None:
    execution_id = run.tags.get(EXECUTION_ID_TAG, run.run_id)
    plan = compensation_plan(spec, parking.get_checkpoint(execution_id))
    if not plan:
        return None
    return dg.RunRequest(
        run_key=f"compensate:{execution_id}",
        job_name=compensation_job_name(spec.name),
        run_config={
            "ops": {
                COMPENSATE_OP: {
                    "config": {"execution_id": execution_id, "plan": [p.compensation.id for p in plan]}
                }
            }
        },
        tags={EXECUTION_ID_TAG: execution_id, COMPENSATING_TAG: "true", FAILED_RUN_TAG: run.run_id},
    )


def failure_sensor(
    specs: dict[str, WorkflowSpec], jobs: list[dg.JobDefinition], compensation_jobs: list[dg.JobDefinition]
) -> dg.SensorDefinition:
    """The run-failure sensor of the workflows that declare compensations or on-failure notifications."""

    @dg.run_failure_sensor(
        name=FAILURE_SENSOR_NAME,
        monitored_jobs=jobs,
        request_jobs=compensation_jobs or None,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="On a failed workflow run: its on-failure notifications and a compensation run of "
        "the completed steps (once per execution).",
    )
    def workflow_failures(context: dg.RunFailureSensorContext):
        run = context.dagster_run
        spec = specs.get(run.job_name)
        if spec is None:
            return dg.SkipReason(f"{run.job_name} is not a workflow")
        failures = step_failures(context.instance, run.run_id)
        steps = list(failures)
        message = "; ".join(f"{step}: {reason}" for step, reason in failures.items()) or (
            context.failure_event.message or "run failed"
        )
        if spec.on_failure:
            notify_failure(spec, run, message, steps, context.log)
        request = compensation_request(spec, run) if has_compensations(spec) else None
        if request is None:
            return dg.SkipReason(f"run {run.run_id} of {spec.name}: nothing to compensate")
        from orchestration.kernel import audit

        context.instance.add_run_tags(run.run_id, {COMPENSATION_TAG: "requested"})
        audit.append(
            "workflow.compensation_requested",
            actor=SENSOR_ACTOR,
            target=f"workflow:{spec.name}",
            origin=run.run_id,
            details={"execution_id": request.tags[EXECUTION_ID_TAG], "run_key": request.run_key},
        )
        return request

    return workflow_failures
