"""Signals: what an alert rule measures, one small class per kind in one registry.

A signal turns the platform's state into samples — `Sample(labels, value, detail)` — from Dagster's
run and event storage (runs, materializations, asset checks) and the platform's own stats (streams,
gateway requests, cache). A rule's condition is evaluated on `{value, <labels>}` of each sample;
each sample whose condition holds is one alert (its labels are the alert's identity).

Every measurement of one evaluation goes through one `SignalContext`, which fetches each kind of
state once (the failed runs of a window, the asset records) and shares it between rules: 1,000
rules over one store cost a handful of queries, not thousands.

A new signal (the proxy's breakers, anomalies) is one subclass: `kind`, a pydantic `Params`, a
`default_condition` and `measure`. Subclasses register themselves by `kind`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from orchestration.kernel.times import DurationText, duration_seconds

if TYPE_CHECKING:
    import dagster as dg
    from sqlalchemy import Engine

SIGNALS: dict[str, type[Signal]] = {}
# Runs a run-failure window reads at most: a storm beyond it is still one firing group.
RUN_LIMIT = 10_000


def _window(text: str) -> timedelta:
    return timedelta(seconds=duration_seconds(text))  # validated by the params


@dataclass(frozen=True)
class Sample:
    labels: dict[str, str]
    value: float
    detail: str = ""


@dataclass
class SignalContext:
    """The evaluation's view of the platform, each piece fetched at most once."""

    instance: dg.DagsterInstance
    now: datetime
    engine: Engine | None = None
    asset_check_keys: list[Any] = field(default_factory=list)
    events: Any = None  # an EventStream, opened on first use
    _memo: dict[Any, Any] = field(default_factory=dict)

    def memo(self, key: Any, compute: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def runs(self, statuses: tuple[str, ...], since: datetime) -> list[Any]:
        import dagster as dg

        def fetch() -> list[Any]:
            filters = dg.RunsFilter(statuses=[dg.DagsterRunStatus(s) for s in statuses], updated_after=since)
            return list(self.instance.get_run_records(filters=filters, limit=RUN_LIMIT))

        return self.memo(("runs", statuses, since), fetch)

    def runs_of_job(self, statuses: tuple[str, ...], since: datetime, job: str | None) -> list[Any]:
        """`runs(...)` of one job (all jobs for None), indexed once per evaluation."""
        if job is None:
            return self.runs(statuses, since)

        def index() -> dict[str, list[Any]]:
            by_job: dict[str, list[Any]] = {}
            for record in self.runs(statuses, since):
                by_job.setdefault(record.dagster_run.job_name, []).append(record)
            return by_job

        return self.memo(("runs_by_job", statuses, since), index).get(job, [])

    def asset_records(self) -> dict[str, Any]:
        def fetch() -> dict[str, Any]:
            return {
                record.asset_entry.asset_key.to_user_string(): record
                for record in self.instance.get_asset_records()
            }

        return self.memo("assets", fetch)

    def latest_materialization(self, asset: str) -> Any:
        record = self.asset_records().get(asset)
        return record.asset_entry.last_materialization if record is not None else None

    def latest_checks(self) -> dict[Any, Any]:
        return self.memo(
            "checks",
            lambda: (
                self.instance.event_log_storage.get_latest_asset_check_execution_by_key(self.asset_check_keys)
                if self.asset_check_keys
                else {}
            ),
        )

    def stream_stats(self, stream: str) -> Any:
        def fetch() -> Any:
            if self.events is None:
                from resources.event_stream import open_event_stream

                self.events = open_event_stream()
            return self.events.stats(stream)

        return self.memo(("stream", stream), fetch)

    def close(self) -> None:
        if self.events is not None:
            self.events.close()


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Signal(ABC):
    kind: ClassVar[str]
    Params: ClassVar[type[BaseModel]]
    description: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            SIGNALS[cls.kind] = cls

    @staticmethod
    @abstractmethod
    def default_condition(params: Any) -> dict[str, Any]:
        """The condition a rule that declares none uses."""

    @staticmethod
    @abstractmethod
    def measure(context: SignalContext, params: Any) -> list[Sample]: ...


def _above(threshold: float) -> dict[str, Any]:
    return {"field": "value", "op": "gt", "value": threshold}


def _below(threshold: float) -> dict[str, Any]:
    return {"field": "value", "op": "lt", "value": threshold}


# --- Runs -----------------------------------------------------------------------------------------------


class RunSelection(Params):
    job: str | None = Field(default=None, description="Only runs of this job.")
    tags: dict[str, str] = Field(default_factory=dict, description="Only runs with these tags.")
    asset: str | None = Field(default=None, description="Only runs that targeted this asset (a/b key).")
    window: DurationText = Field(default="15m", description="Runs updated within this window.")

    def selects(self, run: Any) -> bool:
        if self.job is not None and run.job_name != self.job:
            return False
        if any(run.tags.get(key) != value for key, value in self.tags.items()):
            return False
        if self.asset is not None:
            selection = run.asset_selection or set()
            if not any(key.to_user_string() == self.asset for key in selection):
                return False
        return True


def _run_labels(run: Any) -> dict[str, str]:
    return {"job": run.job_name, "run_id": run.run_id}


class RunFailure(Signal):
    kind = "run_failure"
    Params = RunSelection
    description = "A run failed (value 1 per failed run in the window)."

    @staticmethod
    def default_condition(params: RunSelection) -> dict[str, Any]:
        return {"field": "value", "op": "gte", "value": 1}

    @staticmethod
    def measure(context: SignalContext, params: RunSelection) -> list[Sample]:
        since = context.now - _window(params.window)
        return [
            Sample(_run_labels(record.dagster_run), 1.0, f"run {record.dagster_run.run_id} failed")
            for record in context.runs_of_job(("FAILURE",), since, params.job)
            if params.selects(record.dagster_run)
        ]


class RunDurationParams(RunSelection):
    over: DurationText = Field(description="Runs longer than this (running ones included).")


class RunDuration(Signal):
    kind = "run_duration"
    Params = RunDurationParams
    description = "A run's duration in seconds (running runs: so far)."

    @staticmethod
    def default_condition(params: RunDurationParams) -> dict[str, Any]:
        return _above(_window(params.over).total_seconds())

    @staticmethod
    def measure(context: SignalContext, params: RunDurationParams) -> list[Sample]:
        since = context.now - _window(params.window)
        now = context.now.timestamp()
        samples = []
        for record in context.runs_of_job(("STARTED", "SUCCESS", "FAILURE"), since, params.job):
            if record.start_time is None or not params.selects(record.dagster_run):
                continue
            duration = (record.end_time or now) - record.start_time
            samples.append(Sample(_run_labels(record.dagster_run), round(duration, 3), f"{duration:.0f} s"))
        return samples


# --- Assets ---------------------------------------------------------------------------------------------


class CheckFailureParams(Params):
    severity: Literal["ERROR", "WARN"] | None = Field(
        default=None, description="Only failures of this severity."
    )
    asset: str | None = None


class CheckFailure(Signal):
    kind = "check_failure"
    Params = CheckFailureParams
    description = "An asset check whose latest execution failed (value 1 each)."

    @staticmethod
    def default_condition(params: CheckFailureParams) -> dict[str, Any]:
        return {"field": "value", "op": "gte", "value": 1}

    @staticmethod
    def measure(context: SignalContext, params: CheckFailureParams) -> list[Sample]:
        samples = []
        for key, record in context.latest_checks().items():
            asset = key.asset_key.to_user_string()
            if params.asset is not None and asset != params.asset:
                continue
            evaluation = getattr(getattr(record.event, "dagster_event", None), "event_specific_data", None)
            if evaluation is None or getattr(evaluation, "passed", True):
                continue
            severity = evaluation.severity.value
            if params.severity is not None and severity != params.severity:
                continue
            labels = {"asset": asset, "check": key.name, "check_severity": severity}
            samples.append(Sample(labels, 1.0, f"check {key.name} on {asset} failed ({severity})"))
        return samples


class FreshnessParams(Params):
    asset: str = Field(description="The asset key (a/b).")
    within: DurationText = Field(description="It must have been materialized within this window.")


class Freshness(Signal):
    kind = "freshness"
    Params = FreshnessParams
    description = "Seconds since the asset's last materialization (never: since the epoch)."

    @staticmethod
    def default_condition(params: FreshnessParams) -> dict[str, Any]:
        return _above(_window(params.within).total_seconds())

    @staticmethod
    def measure(context: SignalContext, params: FreshnessParams) -> list[Sample]:
        latest = context.latest_materialization(params.asset)
        if latest is None:
            age = context.now.timestamp()
            detail = "never materialized"
        else:
            age = context.now.timestamp() - latest.timestamp
            detail = f"last materialized {datetime.fromtimestamp(latest.timestamp, UTC).isoformat(timespec='seconds')}"
        return [Sample({"asset": params.asset}, round(age, 1), detail)]


def _staged_metadata(context: SignalContext, pipeline: str) -> dict[str, Any] | None:
    latest = context.latest_materialization(f"{pipeline}_staged")
    materialization = getattr(getattr(latest, "dagster_event", None), "event_specific_data", None)
    materialization = getattr(materialization, "materialization", None)
    if materialization is None:
        return None
    return {name: getattr(value, "value", value) for name, value in materialization.metadata.items()}


class QualityScoreParams(Params):
    pipeline: str
    score: Literal["rows", "checks", "min"] = Field(
        default="min", description="rows: the share of valid rows; checks: of passed checks; min: the lower."
    )


class QualityScore(Signal):
    kind = "quality_score"
    Params = QualityScoreParams
    description = "The quality score of the pipeline's last run (0 to 1)."

    @staticmethod
    def default_condition(params: QualityScoreParams) -> dict[str, Any]:
        return _below(0.9)

    @staticmethod
    def measure(context: SignalContext, params: QualityScoreParams) -> list[Sample]:
        metadata = _staged_metadata(context, params.pipeline)
        if metadata is None:
            return []  # never run: freshness rules say so, a score cannot
        rows = float(metadata.get("quality_score_rows", 1.0))
        checks = float(metadata.get("quality_score_checks", 1.0))
        value = {"rows": rows, "checks": checks, "min": min(rows, checks)}[params.score]
        return [
            Sample({"pipeline": params.pipeline}, round(value, 4), f"rows {rows:.4f}, checks {checks:.4f}")
        ]


class QuarantineShareParams(Params):
    pipeline: str
    above: float = Field(default=0.05, ge=0, le=1, description="The default condition's bound.")


class QuarantineShare(Signal):
    kind = "quarantine_share"
    Params = QuarantineShareParams
    description = "Quarantined rows over rows read in the pipeline's last run."

    @staticmethod
    def default_condition(params: QuarantineShareParams) -> dict[str, Any]:
        return _above(params.above)

    @staticmethod
    def measure(context: SignalContext, params: QuarantineShareParams) -> list[Sample]:
        metadata = _staged_metadata(context, params.pipeline)
        if metadata is None:
            return []
        read = int(metadata.get("rows_read") or 0)
        quarantined = int(metadata.get("rows_quarantined") or 0)
        share = quarantined / read if read else 0.0
        return [
            Sample(
                {"pipeline": params.pipeline}, round(share, 4), f"{quarantined} of {read} rows quarantined"
            )
        ]


# --- Streams, gateway, cache ------------------------------------------------------------------------------


class StreamParams(Params):
    stream: str
    group: str | None = Field(default=None, description="stream_lag: only this consumer group.")
    above: int = Field(default=1000, ge=0, description="The default condition's bound.")


class StreamLag(Signal):
    kind = "stream_lag"
    Params = StreamParams
    description = "Events not yet delivered to a consumer group."

    @staticmethod
    def default_condition(params: StreamParams) -> dict[str, Any]:
        return _above(params.above)

    @staticmethod
    def measure(context: SignalContext, params: StreamParams) -> list[Sample]:
        stats = context.stream_stats(params.stream)
        return [
            Sample(
                {"stream": params.stream, "group": group.name}, float(group.lag), f"{group.pending} pending"
            )
            for group in stats.groups
            if group.lag is not None and (params.group is None or group.name == params.group)
        ]


class DeadLetters(Signal):
    kind = "dead_letters"
    Params = StreamParams
    description = "Events the stream has dead-lettered."

    @staticmethod
    def default_condition(params: StreamParams) -> dict[str, Any]:
        return _above(params.above)

    @staticmethod
    def measure(context: SignalContext, params: StreamParams) -> list[Sample]:
        stats = context.stream_stats(params.stream)
        return [Sample({"stream": params.stream}, float(stats.dead_lettered))]


class GatewayParams(Params):
    route: str | None = Field(default=None, description="Only this route template (/v1/jobs/{name}/runs).")
    window: DurationText = "5m"
    min_requests: int = Field(default=20, ge=1, description="Fewer requests in the window: no sample.")
    above: float = Field(default=0.05, ge=0, description="The default condition's bound.")


class GatewayErrorRatio(Signal):
    kind = "gateway_error_ratio"
    Params = GatewayParams
    description = "5xx answers over all answers of every gateway instance in the window."

    @staticmethod
    def default_condition(params: GatewayParams) -> dict[str, Any]:
        return _above(params.above)

    @staticmethod
    def measure(context: SignalContext, params: GatewayParams) -> list[Sample]:
        from sqlalchemy import func, select

        from orchestration.store import session_scope
        from orchestration.store.models import ApiRequestStats

        since = context.now - _window(params.window)
        query = select(func.sum(ApiRequestStats.requests), func.sum(ApiRequestStats.status_5xx)).where(
            ApiRequestStats.minute >= since
        )
        if params.route is not None:
            query = query.where(ApiRequestStats.route == params.route)
        with session_scope(context.engine) as session:
            total, errors = session.execute(query).one()
        if not total or total < params.min_requests:
            return []
        labels = {"route": params.route or "*"}
        return [
            Sample(labels, round((errors or 0) / total, 4), f"{errors or 0} of {total} requests answered 5xx")
        ]


class CacheParams(Params):
    namespace: str | None = None
    below: float = Field(default=0.5, ge=0, le=1, description="The default condition's bound.")
    min_lookups: int = Field(default=100, ge=1)


class CacheHitRate(Signal):
    kind = "cache_hit_rate"
    Params = CacheParams
    description = "Cache hits over lookups per namespace, over every process that reported."

    @staticmethod
    def default_condition(params: CacheParams) -> dict[str, Any]:
        return _below(params.below)

    @staticmethod
    def measure(context: SignalContext, params: CacheParams) -> list[Sample]:
        from sqlalchemy import select

        from orchestration.store import session_scope
        from orchestration.store.models import CacheProcessStats
        from resources.cache.reporting import merge

        rows: dict[str, list[dict[str, Any]]] = {}
        with session_scope(context.engine) as session:
            for namespace, figures in session.execute(
                select(CacheProcessStats.namespace, CacheProcessStats.figures)
            ):
                if params.namespace is None or namespace == params.namespace:
                    rows.setdefault(namespace, []).append(figures)
        samples = []
        for namespace, figures in rows.items():
            merged = merge(figures)
            if merged["gets"] >= params.min_lookups and merged["hit_rate"] is not None:
                detail = f"{merged['hits']} hits of {merged['gets']} lookups"
                samples.append(Sample({"namespace": namespace}, merged["hit_rate"], detail))
        return samples
