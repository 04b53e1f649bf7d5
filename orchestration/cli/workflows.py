"""`junction workflows`: list, validate and run the workflow specs (`JUNCTION_WORKFLOWS_DIR`), and
their statistics by execution (`stats`, `executions`; see `orchestration/workflows/stats.py`).

`run` launches through the Dagster instance of the platform (`DAGSTER_HOME` or the generated one), so
the run is recorded exactly like one from the UI and shows there; it runs in this process with the
workflow's in-process executor, prints each step as it starts and ends, and exits non-zero unless
the run succeeds.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from orchestration.cli.common import render_table


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
    from dagster import DagsterInstance
    from dagster._core.definitions.reconstruct import ReconstructableRepository
    from dagster._core.execution.api import execute_run
    from dagster._core.utils import make_new_run_id

    from orchestration.cli.run_output import fail_with_run_error, follow_run
    from orchestration.instance import prepare_dagster_home
    from orchestration.settings import PROJECT_ROOT
    from orchestration.store.bootstrap import migrate_store
    from orchestration.workflows.context import FAILED_STEPS_TAG
    from orchestration.workflows.launch import execution_tags

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
        tags={**job_def.run_tags, **execution_tags(run_id, launched_by="cli")},
        job_code_origin=job.get_python_origin(),
    )
    click.echo(f"run {run_id} of workflow {name} (execution {run_id})")
    follow_run(instance, run_id, lambda: execute_run(job, dagster_run, instance))
    finished = instance.get_run_by_id(run_id)
    status = finished.status.value if finished else "UNKNOWN"
    failed_steps = finished.tags.get(FAILED_STEPS_TAG) if finished else None
    suffix = f" (steps failed and continued: {failed_steps})" if failed_steps else ""
    click.echo(f"run {run_id}: {status}{suffix}")
    if status != "SUCCESS":
        fail_with_run_error(instance, run_id)


def _report(name: str | None, limit: int):
    """Statistics read from the platform's Dagster instance and store (as the gateway computes them)."""
    from dagster import DagsterInstance

    from orchestration.instance import prepare_dagster_home
    from orchestration.settings import get_settings
    from orchestration.store.bootstrap import migrate_store
    from orchestration.workflows import stats

    step_types = stats.step_types_of(get_settings().workflows_dir)
    if name is not None and name not in step_types:
        known = ", ".join(sorted(step_types)) or "none"
        raise click.BadParameter(f"unknown workflow {name!r} (known: {known})", param_hint="NAME")
    migrate_store()
    prepare_dagster_home()
    with DagsterInstance.get() as instance:
        runs = stats.runs_from_instance(
            instance,
            name,
            limit=limit,
            progress=lambda done, total: click.echo(f"reading runs: {done}/{total}", err=True),
        )
    return stats.build_report(runs, step_types, workflows=[name] if name else sorted(step_types))


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


RUN_LIMIT_OPTION = click.option(
    "--limit", default=5000, show_default=True, help="Read at most this many of the newest runs."
)


@workflows.command()
@click.argument("name", required=False)
@RUN_LIMIT_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def stats(name: str | None, limit: int, as_json: bool) -> None:
    """Statistics per workflow, by execution (not by run): outcomes, durations, waiting, step failures.

    Wall time runs from an execution's first run start to its last run end (parked time included);
    active time is the sum of its runs' durations. With NAME, also its steps and what it waits on."""
    report = _report(name, limit)
    if as_json:
        click.echo(json.dumps([item.to_json() for item in report.stats.values()], indent=2))
        return
    rows = [
        (
            item.workflow,
            str(item.executions),
            str(item.by_status["succeeded"]),
            str(item.by_status["failed"] + item.by_status["canceled"]),
            str(item.by_status["running"]),
            str(item.waiting),
            "-" if item.success_rate is None else f"{item.success_rate * 100:.1f}%",
            f"{_seconds(item.wall_p50_s)} / {_seconds(item.wall_p95_s)}",
            f"{_seconds(item.active_p50_s)} / {_seconds(item.active_p95_s)}",
        )
        for item in report.stats.values()
    ]
    if not rows:
        click.echo("no workflows")
        return
    headers = ("workflow", "executions", "ok", "failed", "running", "waiting", "success", "wall p50/p95 s")
    click.echo(render_table((*headers, "active p50/p95 s"), rows))
    if name is None:
        return
    item = report.stats[name]
    if item.waiting_on:
        click.echo("\nwaiting on")
        click.echo(
            render_table(
                ("step", "type", "executions"),
                [(wait.step_id, wait.kind, str(wait.executions)) for wait in item.waiting_on],
            )
        )
    if item.steps:
        click.echo("\nsteps")
        click.echo(
            render_table(
                ("step", "failures", "failed, continued", "retries"),
                [
                    (step.step_id, str(step.failures), str(step.failed_and_continued), str(step.retries))
                    for step in item.steps
                ],
            )
        )


@workflows.command()
@click.argument("name")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(["running", "waiting", "succeeded", "failed", "canceled"]),
    help="Only executions with this status (repeatable).",
)
@RUN_LIMIT_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of a table.")
def executions(name: str, statuses: tuple[str, ...], limit: int, as_json: bool) -> None:
    """The executions of workflow NAME, newest first: one line each (status, runs, times, waiting on)."""
    found = [
        execution
        for execution in _report(name, limit).executions[name]
        if not statuses or execution.status in statuses
    ]
    if as_json:
        for execution in found:
            click.echo(json.dumps(execution.to_json()))
        return
    if not found:
        click.echo("no executions")
        return
    rows = [
        (
            execution.execution_id,
            execution.status,
            str(execution.runs),
            execution.started_at.strftime("%Y-%m-%d %H:%M:%S") if execution.started_at else "-",
            _seconds(execution.wall_s),
            _seconds(execution.active_s),
            f"{execution.waiting.step_id}: {execution.waiting.summary or execution.waiting.kind}"
            if execution.waiting
            else "",
            ",".join(execution.failed_steps),
        )
        for execution in found
    ]
    headers = ("execution", "status", "runs", "started (UTC)", "wall s", "active s", "waiting on")
    click.echo(render_table((*headers, "failed steps"), rows))
