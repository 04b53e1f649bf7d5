"""`junction pipelines`: list, validate and describe the ETL pipeline specs.

`run` and `report` arrive with the asset factory (they materialize through the Dagster instance).
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
        source = f"{spec.source.kind}:{getattr(spec.source, 'path', None) or spec.source.table or 'query'}"
        target = (
            f"{spec.target.kind}:{getattr(spec.target, 'table', None) or spec.target.path}"
            if spec.target
            else "-"
        )
        schedule = spec.schedule or "-"
        click.echo(f"{name}\t{source}\t-> {target}\t{spec.load.mode}\t{schedule}\t{pipeline.file}")


@pipelines.command()
@click.argument("files", nargs=-1, type=click.Path(path_type=Path))
def validate(files: tuple[Path, ...]) -> None:
    """Validate FILES (default: every spec); every problem of every file is printed, one per line."""
    from assets.etl.spec import load_pipelines
    from orchestration.kernel.spec_errors import SpecError

    try:
        loaded = load_pipelines(list(files) if files else None)
    except SpecError as exc:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        count = len(exc.problems)
        raise click.ClickException(f"{count} problem{'s' if count != 1 else ''} found") from None
    click.echo(f"{len(loaded)} pipeline spec{'s' if len(loaded) != 1 else ''} valid")


@pipelines.command()
def schema() -> None:
    """Print the JSON Schema of a pipeline spec (for editors: junction pipelines schema > pipeline.schema.json)."""
    from assets.etl.spec import json_schema

    click.echo(json.dumps(json_schema(), indent=2))
