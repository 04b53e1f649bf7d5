"""Run performance as a time series: every finished Dagster run's queue wait, duration, rows read and
rows/s, and each step's time, read from Dagster's run and event storage by the `run_performance`
sensor (a cursor on the runs' update time) into the platform store's `run_performance` table.

Why a table, not a daily-partitioned asset: a row is written seconds after its run ends and is
queried by job and time with one indexed query (`GET /gateway/v1/metrics/runs`, `/gateway/metrics`,
the alert and anomaly signals); a partition per day would lag a day and be one more run per day.
Retention: `JUNCTION_PERFORMANCE_RETENTION_DAYS` (default 90), applied by the sensor.

Recording is idempotent (one row per run id, written again if the run is seen again), so the cursor
may move after the rows are written and a tick interrupted before it moved repeats harmlessly.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import dagster as dg

if TYPE_CHECKING:
    from sqlalchemy import Engine

FINISHED = (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)
BATCH = 200
PERFORMANCE_INTERVAL_S = 30


@dataclass(frozen=True)
class RunFigures:
    run_id: str
    job: str
    status: str
    created_at: datetime
    queued_s: float | None
    duration_s: float | None
    rows: int | None
    rows_per_s: float | None
    steps: dict[str, dict[str, Any]]

    def as_json(self) -> dict[str, Any]:
        return {**self.__dict__, "created_at": self.created_at.isoformat()}


def figures_of(instance: dg.DagsterInstance, record: Any) -> RunFigures:
    run = record.dagster_run
    created = record.create_timestamp.replace(tzinfo=record.create_timestamp.tzinfo or UTC)
    queued = record.start_time - created.timestamp() if record.start_time else None
    duration = record.end_time - record.start_time if record.start_time and record.end_time else None
    steps = {
        stat.step_key: {
            "seconds": round(stat.end_time - stat.start_time, 3)
            if stat.start_time and stat.end_time
            else None,
            "attempts": stat.attempts,
            "status": stat.status.value if stat.status else None,
        }
        for stat in instance.get_run_step_stats(run.run_id)
    }
    rows = None
    for entry in instance.get_records_for_run(
        run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION, limit=1000
    ).records:
        metadata = entry.event_log_entry.asset_materialization.metadata
        read = metadata.get("rows_read")
        if read is not None:
            rows = (rows or 0) + int(read.value)
    rows_per_s = round(rows / duration, 1) if rows is not None and duration else None
    return RunFigures(
        run_id=run.run_id,
        job=run.job_name,
        status=run.status.value,
        created_at=created,
        queued_s=round(max(queued, 0.0), 3) if queued is not None else None,
        duration_s=round(duration, 3) if duration is not None else None,
        rows=rows,
        rows_per_s=rows_per_s,
        steps=steps,
    )


def record_runs(engine: Engine | None, figures: list[RunFigures]) -> None:
    from orchestration.store import session_scope
    from orchestration.store.models import RunPerformance

    with session_scope(engine) as session:
        for item in figures:
            session.merge(RunPerformance(**item.__dict__))


def prune(engine: Engine | None, retention: timedelta, now: datetime | None = None) -> int:
    from sqlalchemy import delete

    from orchestration.store import session_scope
    from orchestration.store.models import RunPerformance

    cutoff = (now or datetime.now(UTC)) - retention
    with session_scope(engine) as session:
        return session.execute(delete(RunPerformance).where(RunPerformance.created_at < cutoff)).rowcount


def record_finished_runs(
    instance: dg.DagsterInstance, cursor: float | None, engine: Engine | None = None
) -> tuple[int, float | None]:
    """Record the runs finished since `cursor` (an update timestamp): (how many, the new cursor)."""
    since = datetime.fromtimestamp(cursor, UTC) if cursor is not None else None
    records = instance.get_run_records(
        filters=dg.RunsFilter(statuses=list(FINISHED), updated_after=since),
        limit=BATCH,
        order_by="update_timestamp",
        ascending=True,
    )
    if not records:
        return 0, cursor
    record_runs(engine, [figures_of(instance, record) for record in records])
    newest = max(record.update_timestamp for record in records)
    return len(records), newest.replace(tzinfo=newest.tzinfo or UTC).timestamp()


def run_series(
    engine: Engine | None = None, *, job: str | None = None, since: datetime | None = None, limit: int = 1000
) -> list[dict[str, Any]]:
    """Recorded runs, newest first."""
    from sqlalchemy import select

    from orchestration.store import session_scope
    from orchestration.store.models import RunPerformance

    query = select(RunPerformance).order_by(RunPerformance.created_at.desc()).limit(limit)
    if job is not None:
        query = query.where(RunPerformance.job == job)
    if since is not None:
        query = query.where(RunPerformance.created_at >= since)
    with session_scope(engine) as session:
        return [
            RunFigures(
                run_id=row.run_id,
                job=row.job,
                status=row.status,
                created_at=row.created_at,
                queued_s=row.queued_s,
                duration_s=row.duration_s,
                rows=row.rows,
                rows_per_s=row.rows_per_s,
                steps=row.steps,
            ).as_json()
            for row in session.scalars(query)
        ]


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1], 3)


def job_summaries(series: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per job: runs, failures, duration and queue-wait p50/p95, median rows/s."""
    by_job: dict[str, list[dict[str, Any]]] = {}
    for run in series:
        by_job.setdefault(run["job"], []).append(run)
    summaries = {}
    for job, runs in sorted(by_job.items()):
        durations = [run["duration_s"] for run in runs if run["duration_s"] is not None]
        waits = [run["queued_s"] for run in runs if run["queued_s"] is not None]
        rates = [run["rows_per_s"] for run in runs if run["rows_per_s"] is not None]
        summaries[job] = {
            "runs": len(runs),
            "failures": sum(run["status"] == "FAILURE" for run in runs),
            "duration_p50_s": _quantile(durations, 0.5),
            "duration_p95_s": _quantile(durations, 0.95),
            "queued_p50_s": _quantile(waits, 0.5),
            "queued_p95_s": _quantile(waits, 0.95),
            "rows_per_s_p50": _quantile(rates, 0.5),
        }
    return summaries


@dg.sensor(
    name="run_performance",
    description="Records every finished run's queue wait, duration, rows/s and step times "
    "(GET /gateway/v1/metrics/runs).",
    minimum_interval_seconds=PERFORMANCE_INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def run_performance(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    from orchestration.settings import get_settings

    cursor = float(context.cursor) if context.cursor else None
    total = 0
    while True:  # a backlog (the first tick on an old instance) is read in batches
        count, cursor = record_finished_runs(context.instance, cursor)
        total += count
        if cursor is not None:
            context.update_cursor(str(cursor))
        if count < BATCH:
            break
    pruned = prune(None, timedelta(days=get_settings().performance_retention_days))
    return dg.SkipReason(f"{total} finished run(s) recorded; {pruned} older than the retention removed")


def performance_definitions() -> dg.Definitions:
    return dg.Definitions(sensors=[run_performance])
