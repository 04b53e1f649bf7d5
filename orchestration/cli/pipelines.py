"""`junction pipelines`: list, validate, describe and run the ETL pipeline specs.

`run NAME` materializes the pipeline's staged and published assets through the Dagster instance
(`prepare_dagster_home`, then `DagsterInstance.get()`), so the run is recorded like one launched from
the UI, and prints the quality summary and the report link. `report NAME` reads the same instance and
prints (or writes as HTML / JSON) the quality report of the newest run, or of `--run-id`.
`clean-staging NAME` removes the staging places the newest publish superseded, as each publish does.
`state show|reset NAME` reads or resets an incremental pipeline's cursor state, which lives in its
target beside the rows (a reset is audited).
"""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group()
def pipelines() -> None:
    """ETL pipeline specs (JUNCTION_PIPELINES_DIR, default assets/pipelines/*.yaml)."""


@pipelines.command("list")
def list_pipelines() -> None:
    """List every pipeline: name, source, target, schedule."""
    from assets.etl.spec import load_pipelines

    loaded = load_pipelines()
    if not loaded:
        from orchestration.settings import get_settings

        click.echo(f"no pipeline specs in {get_settings().pipelines_dir}")
        return
    for name, pipeline in sorted(loaded.items()):
        spec = pipeline.spec
        where = (
            getattr(spec.source, "path", None)
            or getattr(spec.source, "table", None)
            or getattr(spec.source, "pipeline", None)
            or getattr(spec.source, "asset", None)
            or "query"
        )
        source = f"{spec.source.kind}:{where}"
        target = (
            f"{spec.target.kind}:{getattr(spec.target, 'table', None) or spec.target.path}"
            if spec.target
            else "-"
        )
        schedule = spec.schedule or "-"
        click.echo(f"{name}\t{source}\t-> {target}\t{spec.load.mode}\t{schedule}\t{pipeline.file}")


@pipelines.command()
@click.argument("files", nargs=-1, type=click.Path(path_type=Path))
@click.option("--strict", is_flag=True, help="Warnings count as problems (a source path matching no file).")
def validate(files: tuple[Path, ...], strict: bool) -> None:
    """Validate FILES (default: every spec); every problem of every file is printed, one per line.

    Beyond the spec itself, each pipeline is checked against this machine: a SQL URL whose dialect
    or driver is not installed is a problem; a source path or glob matching no file is a warning
    (files may arrive later), a problem with --strict.
    """
    from assets.etl.preflight import check_pipeline
    from assets.etl.spec import load_pipelines
    from orchestration.kernel.spec_errors import SpecError

    try:
        loaded = load_pipelines(list(files) if files else None)
    except SpecError as exc:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        count = len(exc.problems)
        raise click.ClickException(f"{count} problem{'s' if count != 1 else ''} found") from None
    problems, warnings = [], []
    for _, pipeline in sorted(loaded.items()):
        preflight = check_pipeline(pipeline)
        problems += preflight.errors
        (problems if strict else warnings).extend(preflight.warnings)
    for problem in problems:
        click.echo(str(problem), err=True)
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    if problems:
        count = len(problems)
        raise click.ClickException(f"{count} problem{'s' if count != 1 else ''} found")
    noted = f" ({len(warnings)} warning{'s' if len(warnings) != 1 else ''})" if warnings else ""
    click.echo(f"{len(loaded)} pipeline spec{'s' if len(loaded) != 1 else ''} valid{noted}")


@pipelines.command()
def schema() -> None:
    """Print the JSON Schema of a pipeline spec (for editors: junction pipelines schema > pipeline.schema.json)."""
    from assets.etl.spec import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


@pipelines.command()
@click.argument("name")
def run(name: str) -> None:
    """Run pipeline NAME now through the Dagster instance; exits non-zero when a blocking check fails."""
    import dagster as dg
    from dagster._core.utils import make_new_run_id

    from assets.etl.factory import PIPELINE_TAG, QUALITY_SUMMARY, build_pipeline
    from assets.etl.report import QUALITY_REPORT
    from assets.etl.spec import load_pipelines
    from orchestration.cli.run_output import QUIET_CONSOLE, fail_with_run_error, follow_run
    from orchestration.instance import prepare_dagster_home
    from orchestration.kernel.principals import export_local_admin_key
    from orchestration.settings import get_settings

    export_local_admin_key(get_settings().admin_key_file)
    loaded = load_pipelines()
    if name not in loaded:
        known = ", ".join(sorted(loaded)) or "none"
        raise click.ClickException(f"no pipeline named {name!r} (known: {known})")
    prepare_dagster_home()
    definitions = build_pipeline(loaded[name])
    job = definitions.resolve_job_def(f"{name}_pipeline")
    click.echo(f"running {name} (Dagster job {job.name}); progress below", err=True)
    run_id = make_new_run_id()
    instance = dg.DagsterInstance.get()
    result = follow_run(
        instance,
        run_id,
        lambda: job.execute_in_process(
            run_config=QUIET_CONSOLE,
            instance=instance,
            raise_on_error=False,
            run_id=run_id,
            tags={PIPELINE_TAG: name},
        ),
    )
    click.echo(f"run {result.run_id}: {'succeeded' if result.success else 'failed'}")
    for materialization in result.asset_materializations_for_node(f"{name}_staged"):
        summary = materialization.metadata.get(QUALITY_SUMMARY)
        if summary is not None:
            click.echo(summary.value)
        link = materialization.metadata.get(QUALITY_REPORT)
        if link is not None:
            click.echo(f"quality report: {link.value}")
    failed_blocking = [
        evaluation.check_name
        for evaluation in result.get_asset_check_evaluations()
        if not evaluation.passed and evaluation.blocking
    ]
    if failed_blocking:
        raise click.ClickException(
            f"blocking check{'s' if len(failed_blocking) > 1 else ''} failed: {', '.join(failed_blocking)}; "
            "the target was not changed, the staged rows are kept for inspection"
        )
    if not result.success:
        fail_with_run_error(
            instance, result.run_id, f"\nreport: junction pipelines report {name} --run-id {result.run_id}"
        )


@pipelines.command()
@click.argument("name")
@click.option(
    "--run-id",
    help="The run to report on (default: the newest run that staged the pipeline or failed before it).",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Also write the HTML report (self-contained, charts inline) to this file.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a summary.")
def report(name: str, run_id: str | None, output: Path | None, as_json: bool) -> None:
    """Print the quality report of pipeline NAME's newest run (or --run-id), from the Dagster instance."""
    import dagster as dg

    from assets.etl.report import (
        QUALITY_REPORT,
        RunReport,
        facts_from_instance,
        render_report_html,
        report_url,
    )
    from assets.etl.spec import load_pipelines
    from orchestration.instance import prepare_dagster_home
    from orchestration.kernel.principals import export_local_admin_key
    from orchestration.settings import get_settings

    export_local_admin_key(get_settings().admin_key_file)
    loaded = load_pipelines()
    if name not in loaded:
        known = ", ".join(sorted(loaded)) or "none"
        raise click.ClickException(f"no pipeline named {name!r} (known: {known})")
    prepare_dagster_home()
    with dg.DagsterInstance.get() as instance:
        facts = facts_from_instance(instance, name, run_id)
    if facts is None:
        which = f"for run {run_id}" if run_id else "yet: it has not run"
        raise click.ClickException(f"no report of pipeline {name!r} {which}")
    quality_report = RunReport.from_facts(facts)
    quality_report.links["quality report"] = (facts.staged or {}).get(QUALITY_REPORT) or report_url(
        name, facts.run_id
    )
    if output is not None:
        output.write_text(render_report_html(quality_report), encoding="utf-8")
        click.echo(f"wrote {output}", err=True)
    if as_json:
        click.echo(json.dumps(quality_report.to_json(), indent=2, default=str))
    else:
        click.echo(quality_report.summary_text())


@pipelines.command("clean-staging")
@click.argument("name")
@click.option("--dry-run", is_flag=True, help="List what would be removed; remove nothing.")
def clean_staging(name: str, dry_run: bool) -> None:
    """Remove the staging places of pipeline NAME that its newest publish superseded.

    The rule each successful publish applies (`remove_superseded_staging`): places of runs created
    before the newest run that published NAME and since finished (SUCCESS, FAILURE, CANCELED). The
    places of runs still in progress or newer - a failed run's rows kept for inspection since the
    last publish - and places no run of NAME carries stay, and are listed with the reason.
    """
    import dagster as dg

    from assets.etl.factory import remove_superseded_staging
    from assets.etl.loads import open_target, target_base_dir
    from assets.etl.spec import load_pipelines
    from orchestration.instance import prepare_dagster_home
    from orchestration.kernel.principals import export_local_admin_key
    from orchestration.settings import get_settings

    export_local_admin_key(get_settings().admin_key_file)
    loaded = load_pipelines()
    if name not in loaded:
        known = ", ".join(sorted(loaded)) or "none"
        raise click.ClickException(f"no pipeline named {name!r} (known: {known})")
    spec = loaded[name].spec
    if spec.target is None:
        raise click.ClickException(f"pipeline {name!r} has no target: its runs stage in memory only")
    prepare_dagster_home()
    target = open_target(spec.target, target_base_dir(), pipeline=name)
    try:
        with dg.DagsterInstance.get() as instance:
            published = instance.get_latest_materialization_event(dg.AssetKey(name))
            if published is None:
                places = target.staging_places()
                click.echo(
                    f"no run has published {name} yet: nothing is superseded, "
                    f"{len(places)} staging place{'s' if len(places) != 1 else ''} kept"
                )
                return
            cleanup = remove_superseded_staging(instance, name, target, published.run_id, dry_run=dry_run)
    finally:
        target.dispose()
    verb = "would remove" if dry_run else "removed"
    for removed in cleanup.removed:
        click.echo(f"{verb} {removed['place']} (run {removed['run_id']}, {removed['status']})")
    for kept in cleanup.kept:
        click.echo(f"kept {kept['place']} (run {kept['run_id'] or 'unknown'}): {kept['reason']}")
    count = len(cleanup.removed)
    click.echo(
        f"{verb} {count} staging place{'s' if count != 1 else ''} superseded by run {published.run_id}, "
        f"kept {len(cleanup.kept)}"
    )


@pipelines.group()
def state() -> None:
    """The incremental state of a pipeline: the cursor value its target has published up to."""


def _incremental_target(name: str):
    """(spec, target) of pipeline NAME, which must be incremental; the caller disposes the target."""
    from assets.etl.loads import open_target, target_base_dir
    from assets.etl.spec import load_pipelines

    loaded = load_pipelines()
    if name not in loaded:
        known = ", ".join(sorted(loaded)) or "none"
        raise click.ClickException(f"no pipeline named {name!r} (known: {known})")
    spec = loaded[name].spec
    if spec.incremental is None or spec.target is None:
        raise click.ClickException(f"pipeline {name!r} is not incremental: it reads everything each run")
    return spec, open_target(spec.target, target_base_dir(), pipeline=name)


@state.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the state as JSON.")
def show_state(name: str, as_json: bool) -> None:
    """Print where pipeline NAME's next run starts: the committed cursor value, or the spec's initial."""
    from assets.etl.state import IncrementalWindow, cursor_text

    spec, target = _incremental_target(name)
    try:
        current = target.read_state(name)
    finally:
        target.dispose()
    incremental = spec.incremental
    assert incremental is not None
    if incremental.by_file:
        files = dict(current.value) if current is not None else {}
        shown = {"pipeline": name, "cursor": "files", "files": files, "target": target.description}
        if as_json:
            click.echo(json.dumps(shown, indent=2, default=str))
        else:
            click.echo(
                f"{name}: {len(files)} file(s) published so far in {target.description}; the next run reads "
                "only files that are new or changed"
            )
            for path in sorted(files):
                click.echo(f"  {path}")
        return
    window = IncrementalWindow.of(name, incremental, current, spec.load.mode)
    shown = {
        "pipeline": name,
        "cursor": incremental.cursor,
        "value": current.value if current else None,
        "committed_by_run": current.run_id if current else None,
        "committed_at": current.updated_at if current else None,
        "next_start": cursor_text(window.start),
        "target": target.description,
    }
    if as_json:
        click.echo(json.dumps(shown, indent=2, default=str))
        return
    if current is None:
        click.echo(
            f"{name}: no state in {target.description}; the next run starts at initial {shown['next_start']}"
        )
        return
    click.echo(
        f"{name}: {incremental.cursor} = {current.value} (committed by run {current.run_id or '-'} at "
        f"{current.updated_at or '-'}); the next run starts at {shown['next_start']}"
    )


@state.command("reset")
@click.argument("name")
@click.option("--to", "to_value", help="Set the cursor to this value instead of forgetting it.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def reset_state(name: str, to_value: str | None, yes: bool) -> None:
    """Forget pipeline NAME's state (the next run reads from initial) or set it --to a value (audited)."""
    from assets.etl.state import CursorState, cursor_text, parse_cursor
    from orchestration.cli.keys import cli_actor
    from orchestration.errors import JunctionError
    from orchestration.kernel import audit
    from orchestration.store.bootstrap import migrate_store

    spec, target = _incremental_target(name)
    incremental = spec.incremental
    assert incremental is not None
    if incremental.by_file and to_value is not None:
        raise click.BadParameter(
            "a file source's state is the files it read: reset forgets them", param_hint="--to"
        )
    try:
        before = target.read_state(name)
        if to_value is not None:
            try:
                value = cursor_text(parse_cursor(to_value, incremental.kind))
            except JunctionError as exc:
                raise click.BadParameter(str(exc), param_hint="--to") from None
        what = (
            f"set {name}'s {incremental.cursor} to {value}"
            if to_value is not None
            else f"forget {name}'s state"
        )
        if not yes:
            click.confirm(f"{what} (was {before.value if before else 'none'})?", abort=True)
        if to_value is not None:
            target.write_state(CursorState(name, incremental.cursor, value, run_id=None))
        else:
            target.delete_state(name)
    finally:
        target.dispose()
    migrate_store()
    audit.append(
        "pipeline.state_reset",
        actor=cli_actor(),
        target=f"pipeline:{name}",
        origin="cli",
        details={
            "cursor": incremental.cursor,
            "before": before.value if before else None,
            "after": value if to_value is not None else None,
        },
    )
    click.echo(f"{what[0].upper()}{what[1:]} (was {before.value if before else 'none'})")
