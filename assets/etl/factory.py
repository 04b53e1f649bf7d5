"""The pipeline asset factory: each spec becomes a staged asset, a published asset, a job and a schedule.

Shape (write-audit-publish):

- ``<name>_staged`` runs the spec (source -> transforms), writes the clean rows to the target's staging
  place (`Target.stage`), stores the quarantine next to the target and validates the staged rows once
  (`checks.validate`). It declares one `AssetCheckSpec` per rule and contract promise, `blocking` where
  the spec says so, and reports each as an `AssetCheckResult`. A failed blocking check fails this step
  after its materialization is recorded, so Dagster skips everything downstream.
- ``<name>`` (the published asset, downstream of the staged one) moves the staged rows into the target
  in one transaction (`Target.publish`): swap, insert with a load id, or merge by key.
- ``<name>_pipeline`` materializes both; ``<name>_schedule`` runs it on the spec's cron.

Data never travels through an IO manager: both assets return `MaterializeResult`s and the rows live in
the staging table or file. The staged asset holds the run's clean rows in memory (one Arrow table,
one pandas frame for GX); sizing follows the data set, as `dedupe keep: last` does.

Nothing here runs when the module is imported; `pipeline_definitions` is called by
`orchestration/definitions.py`, and great_expectations is imported only inside a run.
"""

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa

from assets.etl.checks import CheckOutcome, QualityCheck, quality_checks, summary_markdown, validate
from assets.etl.loads import LOAD_ID_COLUMN, Target, open_target
from assets.etl.quarantine import Quarantine, RowCounts
from assets.etl.runner import iter_pipeline
from assets.etl.sources import open_source
from assets.etl.spec import LoadedPipeline, load_pipelines, pipeline_files

__all__ = ["PIPELINE_TAG", "build_pipeline", "pipeline_definitions", "pipeline_job_name", "target_base_dir"]

PIPELINE_TAG = "junction/pipeline"
KIND_TAG = "junction/kind"
QUALITY_SUMMARY = "quality_summary"


def pipeline_job_name(name: str) -> str:
    """The job materializing a pipeline's assets (workflow Sync steps launch it by this name)."""
    return f"{name}_pipeline"


def target_base_dir() -> Path:
    """Relative file targets live under $JUNCTION_HOME, never inside the repository's spec folder."""
    from orchestration.settings import get_settings

    return get_settings().home_dir


def _rate(rows: int, seconds: float) -> float:
    return round(rows / seconds, 1) if seconds > 0 else 0.0


def column_schema(schema: pa.Schema) -> dg.TableSchema:
    return dg.TableSchema(
        columns=[
            dg.TableColumn(
                field.name, str(field.type), constraints=dg.TableColumnConstraints(nullable=field.nullable)
            )
            for field in schema
            if field.name != LOAD_ID_COLUMN
        ]
    )


def _severity(check: QualityCheck) -> dg.AssetCheckSeverity:
    return dg.AssetCheckSeverity.ERROR if check.severity == "error" else dg.AssetCheckSeverity.WARN


def _target_kind(pipeline: LoadedPipeline) -> str:
    target = pipeline.spec.target
    if target is None:
        return "arrow"
    if target.kind == "file":
        return target.format
    url = target.url or ""
    return "postgres" if url.startswith("postgres") else "sqlite" if url.startswith("sqlite") else "sql"


def stage(
    pipeline: LoadedPipeline, target: Target | None, run_id: str, log: Any
) -> tuple[dict[str, Any], list[CheckOutcome]]:
    """Read, transform, stage, store the quarantine and validate: (metadata, check outcomes)."""
    spec = pipeline.spec
    source = open_source(spec.source, pipeline.base_dir, spec.batch_size)
    load_id = source.identity().load_id
    quarantine, counts = Quarantine(), RowCounts()

    started = time.perf_counter()
    tables = list(iter_pipeline(spec, source, quarantine, counts))
    table = pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})
    read_seconds = time.perf_counter() - started
    log.info(
        f"read {counts.read:,} rows from {source.description}, {counts.loaded:,} clean ({read_seconds:.2f} s)"
    )

    started = time.perf_counter()
    if target is not None:
        target.stage(table, load_id)
        target.write_quarantine(quarantine, load_id, run_id)
    stage_seconds = time.perf_counter() - started
    log.info(
        f"staged {table.num_rows:,} rows for {target.description if target else 'no target'} "
        f"({stage_seconds:.2f} s)"
    )

    report = validate(table, quality_checks(spec), counts.read - counts.filtered_total)
    log.info(
        f"ran {len(report.outcomes)} checks ({report.seconds:.2f} s): {report.expectations_score:.0%} passed"
    )

    counts.check()
    metadata: dict[str, Any] = {
        **counts.as_metadata(),
        "rows_filtered_by_step": dg.MetadataValue.json(counts.filtered),
        "rows_quarantined_by_step": dg.MetadataValue.json(counts.quarantined),
        "dagster/row_count": table.num_rows,
        "dagster/column_schema": column_schema(table.schema),
        "load_id": load_id,
        "staged_in": target.description if target else "memory (the spec has no target)",
        "seconds_read_and_transform": round(read_seconds, 3),
        "seconds_stage": round(stage_seconds, 3),
        "seconds_validate": round(report.seconds, 3),
        "rows_per_second_read_and_transform": _rate(counts.read, read_seconds),
        "rows_per_second_stage": _rate(table.num_rows, stage_seconds),
        "rows_per_second_validate": _rate(table.num_rows, report.seconds),
        "rows_per_second": _rate(counts.read, read_seconds + stage_seconds + report.seconds),
        "quality_score_checks": round(report.expectations_score, 4),
        "quality_score_rows": round(report.valid_rows_score, 4),
        QUALITY_SUMMARY: dg.MetadataValue.md(summary_markdown(report, quarantine.count_by_reason())),
    }
    return metadata, report.outcomes


def build_pipeline(pipeline: LoadedPipeline) -> dg.Definitions:
    """The staged and published assets of one pipeline, its job and (when declared) its schedule."""
    spec, name = pipeline.spec, pipeline.name
    group = spec.group or "etl"
    checks = quality_checks(spec)
    common: dict[str, Any] = {
        "group_name": group,
        "owners": spec.owners,
        "tags": {**spec.tags, PIPELINE_TAG: name},
    }
    staged_key = dg.AssetKey(f"{name}_staged")

    def open_pipeline_target() -> Target | None:
        return None if spec.target is None else open_target(spec.target, target_base_dir())

    @dg.asset(
        key=staged_key,
        description=f"{spec.description or name}: clean rows staged for checks before publishing "
        f"({pipeline.file.name})",
        kinds={"arrow", "great_expectations"},
        check_specs=[
            dg.AssetCheckSpec(
                check.name, asset=staged_key, description=check.description, blocking=check.blocking
            )
            for check in checks
        ],
        **common,
    )
    def staged(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        target = open_pipeline_target()
        try:
            metadata, outcomes = stage(pipeline, target, context.run_id, context.log)
        finally:
            if target is not None:
                target.dispose()
        return dg.MaterializeResult(
            metadata=metadata,
            check_results=[
                dg.AssetCheckResult(
                    check_name=outcome.check.name,
                    passed=outcome.passed,
                    severity=_severity(outcome.check),
                    description=outcome.check.description,
                    metadata=outcome.metadata(),
                )
                for outcome in outcomes
            ],
        )

    assets: list[dg.AssetsDefinition] = [staged]
    if spec.target is not None:

        @dg.asset(
            key=dg.AssetKey(name),
            deps=[staged_key],
            description=f"{spec.description or name}: the published target ({spec.load.mode})",
            kinds={_target_kind(pipeline)},
            **common,
        )
        def published(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
            target = open_pipeline_target()
            assert target is not None
            try:
                started = time.perf_counter()
                outcome = target.publish(spec.load.mode, spec.load.keys)
                seconds = time.perf_counter() - started
            finally:
                target.dispose()
            if outcome.skipped_reason:
                context.log.info(f"nothing published: {outcome.skipped_reason}")
            else:
                context.log.info(
                    f"published {outcome.rows_published:,} rows to {target.description} ({seconds:.2f} s)"
                )
            metadata: dict[str, Any] = {
                "target": target.description,
                "load_mode": spec.load.mode,
                "rows_published": outcome.rows_published,
                "dagster/row_count": outcome.target_rows,
                "seconds_publish": round(seconds, 3),
                "rows_per_second_publish": _rate(outcome.rows_published, seconds),
            }
            if outcome.skipped_reason:
                metadata["skipped"] = outcome.skipped_reason
            # The published rows are the staged rows: their schema is on the staged materialization
            # (reading the staging table back just for it would cost a pass over the data).
            staged_event = context.instance.get_latest_materialization_event(staged_key)
            staged_schema = (
                staged_event.asset_materialization.metadata.get("dagster/column_schema")
                if (staged_event and staged_event.asset_materialization)
                else None
            )
            if staged_schema is not None:
                metadata["dagster/column_schema"] = staged_schema
            return dg.MaterializeResult(metadata=metadata)

        assets.append(published)

    job = dg.define_asset_job(
        pipeline_job_name(name),
        selection=dg.AssetSelection.assets(*assets),
        description=spec.description,
        tags={PIPELINE_TAG: name, KIND_TAG: "pipeline"},
    )
    schedules = (
        [
            dg.ScheduleDefinition(
                name=f"{name}_schedule",
                cron_schedule=spec.schedule,
                job=job,
                execution_timezone=spec.timezone,
            )
        ]
        if spec.schedule
        else []
    )
    return dg.Definitions(assets=assets, jobs=[job], schedules=schedules)


def pipeline_definitions(
    directory: str | Path | None = None, *, pipelines: Mapping[str, LoadedPipeline] | None = None
) -> dg.Definitions:
    """Every pipeline spec in `directory` (default: settings.pipelines_dir), or the already `pipelines`
    loaded (the code location loads them once for assets and triggers); a bad spec raises `SpecError`."""
    loaded = pipelines if pipelines is not None else load_pipelines(pipeline_files(_folder(directory)))
    return dg.Definitions.merge(dg.Definitions(), *(build_pipeline(pipeline) for pipeline in loaded.values()))


def _folder(directory: str | Path | None) -> Path | None:
    return Path(directory) if directory is not None else None
