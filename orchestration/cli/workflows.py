"""`junction workflows`: list, validate and run the workflow specs (`JUNCTION_WORKFLOWS_DIR`).

`run` launches through the Dagster instance of the platform (`DAGSTER_HOME` or the generated one), so
the run is recorded exactly like one from the UI and shows there; it runs in this process with the
workflow's in-process executor, prints each step as it starts and ends, and exits non-zero unless
the run succeeds.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import click

from orchestration.cli.common import render_table

CLI_POLL_INTERVAL_S = 0.2


def _specs(files: tuple[Path, ...] = ()) -> dict:
    from orchestration.settings import get_settings
    from orchestration.workflows.spec import load_workflows, workflow_files

    return load_workflows(files or workflow_files(get_settings().workflows_dir))


@click.group()
def workflows() -> None:
    """Workflows: YAML specs run as Dagster jobs."""


@workflows.command(name="list")
def list_workflows() -> None:
    """Every workflow: name, steps, triggers and file."""
    specs = _specs()
    if not specs:
        click.echo("no workflows")
        return
    rows = [
        (
            spec.name,
            str(len(spec.steps)),
            ", ".join(
                trigger.cron if trigger.type == "schedule" else trigger.type for trigger in spec.triggers
            ),
            path.name,
        )
        for path, spec in sorted(specs.items(), key=lambda item: item[1].name)
    ]
    click.echo(render_table(("name", "steps", "triggers", "file"), rows))


@workflows.command()
@click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
def validate(files: tuple[Path, ...]) -> None:
    """Check FILES (default: every spec) and print every problem of every file; exit 1 if any."""
    from orchestration.kernel.spec_errors import SpecError

    try:
        specs = _specs(files)
    except SpecError as exc:
        for problem in exc.problems:
            click.secho(str(problem), err=True, fg="red")
        raise click.exceptions.Exit(1) from None
    click.echo(f"{len(specs)} workflow(s) valid: {', '.join(sorted(spec.name for spec in specs.values()))}")


@workflows.command()
def schema() -> None:
    """Print the JSON Schema of a workflow spec."""
    from orchestration.workflows.spec import WorkflowSpec

    click.echo(json.dumps(WorkflowSpec.model_json_schema(), indent=2))


def parse_input(spec, text: str) -> tuple[str, object]:
    """`k=v` -> (k, v typed by the input's declared type)."""
    name, separator, raw = text.partition("=")
    if not separator:
        raise click.BadParameter(f"{text!r} is not k=v", param_hint="--input")
    if name not in spec.inputs:
        declared = ", ".join(sorted(spec.inputs)) or "none"
        raise click.BadParameter(f"unknown input {name!r} (declared: {declared})", param_hint="--input")
    kind = spec.inputs[name].type
    try:
        if kind == "integer":
            return name, int(raw)
        if kind == "number":
            return name, float(raw)
        if kind == "boolean":
            if raw.lower() not in ("true", "false"):
                raise ValueError("expected true or false")
            return name, raw.lower() == "true"
        if kind in ("object", "array"):
            value = json.loads(raw)
            if not isinstance(value, dict if kind == "object" else list):
                raise ValueError(f"expected a JSON {kind}")
            return name, value
    except ValueError as exc:
        raise click.BadParameter(f"input {name!r} ({kind}): {exc}", param_hint="--input") from None
    return name, raw


@workflows.command()
@click.argument("name")
@click.option("--input", "inputs", multiple=True, metavar="K=V", help="A workflow input (repeatable).")
def run(name: str, inputs: tuple[str, ...]) -> None:
    """Run the workflow NAME now and wait for it; exit 1 unless it succeeds."""
    from dagster import DagsterEventType, DagsterInstance
    from dagster._core.definitions.reconstruct import ReconstructableRepository
    from dagster._core.execution.api import execute_run
    from dagster._core.utils import make_new_run_id

    from orchestration.instance import prepare_dagster_home
    from orchestration.settings import PROJECT_ROOT
    from orchestration.store.bootstrap import migrate_store
    from orchestration.workflows.context import EXECUTION_ID_TAG, FAILED_STEPS_TAG

    specs = {spec.name: spec for spec in _specs().values()}
    if name not in specs:
        raise click.BadParameter(f"unknown workflow {name!r} (known: {', '.join(sorted(specs)) or 'none'})")
    inputs_config = dict(parse_input(specs[name], text) for text in inputs)
    missing = [
        key
        for key, spec_input in specs[name].inputs.items()
        if spec_input.required and key not in inputs_config
    ]
    if missing:
        raise click.BadParameter(f"missing required input(s): {', '.join(missing)}", param_hint="--input")

    # As when the platform starts: steps write to the platform store (notification deliveries).
    migrate_store()
    prepare_dagster_home()
    instance = DagsterInstance.get()
    # The job is loaded from the code location's module, so the run records where its code lives
    # (the UI can re-execute it) exactly as a run launched from the UI does.
    repository = ReconstructableRepository.for_module("orchestration.definitions", "defs", str(PROJECT_ROOT))
    job = repository.get_reconstructable_job(name)
    job_def = job.get_definition()
    run_id = make_new_run_id()
    dagster_run = instance.create_run_for_job(
        job_def=job_def,
        run_id=run_id,
        run_config=inputs_config,
        tags={**job_def.run_tags, EXECUTION_ID_TAG: run_id, "junction/launched_by": "cli"},
        job_code_origin=job.get_python_origin(),
    )
    click.echo(f"run {run_id} of workflow {name} (execution {run_id})")
    thread = threading.Thread(target=execute_run, args=(job, dagster_run, instance), daemon=True)
    thread.start()
    step_events = {
        DagsterEventType.STEP_START: "started",
        DagsterEventType.STEP_SUCCESS: "succeeded",
        DagsterEventType.STEP_FAILURE: "failed",
        DagsterEventType.STEP_SKIPPED: "skipped",
        DagsterEventType.STEP_UP_FOR_RETRY: "up for retry",
        DagsterEventType.STEP_RESTARTED: "restarted",
    }
    shown = 0
    while True:
        alive = thread.is_alive()
        records = instance.all_logs(run_id, of_type=set(step_events))
        for record in records[shown:]:
            event = record.dagster_event
            click.echo(f"  {event.step_key}: {step_events[event.event_type]}")
        shown = len(records)
        if not alive:
            break
        time.sleep(CLI_POLL_INTERVAL_S)
    finished = instance.get_run_by_id(run_id)
    status = finished.status.value if finished else "UNKNOWN"
    failed_steps = finished.tags.get(FAILED_STEPS_TAG) if finished else None
    suffix = f" (steps failed and continued: {failed_steps})" if failed_steps else ""
    click.echo(f"run {run_id}: {status}{suffix}")
    if status != "SUCCESS":
        raise click.exceptions.Exit(1)
