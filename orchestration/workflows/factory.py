"""The workflow job factory: each `WorkflowSpec` becomes a Dagster job (and schedules for its crons).

Shape: one op per step, named by the step id (its definition by `<workflow>__<step>`, unique in the
code location) and described by its description; one op input per
`depends_on` entry, named after the upstream step, wired to that step's output (`result`, or a
conditional's `then` / `otherwise`). Dagster skips an op when an input's upstream output was not
yielded, so a conditional's branch not taken, and everything after it, shows as skipped.

Inputs: the job's run config *is* the workflow's inputs (a `ConfigMapping` whose schema is built from
the spec: typed fields, defaults, descriptions — what the launchpad shows); the mapping hands the
same values to every op.

Data flow: each op returns the states of its upstream steps plus its own (`{step_id: {"output",
"status"}}`), so a step sees every ancestor's output, not only its direct parents'. Its own output is
also recorded as output metadata (secrets masked), visible in the UI.

`when`: the op evaluates the condition first; when false it yields nothing (logging why), so the step
itself finishes without an output and Dagster skips its downstream steps. Dagster can only skip an
op whose input is missing, so a step with a false `when` shows as succeeded-without-output, and its
dependants as skipped.

Context snapshot (`snapshot.py`): each op records its step's state in the run's `workflow_context`
resource, whose teardown attaches the whole context (secrets masked) to the run as one engine event.

Failures: the step's `retry` becomes the op's `RetryPolicy`; `timeout_s` is enforced here (Dagster
has no per-op timeout) by running the step in a daemon thread and failing the op when the time is
up (a Python thread cannot be killed; the abandoned thread ends with its own timeouts or the
process). `continue_on_failure`: once Dagster's retries are used up, the error becomes the step's
output (`{error: {type, message}}`, status `failed`), the run continues, and the run is tagged
`junction/failed_steps`.

What a step hands back beyond its output — Dagster events such as the asset materializations a
Pipes program reported, and extra output metadata — the op yields before its output. A run launched
by a stream trigger (`triggers.py`) reads its event once and offers it to every step as `trigger.event`.

Execution id: all runs of one execution share the `junction/execution_id` tag (resumed runs are
launched with it); a fresh run without it gets its own run id, set by its first op.

Checkpoints (`parking.py`): in a workflow with a parking step (Delay, Approval, Sync) or compensations, each op saves its state
in the execution's checkpoint when it completes, and first looks there: a step already completed in
an earlier run of the execution returns its saved state at once ("restored from checkpoint" in its
output metadata) instead of running again. A step raising `ParkStep` yields nothing, so the run ends
successfully, tagged `junction/state=waiting`, with the steps after it skipped.
"""

import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg

from orchestration.workflows import parking
from orchestration.workflows.context import (
    EXECUTION_ID_TAG,
    FAILED_STEPS_TAG,
    KIND_TAG,
    WORKFLOW_TAG,
    StepContext,
    mask_secrets,
)
from orchestration.workflows.snapshot import SNAPSHOT_RESOURCE_KEY, context_snapshot_resource
from orchestration.workflows.spec import WorkflowSpec, load_workflows, workflow_files
from orchestration.workflows.steps import DEFAULT_OUTPUT, STEP_TYPES
from orchestration.workflows.triggers import stream_triggers, trigger_of

CONFIG_TYPES: dict[str, Callable[[], Any]] = {
    "string": lambda: dg.String,
    "integer": lambda: dg.Int,
    "number": lambda: dg.Float,
    "boolean": lambda: dg.Bool,
    "object": lambda: dg.Permissive(),
    "array": lambda: [dg.Any],
    "date": lambda: dg.String,
}


class StepTimeout(Exception):
    """The step ran longer than its `timeout_s`."""


def inputs_config_schema(spec: WorkflowSpec) -> dict[str, dg.Field]:
    """The run config schema: one typed field per workflow input."""
    fields = {}
    for name, spec_input in spec.inputs.items():
        description = spec_input.description or None
        config_type = CONFIG_TYPES[spec_input.type]()
        if spec_input.required:
            fields[name] = dg.Field(config_type, is_required=True, description=description)
        else:
            default = spec_input.default
            default = default.isoformat() if hasattr(default, "isoformat") else default
            fields[name] = dg.Field(
                config_type, default_value=default, is_required=False, description=description
            )
    return fields


def retry_policy(step: Any) -> dg.RetryPolicy | None:
    if step.retry is None:
        return None
    return dg.RetryPolicy(
        max_retries=step.retry.max_retries,
        delay=step.retry.delay_s,
        backoff=dg.Backoff[step.retry.backoff.upper()] if step.retry.backoff else None,
        jitter=dg.Jitter[step.retry.jitter.upper()] if step.retry.jitter else None,
    )


def run_with_timeout(function: Callable[[], Any], timeout_s: float | None, step_id: str) -> Any:
    """`function()`, failing with `StepTimeout` after `timeout_s` (see the module doc)."""
    if timeout_s is None:
        return function()
    outcome: dict[str, Any] = {}
    finished = threading.Event()

    def target() -> None:
        try:
            outcome["value"] = function()
        except BaseException as exc:  # noqa: BLE001 - handed to the op's thread, which re-raises it
            outcome["error"] = exc
        finally:
            finished.set()

    threading.Thread(target=target, name=f"workflow-step-{step_id}", daemon=True).start()
    if not finished.wait(timeout_s):
        raise StepTimeout(f"step {step_id!r} did not finish within its timeout of {timeout_s:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def execution_id_of(context: dg.OpExecutionContext) -> str:
    """The run's execution id; the first op of a fresh run without one tags the run with its run id.

    `context.run` is the run as it was when the run started, so later ops read the stored tags
    before writing: one tag write per run, not per op."""
    execution_id = context.run.tags.get(EXECUTION_ID_TAG)
    if execution_id is not None:
        return execution_id
    stored = context.instance.get_run_by_id(context.run_id)
    if stored is not None and EXECUTION_ID_TAG in stored.tags:
        return stored.tags[EXECUTION_ID_TAG]
    context.instance.add_run_tags(context.run_id, {EXECUTION_ID_TAG: context.run_id})
    return context.run_id


def record_failed_step(context: dg.OpExecutionContext, step_id: str) -> None:
    """Add `step_id` to the run's `junction/failed_steps` tag (the in-process executor runs one step
    at a time, so reading and writing the tag does not race)."""
    run = context.instance.get_run_by_id(context.run_id)
    current = run.tags.get(FAILED_STEPS_TAG, "") if run else ""
    failed = [name for name in current.split(",") if name]
    if step_id not in failed:
        context.instance.add_run_tags(context.run_id, {FAILED_STEPS_TAG: ",".join([*failed, step_id])})


def metadata_value(value: Any) -> dg.MetadataValue:
    if isinstance(value, Mapping | list):
        return dg.MetadataValue.json(json.loads(json.dumps(value, default=str)))
    return dg.MetadataValue.text(json.dumps(value, default=str))


def is_parkable(spec: WorkflowSpec) -> bool:
    """Whether the workflow has a step that parks it (its steps are then checkpointed)."""
    return any(STEP_TYPES[step.type].parks for step in spec.steps)


def is_checkpointed(spec: WorkflowSpec) -> bool:
    """Whether the workflow's steps save their states: to resume after parking, and to compensate
    (a compensation sees its step's output, and runs in the reverse order of completion)."""
    from orchestration.workflows.compensation import has_compensations

    return is_parkable(spec) or has_compensations(spec)


def restore_from_checkpoint(
    context: dg.OpExecutionContext, step_id: str, execution_id: str
) -> dict[str, Any] | None:
    """The step's saved `{state, output_name}` when an earlier run of the execution completed it.

    In a resumed run, also tells the checkpoint the execution is running again (once it is, the
    resume sensor no longer asks for it)."""
    resumed_step = context.run.tags.get(parking.RESUMED_STEP_TAG)
    if resumed_step is not None and parking.begin_resumed_run(execution_id, resumed_step):
        parked_run_id = context.run.tags.get(parking.RESUMED_FROM_TAG)
        if parked_run_id:
            parking.mark_resumed(context.instance, parked_run_id, context.run_id)
    checkpoint = parking.get_checkpoint(execution_id)
    if checkpoint is None:
        return None
    return checkpoint.step_outputs.get(step_id)


def step_op(spec: WorkflowSpec, step: Any) -> dg.OpDefinition:
    step_type = STEP_TYPES[step.type]
    policy = retry_policy(step)
    max_retries = policy.max_retries if policy else 0
    secret_names = step.config.secret_env_names()
    upstream_ids = [dependency.partition(".")[0] for dependency in step.depends_on]
    single_output = step_type.outputs == (DEFAULT_OUTPUT,)
    checkpointed = is_checkpointed(spec)

    def compute(context: dg.OpExecutionContext, inputs: Mapping[str, Any]) -> Iterator[dg.Output]:
        import os

        from orchestration.kernel.conditions import evaluate, parse_condition

        states: dict[str, Any] = {}
        for upstream_id in upstream_ids:
            states.update(inputs[upstream_id])
        execution_id = execution_id_of(context)
        workflow_inputs = dict(context.op_config or {})
        secrets = [os.environ.get(name, "") for name in secret_names]
        snapshot = getattr(context.resources, SNAPSHOT_RESOURCE_KEY)
        snapshot.inputs = workflow_inputs
        if checkpointed:
            saved = restore_from_checkpoint(context, step.id, execution_id)
            if saved is not None:
                context.log.info(f"step {step.id!r} {parking.RESTORED}: not run again")
                if saved["output_name"] is None:
                    return
                state = saved["state"]
                snapshot.record(step.id, state, secrets)
                yield dg.Output(
                    {**states, step.id: state},
                    output_name=saved["output_name"],
                    metadata={
                        "output": metadata_value(mask_secrets(state["output"], secrets)),
                        "status": state["status"],
                        "restored": parking.RESTORED,
                    },
                )
                return

        def save(state: dict[str, Any] | None, output_name: str | None) -> None:
            if checkpointed:
                parking.save_step_state(execution_id, spec.name, workflow_inputs, step.id, state, output_name)

        deadline = time.monotonic() + step.timeout_s if step.timeout_s else None
        step_context = StepContext(
            step_id=step.id,
            workflow=spec.name,
            inputs=workflow_inputs,
            steps=states,
            execution_id=execution_id,
            run_id=context.run_id,
            env_names=tuple(spec.env),
            deadline=deadline,
            resources={key: getattr(context.resources, key) for key in step_type.resource_keys},
            log=context.log,
            run_tags=dict(context.run.tags),
            trigger=trigger_of(context),
            op_context=context,
        )
        if step.when is not None and not evaluate(parse_condition(step.when), step_context.variables()):
            context.log.info(
                f"step {step.id!r} not run: its `when` condition is false; steps after it are skipped"
            )
            save(None, None)
            return
        status = "succeeded"
        try:
            output = run_with_timeout(
                lambda: step_type.run(step.config, step_context), step.timeout_s, step.id
            )
        except parking.ParkStep as parked:
            parking.park(
                execution_id,
                spec.name,
                workflow_inputs,
                step.id,
                context.run_id,
                parked.wake_at,
                waiting_on_run_id=parked.waiting_on_run_id,
            )
            context.instance.add_run_tags(
                context.run_id,
                {
                    parking.STATE_TAG: parking.WAITING,
                    parking.PARKED_STEP_TAG: step.id,
                    parking.WAITING_ON_TAG: parked.summary,
                },
            )
            guidance = "".join(f"\n  {line}" for line in parked.guidance)
            context.log.info(
                f"step {step.id!r} parked the workflow: waiting on {parked.summary}. The run ends here "
                f"(Dagster shows it as Success, tagged junction/state=waiting) and the resume sensor "
                f"starts the next one.{guidance}"
            )
            snapshot.record(step.id, {"output": None, "status": "waiting", "reason": parked.reason}, secrets)
            yield dg.Output(
                None,
                output_name=parking.PARKED_OUTPUT,
                metadata={
                    "waiting_on": parked.summary,
                    "to continue": dg.MetadataValue.md("\n".join(f"- {line}" for line in parked.guidance))
                    if parked.guidance
                    else "the resume sensor continues the execution by itself",
                    **({"wakes_at": parked.wake_at.isoformat()} if parked.wake_at else {}),
                },
            )
            return
        except Exception as exc:
            if not step.continue_on_failure or context.retry_number < max_retries:
                error = {"type": type(exc).__name__, "message": str(exc)}
                snapshot.record(step.id, {"output": {"error": error}, "status": "failed"}, secrets)
                raise dg.Failure(description=f"{type(exc).__name__}: {exc}", allow_retries=True) from exc
            context.log.warning(f"step {step.id!r} failed; continuing (continue_on_failure): {exc}")
            output = {"error": {"type": type(exc).__name__, "message": str(exc)}}
            status = "failed"
            record_failed_step(context, step.id)
        output_name = DEFAULT_OUTPUT
        if status == "succeeded" and not single_output:
            output_name = output["branch"]
        elif status == "failed" and not single_output:
            # A branch that failed takes no branch: everything after it is skipped.
            context.log.warning(f"step {step.id!r} failed: no branch taken")
            save({"output": output, "status": status}, None)
            snapshot.record(step.id, {"output": output, "status": status}, secrets)
            return
        state = {"output": output, "status": status}
        save(state, output_name)
        snapshot.record(step.id, state, secrets)
        # What the step handed back for the UI (a Pipes program's materializations and metadata).
        yield from step_context.events
        yield dg.Output(
            {**states, step.id: state},
            output_name=output_name,
            metadata={
                **mask_secrets(step_context.output_metadata, secrets),
                "output": metadata_value(mask_secrets(output, secrets)),
                "status": status,
            },
        )

    return dg.OpDefinition(
        compute_fn=compute,
        name=op_definition_name(spec.name, step.id),
        description=step.description or step_type.description,
        ins={
            upstream_id: dg.In(description=f"states up to step {upstream_id}") for upstream_id in upstream_ids
        },
        outs={
            # Optional where the step may yield nothing: a branch, a `when` that can be false, a park.
            output: dg.Out(
                is_required=single_output and step.when is None and not step_type.parks,
                description=f"{step.type} {output}",
            )
            for output in step_type.outputs
        }
        | (
            {
                parking.PARKED_OUTPUT: dg.Out(
                    is_required=False,
                    description="yielded when the step parks: what it waits for and how to move it on",
                )
            }
            if step_type.parks
            else {}
        ),
        config_schema=dg.Permissive(),
        required_resource_keys={*step_type.resource_keys, SNAPSHOT_RESOURCE_KEY},
        tags={"junction/step_type": step.type},
        retry_policy=policy,
    )


def op_definition_name(workflow: str, node: str) -> str:
    """Op definitions must have names unique in the code location, and two workflows may both have a
    step `lookup`: the definition is named `<workflow>__<step>`, the node in the job (what the UI,
    the run config and the step keys show) by the step id alone."""
    return f"{workflow}__{node}"


def build_job(spec: WorkflowSpec, source: Path | None = None) -> dg.JobDefinition:
    ops = [step_op(spec, step) for step in spec.steps]
    dependencies = {
        dg.NodeInvocation(op_definition_name(spec.name, step.id), alias=step.id): {
            dependency.partition(".")[0]: dg.DependencyDefinition(
                dependency.partition(".")[0], dependency.partition(".")[2] or DEFAULT_OUTPUT
            )
            for dependency in step.depends_on
        }
        for step in spec.steps
    }
    step_ids = [step.id for step in spec.steps]
    config = dg.ConfigMapping(
        config_fn=lambda values: {"ops": {step_id: {"config": dict(values)} for step_id in step_ids}},
        config_schema=inputs_config_schema(spec),
    )
    resource_keys = {key for step in spec.steps for key in STEP_TYPES[step.type].resource_keys}
    resources: dict[str, Any] = {SNAPSHOT_RESOURCE_KEY: context_snapshot_resource}
    if "notifications" in resource_keys:
        from resources.notifications import NotificationsResource

        resources["notifications"] = NotificationsResource()
    graph = dg.GraphDefinition(
        name=spec.name, description=spec.description or None, node_defs=ops, dependencies=dependencies
    )
    metadata: dict[str, Any] = {"triggers": dg.MetadataValue.json([t.model_dump() for t in spec.triggers])}
    if source is not None:
        metadata["spec_file"] = dg.MetadataValue.path(str(source))
    return graph.to_job(
        config=config,
        resource_defs=resources,
        executor_def=dg.in_process_executor,
        tags={**spec.tags, WORKFLOW_TAG: spec.name, KIND_TAG: "workflow"},
        metadata=metadata,
    )


def build_schedules(spec: WorkflowSpec, job: dg.JobDefinition) -> list[dg.ScheduleDefinition]:
    schedules = [trigger for trigger in spec.triggers if trigger.type == "schedule"]
    return [
        dg.ScheduleDefinition(
            name=f"{spec.name}_schedule" if len(schedules) == 1 else f"{spec.name}_schedule_{index}",
            job=job,
            cron_schedule=trigger.cron,
            execution_timezone=trigger.timezone,
            default_status=dg.DefaultScheduleStatus.RUNNING
            if trigger.enabled
            else dg.DefaultScheduleStatus.STOPPED,
            description=f"Runs the {spec.name} workflow ({trigger.cron}, {trigger.timezone}).",
        )
        for index, trigger in enumerate(schedules)
    ]


def workflow_definitions(directory: str | Path) -> dg.Definitions:
    """The jobs and schedules of every workflow spec in `directory`, the sensors of their stream
    triggers, the resume sensor of the workflows that park, and the compensation jobs and failure
    sensor of the workflows that declare compensations or on-failure notifications; a bad spec raises
    `SpecError`."""
    from orchestration.workflows.compensation import build_compensation_job, failure_sensor, has_compensations
    from orchestration.workflows.resume import resume_sensor
    from sensors.event_triggers import event_trigger_sensors

    jobs, schedules, parkable, triggers = [], [], [], []
    compensation_jobs, watched, watched_specs = [], [], {}
    for path, spec in load_workflows(workflow_files(directory)).items():
        job = build_job(spec, path)
        jobs.append(job)
        schedules.extend(build_schedules(spec, job))
        triggers.extend(stream_triggers(spec, job))
        if is_parkable(spec):
            parkable.append(job)
        if has_compensations(spec):
            compensation_jobs.append(build_compensation_job(spec))
        if has_compensations(spec) or spec.on_failure:
            watched.append(job)
            watched_specs[spec.name] = spec
    sensors = [resume_sensor(parkable)] if parkable else []
    sensors.extend(event_trigger_sensors(triggers))
    if watched:
        sensors.append(failure_sensor(watched_specs, watched, compensation_jobs))
    return dg.Definitions(jobs=[*jobs, *compensation_jobs], schedules=schedules, sensors=sensors)
