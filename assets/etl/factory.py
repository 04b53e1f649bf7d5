"""The pipeline asset factory: each spec becomes a staged asset, a published asset, a job and a schedule.

Shape (write-audit-publish):

- ``<name>_staged`` runs the spec (source -> transforms -> the contract's drift policy against the
  target's current schema, `drift.py`; a ``freeze`` violation fails the step before anything is staged,
  with the drift as failure metadata), writes the clean rows to this run's staging place
  (`Target.stage`; on PostgreSQL streamed into the staging COPY batch by batch while the source is
  still read, `loads.StagingStream`) and stores the quarantine next to the target in a thread, while
  it validates the same rows in memory once (`checks.validate`). It declares one `AssetCheckSpec` per
  rule and contract promise, `blocking` where the spec says so, and reports each as an
  `AssetCheckResult`. A failed blocking check fails this step
  after its materialization is recorded, so Dagster skips everything downstream.
- ``<name>`` (the published asset, downstream of the staged one) moves the staged rows into the target
  in one transaction (`Target.publish`): swap, insert with a load id, or merge by key. It publishes
  what this run staged or, when materialized on its own, what the latest staged materialization's run
  staged (staging places are named per run, so concurrent runs never take each other's rows).
  After a successful publish it removes the staging places of earlier finished runs of the pipeline,
  whose rows it supersedes (`remove_superseded_staging`; also `junction pipelines clean-staging`).
- ``<name>_pipeline`` materializes both; ``<name>_schedule`` runs it on the spec's cron.

Data never travels through an IO manager: both assets return `MaterializeResult`s and the rows live in
the staging table or file. The staged asset holds the run's clean rows in memory (one Arrow table,
one pandas frame for GX); sizing follows the data set, as `dedupe keep: last` does.

Nothing here runs when the module is imported; `pipeline_definitions` is called by
`orchestration/definitions.py`, and great_expectations is imported only inside a run.
"""

import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa

from assets.etl.checks import CheckOutcome, QualityCheck, quality_checks, summary_markdown, validate
from assets.etl.deletes import DELETES, full_compare_due, plan_of
from assets.etl.drift import SchemaDriftError
from assets.etl.loads import (
    LOAD_ID_COLUMN,
    StagingPlace,
    StagingStream,
    Target,
    open_target,
    run_token,
    target_base_dir,
)
from assets.etl.quarantine import Quarantine
from assets.etl.report import PIPELINE_TAG, QUALITY_REPORT, QUARANTINE_BY_REASON, report_url
from assets.etl.runner import run_pipeline
from assets.etl.sources import open_source
from assets.etl.spec import LoadedPipeline, load_pipelines, pipeline_files
from assets.etl.state import FILES_CURSOR, CursorState, IncrementalWindow, RunWindow
from resources.event_stream.triggered import TriggeredRange

__all__ = [
    "PIPELINE_TAG",
    "StagingCleanup",
    "asset_check_results",
    "asset_check_specs",
    "build_pipeline",
    "pipeline_definitions",
    "pipeline_job_name",
    "remove_superseded_staging",
    "target_base_dir",
]

KIND_TAG = "junction/kind"
QUALITY_SUMMARY = "quality_summary"
STAGING_REMOVED = "staging_removed"
INCREMENTAL = "incremental"
RUNS_PAGE = 500
COULD_NOT_REMOVE = "could not remove it"


def pipeline_job_name(name: str) -> str:
    """The job materializing a pipeline's assets (workflow Sync steps launch it by this name)."""
    return f"{name}_pipeline"


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
    if target.kind == "rest":
        return "rest"
    url = target.url or ""
    return "postgres" if url.startswith("postgres") else "sqlite" if url.startswith("sqlite") else "sql"


def _stage_rows(
    target: Target | None,
    table: pa.Table,
    staging: StagingStream | None,
    quarantine: Quarantine,
    load_id: str,
    run_id: str,
) -> float:
    """Stage the clean rows - finish the stream that staged them while they were read, or stage the
    whole table when there was none or it gave up - and store the quarantine; the seconds it took
    (a stream's from its first rows on, so they overlap the reading)."""
    started = time.perf_counter()
    if target is not None:
        streamed = staging is not None and staging.finish()
        if not streamed:
            target.stage(table, load_id)
        target.write_quarantine(quarantine, load_id, run_id)
        if streamed:
            assert staging is not None
            return time.perf_counter() - staging.started
    return time.perf_counter() - started


def stage(
    pipeline: LoadedPipeline,
    target: Target | None,
    run_id: str,
    log: Any,
    run_tags: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], list[CheckOutcome]]:
    """Read, transform, stage, store the quarantine and validate: (metadata, check outcomes).

    A run a stream trigger launched (`run_tags`) gives a REST source its events as `trigger`; a read
    its templates narrow to them commits no cursor (it read a few keys, not the window)."""
    spec = pipeline.spec
    window, state = None, None
    if spec.incremental is not None and target is not None:
        state = target.read_state(pipeline.name)
    full_compare = full_compare_due(spec.load.deletes, spec.incremental is not None, state)
    by_file = spec.incremental is not None and spec.incremental.by_file
    if spec.incremental is not None and target is not None and not by_file:
        window = IncrementalWindow.of(pipeline.name, spec.incremental, state, spec.load.mode, full_compare)
    source = open_source(spec.source, pipeline.base_dir, spec.batch_size, pipeline.upstream, window)
    if by_file and target is not None and not full_compare:
        # Only files that are new or changed since the last publish (the state holds their prints).
        source.skip_files(dict(state.value) if state is not None else {})
    if spec.source.kind == "rest":  # sources.rest imports httpx: not when the code location loads
        source.run = RunWindow.of(run_id, dict(run_tags or {}), spec.schedule, spec.timezone)
    triggered = TriggeredRange.of_run(run_tags or {})
    if triggered is not None and getattr(source, "uses_trigger", False):
        source.trigger = trigger_context(pipeline, triggered)

    started = time.perf_counter()
    try:
        result = run_pipeline(pipeline, source=source, target=target, stage_while_reading=True, window=window)
    except SchemaDriftError as exc:
        # Nothing was staged: the target and the staging place stay as they were.
        raise dg.Failure(
            description=str(exc), metadata={"schema_drift": dg.MetadataValue.json(exc.drift.as_metadata())}
        ) from None
    # With no rows left, the table has the target's columns: a replace empties it and keeps its schema.
    table, quarantine, counts, drift = result.to_table(), result.quarantine, result.counts, result.drift
    load_id, step_reports = result.identity.load_id, result.step_reports
    read_seconds = time.perf_counter() - started
    for note in source.notes():
        log.info(note)
    log.info(
        f"read {counts.read:,} rows from {source.description}, {counts.loaded:,} clean ({read_seconds:.2f} s)"
    )
    if by_file and target is not None:
        read, known = source.files_read, source.skipped
        result.incremental = {
            "cursor": FILES_CURSOR,
            "before": len(state.value) if state is not None else None,
            "after": len(source.prints),
            "files_read": [str(path) for path in read],
            "files_unchanged": known,
            "files": source.prints,
            "records_in_window": counts.read,
        }
        log.info(f"incremental by file: {len(read)} new or changed file(s) read, {known} unchanged skipped")
    if result.incremental is not None and getattr(source, "narrowed", False):
        assert source.trigger is not None
        result.incremental = {
            **result.incremental,
            "after": result.incremental["before"],
            "narrowed_to": {name: source.trigger[name] for name in ("stream", "first_id", "last_id", "keys")},
        }
        log.info(
            f"narrowed to {len(source.trigger['keys']):,} key(s) of events {source.trigger['first_id']} .. "
            f"{source.trigger['last_id']} of {source.trigger['stream']}: the cursor stays (a full window "
            "is the schedule's)"
        )
    if result.incremental is not None and not by_file:
        window_read = result.incremental
        log.info(
            f"incremental on {window_read['cursor']}: from {window_read['start']} (last published "
            f"{window_read['before']}), {window_read['records_in_window']:,} records in the window, "
            f"up to {window_read['after']}"
        )

    # The COPY into the staging place (streamed since the first clean batch, or the whole table when
    # the target cannot stream) finishes in a thread beside the checks, which read the in-memory
    # table, never the staging table: the driver (without the GIL) and the database write while GX
    # computes. The blocking decision is unchanged: nothing is published before both have finished.
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="junction-stage") as pool:
        staging = pool.submit(_stage_rows, target, table, result.staging, quarantine, load_id, run_id)
        # Rows merged into an aggregate's groups were not meant to be loaded one by one.
        report = validate(
            table, quality_checks(spec), counts.read - counts.filtered_total - counts.merged_into_groups
        )
        stage_seconds = staging.result()
    stage_and_validate_seconds = time.perf_counter() - started
    log.info(
        f"staged {table.num_rows:,} rows for {target.description if target else 'no target'} "
        f"({stage_seconds:.2f} s)"
    )
    log.info(
        f"ran {len(report.outcomes)} checks ({report.seconds:.2f} s, beside the staging): "
        f"{report.expectations_score:.0%} passed"
    )

    counts.check()
    metadata: dict[str, Any] = {
        **counts.as_metadata(),
        "rows_filtered_by_step": dg.MetadataValue.json(counts.filtered),
        "rows_quarantined_by_step": dg.MetadataValue.json(counts.quarantined),
        **(
            {"aggregated_by_step": dg.MetadataValue.json(counts.aggregated)}  # {step: {input_rows, groups}}
            if counts.aggregated
            else {}
        ),
        # What steps report beyond the counts; enrich: the lookup, its rows, rows matched and not.
        **({"step_reports": dg.MetadataValue.json(step_reports)} if step_reports else {}),
        "dagster/row_count": table.num_rows,
        "dagster/column_schema": column_schema(table.schema),
        "load_id": load_id,
        "staged_in": target.description if target else "memory (the spec has no target)",
        "seconds_read_and_transform": round(read_seconds, 3),
        "seconds_stage": round(stage_seconds, 3),
        "seconds_validate": round(report.seconds, 3),
        "seconds_stage_and_validate": round(stage_and_validate_seconds, 3),
        "rows_per_second_read_and_transform": _rate(counts.read, read_seconds),
        "rows_per_second_stage": _rate(table.num_rows, stage_seconds),
        "rows_per_second_validate": _rate(table.num_rows, report.seconds),
        "rows_per_second": _rate(counts.read, read_seconds + stage_and_validate_seconds),
        "quality_score_checks": round(report.expectations_score, 4),
        "quality_score_rows": round(report.valid_rows_score, 4),
        "rows_valid": report.valid_rows,
        QUARANTINE_BY_REASON: dg.MetadataValue.json(quarantine.reasons()),
        QUALITY_SUMMARY: dg.MetadataValue.md(
            summary_markdown(report, quarantine.count_by_reason())
            + ("" if drift is None else "\n\n" + drift.markdown())
        ),
    }
    if drift is not None:
        metadata["schema_drift"] = dg.MetadataValue.json(drift.as_metadata())
    if result.incremental is not None:
        metadata[INCREMENTAL] = dg.MetadataValue.json(result.incremental)
    if spec.load.deletes is not None:
        metadata[DELETES] = dg.MetadataValue.json(
            _deletes_read(pipeline, full_compare, counts, state, step_reports, log)
        )
    for name in ("requests_made", "pages_read"):  # a REST source's
        if hasattr(source, name):
            metadata[f"source_{name}"] = getattr(source, name)
    if getattr(source, "answers", None) is not None:  # a REST source with `cache:`
        metadata["source_answers"] = dg.MetadataValue.json(source.answers)
    return metadata, report.outcomes


def asset_check_specs(checks: list[QualityCheck], asset: dg.AssetKey | str) -> list[dg.AssetCheckSpec]:
    """One Dagster check spec per rule and contract promise, blocking where the spec says so."""
    return [
        dg.AssetCheckSpec(check.name, asset=asset, description=check.description, blocking=check.blocking)
        for check in checks
    ]


def asset_check_results(outcomes: list[CheckOutcome]) -> list[dg.AssetCheckResult]:
    """The outcomes of `checks.validate` as Dagster check results (severity, sample bad values)."""
    return [
        dg.AssetCheckResult(
            check_name=outcome.check.name,
            passed=outcome.passed,
            severity=_severity(outcome.check),
            description=outcome.check.description,
            metadata={**outcome.metadata(), "blocking": outcome.check.blocking},
        )
        for outcome in outcomes
    ]


def report_link(name: str, context: dg.AssetExecutionContext) -> dict[str, Any]:
    """The run's quality report link as metadata (empty, with a warning, when no link can be signed).

    The Dagster UI cannot open local files: the HTML report is served by the gateway, and the link
    carries a token for this run because a browser has no API key.
    """
    try:
        return {QUALITY_REPORT: dg.MetadataValue.url(report_url(name, context.run_id))}
    except OSError as exc:  # the signing key file could not be created or read
        context.log.warning(f"no quality report link: cannot sign it ({exc})")
        return {}


def target_label(pipeline: LoadedPipeline) -> str:
    """The target as the pipeline list shows it, from the spec alone (no connection, no credentials)."""
    target = pipeline.spec.target
    if target is None:
        return "none (staged in memory)"
    if target.kind == "file":
        return f"{target.format} file {target.path}"
    if target.kind == "rest":
        return f"{target.method} {target.url}"
    return f"{_target_kind(pipeline)} table {target.table}"


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

    def open_pipeline_target(run_id: str) -> Target | None:
        return None if spec.target is None else open_target(spec.target, target_base_dir(), run_id, name)

    @dg.asset(
        key=staged_key,
        # Other pipelines' published assets it reads (source, enrich lookups): the lineage graph's edges.
        deps=[dg.AssetKey(upstream) for upstream in pipeline.upstream],
        description=f"{spec.description or name}: clean rows staged for checks before publishing "
        f"({pipeline.file.name})",
        kinds={"arrow", "great_expectations"},
        # The gateway's pipeline list reads these through GraphQL.
        metadata={"target": target_label(pipeline), "load_mode": spec.load.mode},
        check_specs=asset_check_specs(checks, staged_key),
        **common,
    )
    def staged(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        target = open_pipeline_target(context.run_id)
        try:
            metadata, outcomes = stage(pipeline, target, context.run_id, context.log, context.run.tags)
        finally:
            if target is not None:
                target.dispose()
        metadata.update(report_link(name, context))
        return dg.MaterializeResult(metadata=metadata, check_results=asset_check_results(outcomes))

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
            # The rows staged by this run, or - when only the published asset is materialized - by
            # the run of the latest staged materialization (staging places are per run).
            staged_event = _staged_event(context, staged_key)
            target = open_pipeline_target(staged_event.run_id if staged_event else context.run_id)
            assert target is not None
            staged_metadata = (
                staged_event.asset_materialization.metadata
                if (staged_event and staged_event.asset_materialization)
                else {}
            )
            state = _state_to_commit(name, staged_metadata, staged_event)
            deletes = plan_of(
                spec.load.deletes, staged_metadata[DELETES].value if DELETES in staged_metadata else None
            )
            try:
                started = time.perf_counter()
                outcome = target.publish(spec.load.mode, spec.load.keys, state, deletes)
                seconds = time.perf_counter() - started
                cleanup = _clean_after_publish(context, name, target)
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
            if outcome.child_rows is not None:
                metadata["child_rows"] = dg.MetadataValue.json(outcome.child_rows)
            for count in ("rows_new", "rows_updated", "rows_unchanged", "rows_deleted", "rows_failed"):
                if getattr(outcome, count) is not None:
                    metadata[count] = getattr(outcome, count)
            if INCREMENTAL in staged_metadata:
                window_read = staged_metadata[INCREMENTAL].value
                committed = outcome.state.value if outcome.state is not None else window_read["before"]
                if window_read["cursor"] == FILES_CURSOR:  # files known before and after: counts, not prints
                    committed = window_read["after"] if outcome.state is not None else window_read["before"]
                metadata[INCREMENTAL] = dg.MetadataValue.json(
                    {"cursor": window_read["cursor"], "before": window_read["before"], "after": committed}
                )
            metadata[STAGING_REMOVED] = dg.MetadataValue.json(cleanup.removed)
            if cleanup.kept:
                metadata["staging_kept"] = dg.MetadataValue.json(cleanup.kept)
            metadata.update(report_link(name, context))
            # The published rows are the staged rows: their schema is on the staged materialization
            # (reading the staging table back just for it would cost a pass over the data).
            for key in ("dagster/column_schema", "schema_drift"):
                if key in staged_metadata:
                    metadata[key] = staged_metadata[key]
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


def _state_to_commit(
    name: str, staged_metadata: Mapping[str, Any], staged_event: dg.EventLogEntry | None
) -> CursorState | None:
    """The cursor value the staged run read up to, to commit with its rows (None: nothing new), and
    when keys were last compared in full (this run's staging time when it compared)."""
    if INCREMENTAL not in staged_metadata:
        return None
    window_read = staged_metadata[INCREMENTAL].value
    run_id = staged_event.run_id if staged_event else None
    if window_read["cursor"] == FILES_CURSOR:  # incremental by file: the prints of every file seen
        return (
            CursorState(name, FILES_CURSOR, window_read["files"], run_id)
            if window_read["files_read"]
            else None
        )
    deletes = staged_metadata[DELETES].value if DELETES in staged_metadata else {}
    compared = deletes.get("full_compare") and not deletes.get("skipped")
    moved = window_read["after"] is not None and window_read["after"] != window_read["before"]
    if not moved and not (compared and window_read["after"] is not None):
        return None
    return CursorState(
        name,
        window_read["cursor"],
        window_read["after"],
        staged_event.run_id if staged_event else None,
        full_compare_at=deletes.get("read_at") if compared else deletes.get("previous_full_compare_at"),
    )


def trigger_context(pipeline: LoadedPipeline, triggered: TriggeredRange) -> dict[str, Any]:
    """`trigger` in a source's templates: the run's events that match its trigger's filter, and their
    `key` values (distinct, in event order)."""
    from orchestration.kernel.conditions import evaluate, lookup
    from resources.event_stream import open_event_stream

    declared = next(
        (t for t in pipeline.spec.triggers if t.type == "stream" and t.stream == triggered.stream), None
    )
    condition = declared.condition.tree if declared is not None and declared.condition is not None else None
    with open_event_stream() as events:
        payloads = [
            event.payload
            for event in triggered.read(events)
            if condition is None
            or (isinstance(event.payload, Mapping) and evaluate(condition, event.payload))
        ]
    keys: list[Any] = []
    if declared is not None and declared.key:
        found = (lookup(p, declared.key) if isinstance(p, Mapping) else None for p in payloads)
        keys = list(dict.fromkeys(value for value in found if value is not None))
    return {
        "stream": triggered.stream,
        "first_id": triggered.first_id,
        "last_id": triggered.last_id,
        "count": len(payloads),
        "events": payloads,
        "keys": keys,
    }


def _deletes_read(
    pipeline: LoadedPipeline,
    full_compare: bool,
    counts: Any,
    state: CursorState | None,
    step_reports: dict[str, Any],
    log: Any,
) -> dict[str, Any]:
    """What the staged run tells its publish about deletes: whether it read everything to compare
    keys, and why a compare is skipped (doubt never deletes)."""
    spec = pipeline.spec
    skipped = None
    if full_compare and counts.quarantined_total:
        skipped = (
            f"{counts.quarantined_total:,} records were quarantined and their keys may still exist: "
            "no row is deleted by comparison this run (the next run compares again)"
        )
    elif full_compare and counts.read == 0 and not getattr(spec.source, "allow_empty", False):
        skipped = (
            "the full read returned no records: deleting every target row needs source.allow_empty "
            "(the next run compares again)"
        )
    if full_compare:
        log.info(f"deletes: compared every key with the target ({skipped or 'a full read'})")
    if skipped:
        log.warning(f"deletes: {skipped}")
    tombstones = step_reports.get("load.deletes", {}).get("tombstones")
    return {
        "mode": spec.load.deletes.mode,
        "full_compare": full_compare,
        "skipped": skipped,
        "tombstones": tombstones,
        "read_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "previous_full_compare_at": state.full_compare_at if state else None,
    }


@dataclass
class StagingCleanup:
    """Which staging places a publish superseded (removed, or to remove on a dry run) and which stay."""

    removed: list[dict[str, Any]] = field(default_factory=list)  # {place, run_id, status}
    kept: list[dict[str, Any]] = field(default_factory=list)  # {place, run_id, reason}


def _pipeline_run_records(
    instance: dg.DagsterInstance, pipeline: str, tokens: set[str]
) -> Iterator[dg.RunRecord]:
    """The runs of `pipeline` whose run token is in `tokens`, newest first, read page by page only until
    every token is found: the runs tagged with the pipeline (its job, `junction pipelines run`), then
    the runs that materialized its staged asset without the tag (the UI's Materialize)."""
    left = set(tokens)
    cursor = None
    while left:
        page = instance.get_run_records(
            dg.RunsFilter(tags={PIPELINE_TAG: pipeline}), limit=RUNS_PAGE, cursor=cursor
        )
        for record in page:
            if run_token(record.dagster_run.run_id) in left:
                left.discard(run_token(record.dagster_run.run_id))
                yield record
        if len(page) < RUNS_PAGE:
            break
        cursor = page[-1].dagster_run.run_id
    staged_key = dg.AssetKey(f"{pipeline}_staged")
    event_cursor = None
    while left:
        result = instance.fetch_materializations(staged_key, limit=RUNS_PAGE, cursor=event_cursor)
        run_ids = {record.run_id for record in result.records if run_token(record.run_id) in left}
        if run_ids:
            for record in instance.get_run_records(dg.RunsFilter(run_ids=sorted(run_ids))):
                if run_token(record.dagster_run.run_id) in left:
                    left.discard(run_token(record.dagster_run.run_id))
                    yield record
        if not result.has_more:
            break
        event_cursor = result.cursor


def remove_superseded_staging(
    instance: dg.DagsterInstance,
    pipeline: str,
    target: Target,
    published_by: str,
    *,
    dry_run: bool = False,
) -> StagingCleanup:
    """Remove the staging places of the pipeline's runs that the publish of run `published_by`
    superseded: runs created before it that have finished (SUCCESS, FAILURE, CANCELED) - a failed
    blocking check's rows, kept for inspection, are history once newer rows are published.

    Never the place of a run still queued or running, of a run created after the publishing one, or
    of a token no run of the pipeline carries (another pipeline sharing the target, or a run deleted
    from Dagster's storage): those are kept, with the reason.
    """
    cleanup = StagingCleanup()
    places = target.staging_places()
    if not places:
        return cleanup
    publisher = instance.get_run_record_by_id(published_by)
    published_at: datetime | None = publisher.create_timestamp if publisher else None
    runs = {
        run_token(record.dagster_run.run_id): record
        for record in _pipeline_run_records(instance, pipeline, {place.token for place in places})
    }
    for place in places:
        record = runs.get(place.token)
        run_id = record.dagster_run.run_id if record else None
        if record is None:
            cleanup.kept.append(
                _kept(place, None, f"no run of pipeline {pipeline} has the token {place.token}")
            )
        elif published_at is None:
            cleanup.kept.append(_kept(place, run_id, f"the publishing run {published_by} is not in Dagster"))
        elif run_id == published_by or record.create_timestamp >= published_at:
            cleanup.kept.append(_kept(place, run_id, "its run is not older than the publishing run"))
        elif not record.dagster_run.is_finished:
            cleanup.kept.append(_kept(place, run_id, f"its run is {record.dagster_run.status.value}"))
        else:
            try:
                if not dry_run:
                    target.remove_staging(place)
            except Exception as exc:  # noqa: BLE001 - one place that resists does not keep the others
                cleanup.kept.append(_kept(place, run_id, f"{COULD_NOT_REMOVE}: {exc}"))
                continue
            status = record.dagster_run.status.value
            cleanup.removed.append({"place": place.name, "run_id": run_id, "status": status})
    return cleanup


def _kept(place: StagingPlace, run_id: str | None, reason: str) -> dict[str, Any]:
    return {"place": place.name, "run_id": run_id, "reason": reason}


def _log_cleanup(log: Any, cleanup: StagingCleanup) -> None:
    for removed in cleanup.removed:
        log.info(
            f"removed the staging place {removed['place']} of run {removed['run_id']} ({removed['status']})"
        )
    for kept in cleanup.kept:
        # A token no run carries may be another pipeline's place, and a place that resisted removal
        # needs a look: warnings. Places of newer or unfinished runs are kept as a matter of course.
        unexpected = kept["run_id"] is None or kept["reason"].startswith(COULD_NOT_REMOVE)
        (log.warning if unexpected else log.info)(f"kept the staging place {kept['place']}: {kept['reason']}")


def _clean_after_publish(context: dg.AssetExecutionContext, name: str, target: Target) -> StagingCleanup:
    """The published rows supersede earlier runs' staged rows; a cleanup that fails is a warning, not a
    failed publish (the target already holds the new rows, and `clean-staging` can finish the job)."""
    try:
        cleanup = remove_superseded_staging(context.instance, name, target, context.run_id)
    except Exception as exc:  # noqa: BLE001 - the publish has committed; the places stay for next time
        context.log.warning(f"could not remove superseded staging places of {target.description}: {exc}")
        return StagingCleanup()
    _log_cleanup(context.log, cleanup)
    return cleanup


def _staged_event(context: dg.AssetExecutionContext, staged_key: dg.AssetKey) -> dg.EventLogEntry | None:
    """The staged asset's materialization in this run, else its latest one."""
    for record in context.instance.get_records_for_run(
        context.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
    ).records:
        entry = record.event_log_entry
        if entry.asset_materialization and entry.asset_materialization.asset_key == staged_key:
            return entry
    return context.instance.get_latest_materialization_event(staged_key)


def pipeline_definitions(
    directory: str | Path | None = None, *, pipelines: Mapping[str, LoadedPipeline] | None = None
) -> dg.Definitions:
    """Every pipeline spec in `directory` (default: settings.pipelines_dir), or the already `pipelines`
    loaded (the code location loads them once for assets and triggers); a bad spec raises `SpecError`."""
    loaded = pipelines if pipelines is not None else load_pipelines(pipeline_files(_folder(directory)))
    return dg.Definitions.merge(dg.Definitions(), *(build_pipeline(pipeline) for pipeline in loaded.values()))


def _folder(directory: str | Path | None) -> Path | None:
    return Path(directory) if directory is not None else None
