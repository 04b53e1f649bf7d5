"""The quality report of a pipeline run, built from what the run recorded in Dagster.

Dagster's run and event storage is the only source: the staged materialization's metadata (counts,
scores, seconds per stage, quarantine by reason, column schema, drift), the published
materialization's (rows published, publish seconds) and the run's asset check evaluations (one per
rule and contract promise, with sample bad values). Nothing is copied into the platform store.

Schema drift: a run that records `schema_drift` (JSON: ``added``/``removed`` as {column: type},
``retyped`` as {column: {target, incoming}}, ``policy``...) is shown as recorded, in the report's
shape (lists of {name, type} / {name, from, to}); otherwise the report compares the run's staged
column schema with the previous run's.

A run that failed before staging (an unreadable source, a `freeze` drift failure, a bad cast config)
recorded no materialization: its report is that of a failed run, from its event log - its status,
the steps that failed with their errors (`StepFailure`) - with every count unknown (None), never zero.

Two readers fill the same `RunFacts`: `facts_from_instance` (the CLI, through `DagsterInstance`) and
the gateway (through Dagster's GraphQL API, `orchestration/gateway/api/pipelines.py`). `RunReport`
derives every figure from those facts; `render_report_html` / `render_history_html` draw the pages
(Jinja2 with autoescape, inline SVG charts from pygal, no script and no outside resource).

The link from the Dagster UI: the staged materialization carries a `quality_report` URL with a
permanent signed token for exactly that pipeline and run (`report_url`), because a browser opening
it has no API key. Jinja2 and pygal are imported only when a page is drawn.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import dagster as dg

    from orchestration.settings import JunctionSettings

__all__ = [
    "PIPELINE_TAG",
    "QUALITY_REPORT",
    "REPORT_LINK_PURPOSE",
    "CheckFact",
    "HistoryRow",
    "RunFacts",
    "RunReport",
    "StepFailure",
    "facts_from_instance",
    "history_from_instance",
    "render_history_html",
    "render_report_html",
    "report_path",
    "report_url",
]

# The tag on every pipeline asset and on the runs of the pipeline's job (`assets/etl/factory.py`).
PIPELINE_TAG = "junction/pipeline"
QUALITY_REPORT = "quality_report"
REPORT_LINK_PURPOSE = "pipeline-report"
# The staged materialization's metadata names (written by `assets/etl/factory.py`).
QUARANTINE_BY_REASON = "quarantine_by_reason"
SCHEMA_DRIFT = "schema_drift"
COLUMN_SCHEMA = "dagster/column_schema"
STAGES = (
    # (stage, seconds entry, rows entry or None for "rows read")
    ("read and transform", "seconds_read_and_transform", "rows_read"),
    ("stage", "seconds_stage", "rows_loaded"),
    ("validate", "seconds_validate", "rows_loaded"),
)


def staged_asset_name(pipeline: str) -> str:
    return f"{pipeline}_staged"


def is_pipeline_run(
    pipeline: str,
    job_name: str | None,
    tags: dict[str, str],
    asset_paths: list[list[str]],
    failed_steps: list[str | None],
) -> bool:
    """A run of the pipeline's job, tagged with it, or running one of its assets: selected (the UI's
    Materialize launches the implicit asset job) or among the failed steps (an in-process run of
    that job records no selection). Runs that staged it are its runs too."""
    own = (staged_asset_name(pipeline), pipeline)  # the assets' keys, and their steps' keys
    return (
        job_name == f"{pipeline}_pipeline"
        or tags.get(PIPELINE_TAG) == pipeline
        or any(len(path) == 1 and path[0] in own for path in asset_paths)
        or any(step in own for step in failed_steps)
    )


def report_path(pipeline: str, run_id: str | None = None) -> str:
    """The gateway path (below its prefix) of a pipeline's report history or of one run's report."""
    base = f"/v1/pipelines/{pipeline}/reports"
    return base if run_id is None else f"{base}/{run_id}"


def report_url(pipeline: str, run_id: str, settings: JunctionSettings | None = None) -> str:
    """The report's public URL with a permanent token valid for exactly this pipeline and run."""
    from orchestration.kernel.signed_links import sign_permanent
    from orchestration.settings import get_settings

    settings = settings or get_settings()
    token = sign_permanent(REPORT_LINK_PURPOSE, {"pipeline": pipeline, "run_id": run_id}, settings=settings)
    return f"{settings.public_url}{settings.gateway_prefix}{report_path(pipeline, run_id)}?token={token}"


# --- the facts a run recorded ----------------------------------------------------------------------


@dataclass
class CheckFact:
    """One asset check evaluation of the run, as Dagster stored it."""

    name: str
    passed: bool
    severity: str  # ERROR or WARN
    blocking: bool | None
    description: str | None
    metadata: dict[str, Any]

    @property
    def rows_failed(self) -> int:
        return int(self.metadata.get("rows_failed") or 0)

    @property
    def rows_checked(self) -> int:
        return int(self.metadata.get("rows_checked") or 0)

    @property
    def sample_bad_values(self) -> list[Any]:
        return list(self.metadata.get("sample_bad_values") or [])


@dataclass
class StepFailure:
    """A step that failed (`step` None: the run failed outside its steps), with the error it raised."""

    step: str | None
    error: str
    error_class: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)  # a `dg.Failure`'s (e.g. `schema_drift`)

    @classmethod
    def from_error(
        cls,
        step: str | None,
        chain: list[tuple[str | None, str]],
        *,
        description: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> StepFailure:
        """From Dagster's error chain [(class, message), cause, ...]: a `dg.Failure`'s description,
        else the user code's error that Dagster's step execution error wraps, without the class path
        that Python's formatting puts before the message."""
        chain = chain or [(None, "no error recorded")]
        if chain[0][0] == "DagsterExecutionStepExecutionError" and len(chain) > 1:
            chain = chain[1:]
        error_class, message = chain[0]
        if description:
            message = description
        else:
            first, _, rest = message.partition(": ")
            if error_class and rest and first.rpartition(".")[2] == error_class:
                message = rest
        return cls(step, message.strip(), error_class, dict(metadata or {}))


@dataclass
class RunFacts:
    """What Dagster recorded for one pipeline run (metadata as plain values: numbers, text, JSON)."""

    pipeline: str
    run_id: str
    status: str | None
    started_at: float | None
    ended_at: float | None
    staged_at: float | None  # None: the run staged nothing (it failed first, or is still running)
    staged: dict[str, Any] | None
    published: dict[str, Any] | None
    checks: list[CheckFact]
    previous_columns: list[dict[str, str]] | None = None  # the previous staged schema: drift
    failures: list[StepFailure] = field(default_factory=list)


def plain_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """Dagster `MetadataValue`s as plain values (a table schema as [{name, type}])."""
    import dagster as dg

    plain: dict[str, Any] = {}
    for label, value in metadata.items():
        if isinstance(value, dg.TableSchemaMetadataValue):
            plain[label] = [{"name": c.name, "type": c.type} for c in value.schema.columns]
        else:
            plain[label] = getattr(value, "value", value)
    return plain


def _schema_columns(value: Any) -> list[dict[str, str]] | None:
    return [dict(name=c["name"], type=c["type"]) for c in value] if isinstance(value, list) else None


# --- the report --------------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    seconds: float | None
    rows: int | None
    rows_per_second: float | None


def _run_identity(facts: RunFacts) -> dict[str, Any]:
    """Which run a report is of, whether it staged or not."""
    return {
        "pipeline": facts.pipeline,
        "run_id": facts.run_id,
        "status": facts.status,
        "started_at": _iso(facts.started_at),
        "ended_at": _iso(facts.ended_at),
    }


@dataclass
class RunReport:
    pipeline: str
    run_id: str
    status: str | None
    started_at: str | None
    ended_at: str | None
    staged_at: str | None  # None: the run staged nothing, and every count below is unknown (None)
    score_checks: float | None
    score_rows: float | None
    counts: dict[str, int | None]
    counts_add_up: bool | None
    rows_by_outcome: dict[str, int]
    filtered_by_step: dict[str, int]
    quarantine_by_reason: list[dict[str, Any]]
    checks_total: int
    checks_passed: int
    failed_checks: list[dict[str, Any]]
    schema_drift: dict[str, Any]
    columns: list[dict[str, str]]
    stages: list[Stage]
    target: str | None
    load_mode: str | None
    skipped: str | None
    failures: list[dict[str, Any]] = field(default_factory=list)  # {step, error, error_class}
    links: dict[str, str] = field(default_factory=dict)
    # A merge's sync figures: rows new/updated/unchanged/deleted, the incremental cursor before and
    # after, whether keys were compared in full (None: not a merge, or nothing published).
    sync: dict[str, Any] | None = None

    @classmethod
    def from_facts(cls, facts: RunFacts) -> RunReport:
        if facts.staged is None:
            return cls._not_staged(facts)
        staged, published = facts.staged, facts.published or {}
        counts = {
            name: int(staged.get(f"rows_{name}") or 0)
            for name in ("read", "filtered", "quarantined", "loaded")
        }
        considered = counts["read"] - counts["filtered"]
        score_rows = float(staged.get("quality_score_rows", 1.0))
        valid = int(staged.get("rows_valid", round(score_rows * considered)))
        counts["valid"] = valid
        counts["published"] = int(published.get("rows_published") or 0)
        checks_passed = sum(check.passed for check in facts.checks)
        score_checks = float(
            staged.get("quality_score_checks", checks_passed / len(facts.checks) if facts.checks else 1.0)
        )
        stages = [_stage(name, staged.get(seconds), staged.get(rows)) for name, seconds, rows in STAGES]
        if facts.published is not None:
            stages.append(
                _stage("publish", published.get("seconds_publish"), published.get("rows_published"))
            )
        columns = _schema_columns(staged.get(COLUMN_SCHEMA)) or []
        return cls(
            **_run_identity(facts),
            staged_at=_iso(facts.staged_at) or "",
            score_checks=score_checks,
            score_rows=score_rows,
            counts=counts,
            counts_add_up=counts["read"] == counts["loaded"] + counts["filtered"] + counts["quarantined"],
            rows_by_outcome={
                "valid": valid,
                "loaded, failing a check": counts["loaded"] - valid,
                "filtered": counts["filtered"],
                "quarantined": counts["quarantined"],
            },
            filtered_by_step=dict(staged.get("rows_filtered_by_step") or {}),
            quarantine_by_reason=_quarantine_by_reason(staged),
            checks_total=len(facts.checks),
            checks_passed=checks_passed,
            failed_checks=[
                {
                    "name": check.name,
                    "severity": check.severity,
                    "blocking": check.blocking,
                    "description": check.description,
                    "rows_failed": check.rows_failed,
                    "rows_checked": check.rows_checked,
                    "percent_failed": check.metadata.get("percent_failed"),
                    "sample_bad_values": check.sample_bad_values,
                    "evaluated_by": check.metadata.get("evaluated_by"),
                    "detail": check.metadata.get("detail"),
                }
                for check in facts.checks
                if not check.passed
            ],
            schema_drift=_drift(staged.get(SCHEMA_DRIFT), columns, facts.previous_columns),
            columns=columns,
            stages=stages,
            target=published.get("target") or staged.get("staged_in"),
            load_mode=published.get("load_mode"),
            skipped=published.get("skipped"),
            failures=_failures(facts),
            sync=_sync(staged, facts.published),
        )

    @classmethod
    def _not_staged(cls, facts: RunFacts) -> RunReport:
        """A run without a staged materialization: what Dagster knows of it, no figure made up."""
        published = facts.published or {}
        failed_drift = next(
            (f.metadata[SCHEMA_DRIFT] for f in facts.failures if SCHEMA_DRIFT in f.metadata), None
        )
        return cls(
            **_run_identity(facts),
            staged_at=None,
            score_checks=None,
            score_rows=None,
            counts={
                "read": None,
                "filtered": None,
                "quarantined": None,
                "loaded": None,
                "valid": None,
                # A publish-only run publishes what an earlier run staged.
                "published": int(published["rows_published"]) if "rows_published" in published else None,
            },
            counts_add_up=None,
            rows_by_outcome={},
            filtered_by_step={},
            quarantine_by_reason=[],
            checks_total=0,
            checks_passed=0,
            failed_checks=[],
            schema_drift=_drift(failed_drift, [], None, staged=False),
            columns=[],
            stages=(
                [_stage("publish", published.get("seconds_publish"), published.get("rows_published"))]
                if facts.published is not None
                else []
            ),
            target=published.get("target"),
            load_mode=published.get("load_mode"),
            skipped=published.get("skipped"),
            failures=_failures(facts),
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary_text(self) -> str:
        """A few lines for a terminal."""
        c = self.counts
        failures = [
            f"failed step {failure['step'] or '(none: the run failed outside its steps)'}: "
            f"{failure['error_class'] + ': ' if failure['error_class'] else ''}{' '.join(failure['error'].split())}"
            for failure in self.failures
        ]
        if self.staged_at is None:
            lines = [
                f"pipeline {self.pipeline}, run {self.run_id} ({self.status or 'unknown status'}), staged nothing",
                *failures,
                "rows: unknown (the run recorded no staged materialization)"
                + ("" if c["published"] is None else f"; {c['published']:,} published"),
            ]
            if _drift_changed(self.schema_drift):
                lines.append(f"schema drift: {_drift_text(self.schema_drift)}")
            lines.extend(f"{label}: {url}" for label, url in self.links.items())
            return "\n".join(lines)
        lines = [
            f"pipeline {self.pipeline}, run {self.run_id} ({self.status or 'unknown status'}), staged {self.staged_at}",
            f"score: {self.score_checks:.1%} of checks passed ({self.checks_passed}/{self.checks_total}), "
            f"{self.score_rows:.1%} of rows valid",
            f"rows: {c['read']:,} read = {c['loaded']:,} loaded + {c['filtered']:,} filtered + "
            f"{c['quarantined']:,} quarantined{'' if self.counts_add_up else '  (DO NOT ADD UP)'}; "
            f"{c['published']:,} published",
            *failures,
        ]
        if self.sync is not None:
            lines.append(_sync_text(self.sync))
        for check in self.failed_checks:
            sample = ", ".join(map(str, check["sample_bad_values"])) or check["detail"] or "-"
            lines.append(
                f"failed: {check['name']} ({check['severity']}{', blocking' if check['blocking'] else ''}): "
                f"{check['rows_failed']:,} rows; sample: {sample}"
            )
        for reason in self.quarantine_by_reason:
            lines.append(
                f"quarantined: {reason['rows']:,} at {reason['step']}"
                f"{' / ' + reason['field'] if reason.get('field') else ''}: {reason.get('example') or ''}"
            )
        if _drift_changed(self.schema_drift):
            lines.append(f"schema drift: {_drift_text(self.schema_drift)}")
        lines.append(
            "stages: "
            + ", ".join(
                f"{s.name} {s.seconds:.2f} s"
                + (f" ({s.rows_per_second:,.0f} rows/s)" if s.rows_per_second else "")
                for s in self.stages
                if s.seconds is not None
            )
        )
        for label, url in self.links.items():
            lines.append(f"{label}: {url}")
        return "\n".join(lines)


def _sync(staged: dict[str, Any], published: dict[str, Any] | None) -> dict[str, Any] | None:
    if published is None or published.get("load_mode") != "merge":
        return None
    window = published.get("incremental") or {}
    deletes = staged.get("deletes") or {}
    return {
        **{
            name: published.get(name)
            for name in ("rows_new", "rows_updated", "rows_unchanged", "rows_deleted")
        },
        "cursor": window.get("cursor"),
        "cursor_before": window.get("before"),
        "cursor_after": window.get("after"),
        "full_compare": bool(deletes.get("full_compare")) and not deletes.get("skipped"),
    }


def _sync_text(sync: dict[str, Any]) -> str:
    counts = [
        f"{sync[f'rows_{name}']:,} {name}"
        for name in ("new", "updated", "unchanged", "deleted")
        if sync.get(f"rows_{name}") is not None
    ]
    text = "merge: " + ", ".join(counts)
    if sync["cursor"]:
        text += (
            f"; cursor {sync['cursor']} {sync['cursor_before'] or '(first run)'} -> {sync['cursor_after']}"
        )
    return text + ("; keys compared in full" if sync["full_compare"] else "")


def _stage(name: str, seconds: Any, rows: Any) -> Stage:
    seconds_f = float(seconds) if seconds is not None else None
    rows_i = int(rows) if rows is not None else None
    rate = round(rows_i / seconds_f, 1) if seconds_f and rows_i is not None else None
    return Stage(name, seconds_f, rows_i, rate)


def _iso(timestamp: float | None) -> str | None:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds") if timestamp else None


def _quarantine_by_reason(staged: dict[str, Any]) -> list[dict[str, Any]]:
    recorded = staged.get(QUARANTINE_BY_REASON)
    if isinstance(recorded, list):
        return [dict(entry) for entry in recorded]
    # Runs staged before the reasons were recorded: the counts by step are all there is.
    by_step = staged.get("rows_quarantined_by_step") or {}
    return [{"step": step, "field": None, "rows": rows, "example": None} for step, rows in by_step.items()]


def _failures(facts: RunFacts) -> list[dict[str, Any]]:
    return [
        {"step": failure.step, "error": failure.error, "error_class": failure.error_class}
        for failure in facts.failures
    ]


def _drift_changed(drift: dict[str, Any]) -> bool:
    return bool(drift.get("added") or drift.get("removed") or drift.get("retyped"))


def _drift(
    recorded: Any,
    columns: list[dict[str, str]],
    previous: list[dict[str, str]] | None,
    *,
    staged: bool = True,
) -> dict[str, Any]:
    """The drift the run recorded, else the difference from the previous run's staged schema."""
    if isinstance(recorded, dict):
        return {"source": "recorded by the run", **recorded, **_drift_lists(recorded)}
    if not staged:
        return {"source": "the run staged nothing", "added": [], "removed": [], "retyped": []}
    if previous is None:
        return {"source": "no previous run", "added": [], "removed": [], "retyped": []}
    before = {column["name"]: column["type"] for column in previous}
    now = {column["name"]: column["type"] for column in columns}
    return {
        "source": "compared with the previous run's staged schema",
        "added": [{"name": name, "type": now[name]} for name in now if name not in before],
        "removed": [{"name": name, "type": before[name]} for name in before if name not in now],
        "retyped": [
            {"name": name, "from": before[name], "to": now[name]}
            for name in now
            if name in before and before[name] != now[name]
        ],
    }


def _drift_lists(recorded: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Recorded drift in the report's shape; the factory records mappings (``added: {column: type}``,
    ``retyped: {column: {target, incoming}}``), lists of entries pass as they are."""

    def entries(kind: str) -> list[dict[str, Any]]:
        value = recorded.get(kind) or []
        if not isinstance(value, dict):
            return [entry if isinstance(entry, dict) else {"name": str(entry)} for entry in value]
        if kind != "retyped":
            return [{"name": name, "type": str(kind_of)} for name, kind_of in value.items()]
        return [
            {"name": name, "from": types.get("target"), "to": types.get("incoming")}
            if isinstance(types, dict)
            else {"name": name, "from": None, "to": str(types)}
            for name, types in value.items()
        ]

    return {kind: entries(kind) for kind in ("added", "removed", "retyped")}


def _drift_text(drift: dict[str, Any]) -> str:
    parts = []
    for kind in ("added", "removed", "retyped"):
        for entry in drift.get(kind) or []:
            if isinstance(entry, dict):
                detail = (
                    f"{entry.get('from')} -> {entry.get('to')}"
                    if kind == "retyped"
                    else entry.get("type", "")
                )
                parts.append(f"{kind} {entry.get('name')} {detail}".strip())
            else:
                parts.append(f"{kind} {entry}")
    return "; ".join(parts) or "none"


@dataclass
class HistoryRow:
    """One run in a pipeline's report history: from its staged materialization alone, or - for a
    finished run that staged nothing - its status, end and first failure, every figure None."""

    run_id: str
    status: str | None
    staged_at: str | None
    score_checks: float | None
    score_rows: float | None
    rows_read: int | None
    rows_loaded: int | None
    rows_filtered: int | None
    rows_quarantined: int | None
    schema_changed: bool | None  # columns added, removed or retyped since the run before
    url: str | None = None  # the run's report, where the reader knows it
    ended_at: str | None = None  # set for a run that staged nothing
    failed_step: str | None = None
    error: str | None = None

    @classmethod
    def of_unstaged_run(
        cls, run_id: str, status: str | None, ended_at: float | None, failures: list[StepFailure]
    ) -> HistoryRow:
        first = failures[0] if failures else None
        return cls(
            run_id=run_id,
            status=status,
            staged_at=None,
            score_checks=None,
            score_rows=None,
            rows_read=None,
            rows_loaded=None,
            rows_filtered=None,
            rows_quarantined=None,
            schema_changed=None,
            ended_at=_iso(ended_at),
            failed_step=first.step if first else None,
            error=first.error if first else None,
        )

    @classmethod
    def from_metadata(
        cls,
        run_id: str,
        status: str | None,
        staged_at: float,
        staged: dict[str, Any],
        previous_columns: list[dict[str, str]] | None,
    ) -> HistoryRow:
        drift = _drift(
            staged.get(SCHEMA_DRIFT), _schema_columns(staged.get(COLUMN_SCHEMA)) or [], previous_columns
        )
        changed = (
            None
            if drift["source"] == "no previous run"
            else any(drift.get(kind) for kind in ("added", "removed", "retyped"))
        )
        return cls(
            run_id=run_id,
            status=status,
            staged_at=_iso(staged_at) or "",
            score_checks=staged.get("quality_score_checks"),
            score_rows=staged.get("quality_score_rows"),
            rows_read=staged.get("rows_read"),
            rows_loaded=staged.get("rows_loaded"),
            rows_filtered=staged.get("rows_filtered"),
            rows_quarantined=staged.get("rows_quarantined"),
            schema_changed=changed,
        )


def merge_history(
    staged: list[tuple[float, HistoryRow]], unstaged: list[tuple[float, HistoryRow]], limit: int
) -> tuple[list[HistoryRow], float | None]:
    """One page of history, newest first: staged runs keyed by their staged materialization's time,
    runs that staged nothing by their creation time. Each list holds every row of its kind after the
    cursor up to one more than `limit` (or all there are). Returns the rows and the key of the page's
    last row when older rows follow (the next page's `before`)."""
    merged = sorted([*staged, *unstaged], key=lambda keyed: keyed[0], reverse=True)
    page = merged[:limit]
    return [row for _, row in page], (page[-1][0] if len(merged) > limit else None)


UNSTAGED_STATUSES = ("FAILURE", "CANCELED")  # finished without staging: runs in progress are not history


# --- reading a Dagster instance (the CLI) ----------------------------------------------------------


def facts_from_instance(
    instance: dg.DagsterInstance, pipeline: str, run_id: str | None = None
) -> RunFacts | None:
    """The facts of `run_id` (default: the pipeline's newest run in its history), or None when there is
    no such run of the pipeline."""
    import dagster as dg
    from dagster._core.events import DagsterEventType

    staged_key = dg.AssetKey(staged_asset_name(pipeline))
    if run_id is None:
        newest = history_from_instance(instance, pipeline, limit=1)
        if not newest:
            return None
        run_id = newest[0].run_id
    record = instance.get_run_record_by_id(run_id)
    if record is None:
        return None
    materializations = {
        entry.dagster_event.asset_key: entry
        for entry in instance.all_logs(run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION)
        if entry.dagster_event and entry.dagster_event.asset_key
    }
    staged_entry = materializations.get(staged_key)
    run = record.dagster_run
    failures = failures_from_instance(instance, run_id)
    if staged_entry is None and not is_pipeline_run(
        pipeline,
        run.job_name,
        dict(run.tags),
        [key.path for key in run.asset_selection or ()],
        [failure.step for failure in failures],
    ):
        return None
    published_entry = materializations.get(dg.AssetKey(pipeline))
    checks = []
    for entry in instance.all_logs(run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION):
        evaluation = entry.dagster_event.asset_check_evaluation_data
        if evaluation.asset_key != staged_key:
            continue
        metadata = plain_metadata(dict(evaluation.metadata))
        checks.append(
            CheckFact(
                name=evaluation.check_name,
                passed=evaluation.passed,
                severity=evaluation.severity.value,
                blocking=metadata.pop("blocking", evaluation.blocking),
                description=evaluation.description,
                metadata=metadata,
            )
        )
    previous_columns = None
    if staged_entry is not None:
        previous = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=staged_key, before_timestamp=staged_entry.timestamp), limit=1
        ).records
        if previous and previous[0].asset_materialization:
            previous_columns = _schema_columns(
                plain_metadata(previous[0].asset_materialization.metadata).get(COLUMN_SCHEMA)
            )
    return RunFacts(
        pipeline=pipeline,
        run_id=run_id,
        status=run.status.value,
        started_at=record.start_time,
        ended_at=record.end_time,
        staged_at=staged_entry.timestamp if staged_entry else None,
        staged=plain_metadata(dict(staged_entry.asset_materialization.metadata)) if staged_entry else None,
        published=plain_metadata(dict(published_entry.asset_materialization.metadata))
        if published_entry
        else None,
        checks=checks,
        previous_columns=previous_columns,
        failures=failures,
    )


def failures_from_instance(instance: dg.DagsterInstance, run_id: str) -> list[StepFailure]:
    """The run's failed steps with their errors; the run's own failure only when no step failed."""
    from dagster._core.events import DagsterEventType

    steps, run_failures = [], []
    for entry in instance.all_logs(
        run_id, of_type={DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE}
    ):
        event = entry.dagster_event
        data = event.event_specific_data
        error, chain = getattr(data, "error", None), []
        while error is not None:
            chain.append((error.cls_name, error.message))
            error = error.cause
        if event.event_type == DagsterEventType.STEP_FAILURE:
            user = getattr(data, "user_failure_data", None)
            steps.append(
                StepFailure.from_error(
                    event.step_key,
                    chain,
                    description=user.description if user else None,
                    metadata=plain_metadata(dict(user.metadata)) if user else None,
                )
            )
        else:
            run_failures.append(StepFailure.from_error(None, chain or [(None, entry.user_message)]))
    return steps or run_failures


def history_from_instance(instance: dg.DagsterInstance, pipeline: str, limit: int = 50) -> list[HistoryRow]:
    """The newest `limit` runs of `pipeline` in its history (runs that staged it, and finished runs of
    it that staged nothing), newest first."""
    import dagster as dg
    from dagster._core.events import DagsterEventType

    staged_key = dg.AssetKey(staged_asset_name(pipeline))
    records = instance.fetch_materializations(staged_key, limit=limit + 1).records
    metadata = [plain_metadata(record.asset_materialization.metadata) for record in records]
    statuses = (
        {
            run.run_id: run.status.value
            for run in instance.get_runs(dg.RunsFilter(run_ids=[record.run_id for record in records]))
        }
        if records
        else {}
    )
    staged = [
        (
            record.timestamp,
            HistoryRow.from_metadata(
                record.run_id,
                statuses.get(record.run_id),
                record.timestamp,
                metadata[index],
                _schema_columns(metadata[index + 1].get(COLUMN_SCHEMA)) if index + 1 < len(records) else None,
            ),
        )
        for index, record in enumerate(records)
    ]
    unstaged: list[tuple[float, HistoryRow]] = []
    cursor = None
    while len(unstaged) <= limit:
        page = instance.get_run_records(
            dg.RunsFilter(
                tags={PIPELINE_TAG: pipeline},
                statuses=[dg.DagsterRunStatus(status) for status in UNSTAGED_STATUSES],
            ),
            limit=limit + 1,
            cursor=cursor,
        )
        for run_record in page:
            run_id = run_record.dagster_run.run_id
            materialized = instance.get_records_for_run(
                run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION
            ).records
            if any(r.event_log_entry.dagster_event.asset_key == staged_key for r in materialized):
                continue
            row = HistoryRow.of_unstaged_run(
                run_id,
                run_record.dagster_run.status.value,
                run_record.end_time,
                failures_from_instance(instance, run_id),
            )
            unstaged.append((run_record.create_timestamp.timestamp(), row))
        if len(page) <= limit:
            break
        cursor = page[-1].dagster_run.run_id
    return merge_history(staged, unstaged, limit)[0]


# --- rendering ---------------------------------------------------------------------------------------


def _environment():
    from pathlib import Path

    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    environment.filters["percent"] = lambda value: "-" if value is None else f"{value:.1%}"
    environment.filters["thousands"] = lambda value: "-" if value is None else f"{value:,}"
    environment.filters["compact_json"] = lambda value: json.dumps(value, default=str, ensure_ascii=False)
    return environment


def _svg(chart, tree=None) -> str:
    """A pygal chart as inline SVG without its script and comments (the page runs no script and the
    gateway's CSP forbids it; the comments only credit pygal)."""
    from xml.etree import ElementTree

    root = chart.render_tree() if tree is None else tree
    for parent in root.iter():
        for child in list(parent):
            if not isinstance(child.tag, str) or child.tag.endswith("script"):
                parent.remove(child)
    return ElementTree.tostring(root, encoding="unicode")


def compact_number(value: float) -> str:
    """An axis tick as people write it on a chart: 100k, 2.5M, 0.15 (never a cut-off `100,0…`)."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}"


def _chart_style():
    from pygal.style import Style

    return Style(
        background="white",
        plot_background="white",
        font_family="system-ui, sans-serif",
        colors=("#2e7d32", "#f9a825", "#607d8b", "#c62828", "#1565c0", "#6a1b9a"),
    )


# Room to the right of the longest bar for its value label, as a fraction of the axis.
BAR_LABEL_HEADROOM = 0.3


def _bar(title: str, values: dict[str, float], unit: str = "") -> str:
    """A horizontal bar per value. Ticks are compact (100k); each bar's exact value is written just
    past its end, left-aligned, so a small bar's label does not sit on the axis and a large bar's
    stays inside the chart (the axis runs past the longest bar by `BAR_LABEL_HEADROOM`)."""
    import pygal

    longest = max(values.values(), default=0) or 1
    chart = pygal.HorizontalBar(
        title=title,
        style=_chart_style(),
        height=max(180, 60 + 40 * len(values)),
        width=720,
        show_legend=True,
        legend_at_bottom=True,
        print_values=True,
        value_formatter=compact_number,
        range=(0, longest * (1 + BAR_LABEL_HEADROOM)),
        truncate_label=-1,
        disable_xml_declaration=True,
        js=[],
    )

    def exact(value: float) -> str:
        return f"{value:,.3g}{unit}" if unit else f"{value:,.0f}"

    for label, value in values.items():
        chart.add(label, [value], formatter=exact)
    # pygal draws the value labels in a group of their own per series, after the bars' groups.
    tree = chart.render_tree()
    bar_ends: dict[str, float] = {}
    for group in tree.iter("g"):
        serie = " ".join(group.get("class", "").split()[:2])  # "series serie-3"
        if not serie.startswith("series "):
            continue
        for rect in group.iter("rect"):
            bar_ends[serie] = float(rect.get("x", 0)) + float(rect.get("width", 0))
        for text in group.iter("text"):
            if text.get("class") == "value" and serie in bar_ends:
                text.set("x", f"{bar_ends[serie] + 4:.1f}")
                text.set("text-anchor", "start")
    return _svg(chart, tree)


def report_charts(report: RunReport) -> dict[str, str]:
    """The page's charts; a run that staged nothing has no figures to draw but its publish's."""
    charts = {}
    if report.rows_by_outcome:
        charts["rows by outcome"] = _bar("Rows by outcome", report.rows_by_outcome)
    if report.quarantine_by_reason:
        charts["quarantine by reason"] = _bar(
            "Quarantined rows by step and field",
            {
                f"{entry['step']}{' / ' + entry['field'] if entry.get('field') else ''}": entry["rows"]
                for entry in report.quarantine_by_reason
            },
        )
    seconds = {stage.name: stage.seconds for stage in report.stages if stage.seconds is not None}
    if seconds:
        charts["stage durations"] = _bar("Seconds per stage", seconds, " s")
    return charts


def render_report_html(report: RunReport, *, links: dict[str, str] | None = None) -> str:
    """One self-contained page: the run's figures and charts (inline SVG), every value escaped."""
    template = _environment().get_template("report.html")
    return template.render(report=report, charts=report_charts(report), links=links or report.links)


def history_chart(rows: list[HistoryRow]) -> str:
    import pygal

    oldest_first = list(reversed(rows))
    chart = pygal.Line(
        title="Quality score by run",
        style=_chart_style(),
        height=320,
        width=900,
        range=(0, 100),
        x_label_rotation=30,
        legend_at_bottom=True,
        value_formatter=lambda value: f"{value:.1f}%",
        disable_xml_declaration=True,
        js=[],
    )
    chart.x_labels = [(row.staged_at or row.ended_at or "").replace("T", " ")[:16] for row in oldest_first]
    chart.add(
        "checks passed", [None if r.score_checks is None else 100 * r.score_checks for r in oldest_first]
    )
    chart.add("rows valid", [None if r.score_rows is None else 100 * r.score_rows for r in oldest_first])
    return _svg(chart)


def render_history_html(pipeline: str, rows: list[HistoryRow], *, older: str | None = None) -> str:
    """The history page: the score chart and one row per run (newest first) linking to its report."""
    template = _environment().get_template("history.html")
    return template.render(
        pipeline=pipeline, rows=rows, chart=history_chart(rows) if rows else None, older=older
    )
