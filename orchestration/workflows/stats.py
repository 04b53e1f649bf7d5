"""Workflow statistics, grouped by execution (all runs sharing `junction/execution_id`), not by run.

One execution may span several runs (parking), so run counts say little about a workflow. Here the
runs of a workflow are grouped by execution and each execution gets:

- a status: `running` (a run of it is queued or busy), `waiting` (its last run parked it, and its
  checkpoint still waits), else its last run's outcome: `succeeded`, `failed` or `canceled`;
- wall time: the first run's start to the last run's end (parked time included), and active time:
  the sum of its runs' durations (what it cost in run workers);
- what it waits on (the parked step, its type — approval, delay, sync —, since when and until when);
- per step: failures (Dagster's STEP_FAILURE, plus failures let through by `continue_on_failure`)
  and retries (Dagster's step attempts beyond the first).

The figures come from Dagster's run storage (runs, tags, step stats built from step events) and the
platform store's checkpoints. Two sources of run records feed the same functions: the Dagster
instance (CLI, the `workflow_statistics` platform asset) and the gateway's GraphQL client
(`runs_from_graphql`), so every view computes the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from orchestration.workflows.context import EXECUTION_ID_TAG, FAILED_STEPS_TAG, WORKFLOW_TAG
from orchestration.workflows.parking import PARKED_STEP_TAG, STATE_TAG, WAITING, WAITING_ON_TAG, Checkpoint

if TYPE_CHECKING:
    import dagster as dg

# Dagster run statuses (`DagsterRunStatus` values) after which a run does nothing more.
FINISHED_RUN_STATUSES = frozenset({"SUCCESS", "FAILURE", "CANCELED"})
EXECUTION_STATUSES = ("running", "waiting", "succeeded", "failed", "canceled")
TERMINAL = frozenset({"succeeded", "failed", "canceled"})
# How many runs (newest first) a statistics call reads by default.
DEFAULT_RUN_LIMIT = 5000


@dataclass(frozen=True)
class StepRecord:
    key: str
    status: str | None
    attempts: int


@dataclass(frozen=True)
class RunRecord:
    """What the statistics need of one Dagster run, whichever way it was read."""

    run_id: str
    status: str
    created_at: float
    started_at: float | None
    ended_at: float | None
    tags: Mapping[str, str]
    steps: tuple[StepRecord, ...] = ()

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_RUN_STATUSES

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None or self.ended_at is None:
            return None
        return max(0.0, self.ended_at - self.started_at)


@dataclass(frozen=True)
class Waiting:
    step_id: str
    kind: str  # the parked step's type: approval, delay, sync
    since: datetime | None
    wake_at: datetime | None
    summary: str = ""  # the parked run's junction/waiting_on tag


@dataclass(frozen=True)
class Execution:
    execution_id: str
    workflow: str
    status: str
    runs: int
    run_ids: tuple[str, ...]
    started_at: datetime | None
    ended_at: datetime | None
    wall_s: float | None
    active_s: float
    waiting: Waiting | None
    failed_steps: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


@dataclass(frozen=True)
class StepStats:
    step_id: str
    failures: int
    failed_and_continued: int
    retries: int


@dataclass(frozen=True)
class WaitingOn:
    step_id: str
    kind: str
    executions: int


@dataclass(frozen=True)
class WorkflowStats:
    workflow: str
    executions: int
    by_status: dict[str, int]
    success_rate: float | None
    wall_p50_s: float | None
    wall_p95_s: float | None
    active_p50_s: float | None
    active_p95_s: float | None
    waiting: int
    waiting_on: tuple[WaitingOn, ...]
    steps: tuple[StepStats, ...]
    runs: int

    def to_json(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _moment(seconds: float | None) -> datetime | None:
    return datetime.fromtimestamp(seconds, UTC) if seconds is not None else None


def group_executions(runs: Iterable[RunRecord]) -> dict[str, list[RunRecord]]:
    """Runs by execution id, each execution's runs oldest first. A run without the tag (one that
    never started its first op) is its own execution."""
    grouped: dict[str, list[RunRecord]] = {}
    for run in runs:
        grouped.setdefault(run.tags.get(EXECUTION_ID_TAG) or run.run_id, []).append(run)
    for execution_runs in grouped.values():
        execution_runs.sort(key=lambda run: run.created_at)
    return grouped


def summarize_execution(
    execution_id: str,
    runs: Sequence[RunRecord],
    checkpoint: Checkpoint | None = None,
    step_types: Mapping[str, str] | None = None,
) -> Execution:
    """One execution from its runs (oldest first) and its checkpoint, if it has one."""
    last = runs[-1]
    waiting = None
    if any(not run.finished for run in runs):
        status = "running"
    elif last.tags.get(STATE_TAG) == WAITING and (checkpoint is None or checkpoint.state == WAITING):
        status = "waiting"
        step_id = (checkpoint.parked_step if checkpoint else None) or last.tags.get(PARKED_STEP_TAG, "?")
        waiting = Waiting(
            step_id=step_id,
            kind=(step_types or {}).get(step_id, "unknown"),
            since=_moment(last.ended_at),
            wake_at=checkpoint.wake_at if checkpoint else None,
            summary=last.tags.get(WAITING_ON_TAG, ""),
        )
    else:
        status = {"SUCCESS": "succeeded", "FAILURE": "failed", "CANCELED": "canceled"}[last.status]
    starts = [run.started_at for run in runs if run.started_at is not None]
    ends = [run.ended_at for run in runs if run.ended_at is not None]
    started_at = min(starts) if starts else None
    ended_at = max(ends) if ends and status in TERMINAL else None
    failed_steps: list[str] = []
    for run in runs:
        for step in run.steps:
            if step.status == "FAILURE" and step.key not in failed_steps:
                failed_steps.append(step.key)
        for step_id in filter(None, run.tags.get(FAILED_STEPS_TAG, "").split(",")):
            if step_id not in failed_steps:
                failed_steps.append(step_id)
    return Execution(
        execution_id=execution_id,
        workflow=last.tags.get(WORKFLOW_TAG, ""),
        status=status,
        runs=len(runs),
        run_ids=tuple(run.run_id for run in runs),
        started_at=_moment(started_at),
        ended_at=_moment(ended_at),
        wall_s=round(ended_at - started_at, 3) if started_at is not None and ended_at is not None else None,
        active_s=round(sum(run.duration_s or 0.0 for run in runs), 3),
        waiting=waiting,
        failed_steps=tuple(failed_steps),
    )


def executions_of(
    runs: Iterable[RunRecord],
    checkpoints: Mapping[str, Checkpoint] | None = None,
    step_types: Mapping[str, str] | None = None,
) -> list[Execution]:
    """Every execution among `runs`, newest first."""
    checkpoints = checkpoints or {}
    grouped = group_executions(runs)
    ordered = sorted(grouped.items(), key=lambda item: item[1][0].created_at, reverse=True)
    return [
        summarize_execution(execution_id, execution_runs, checkpoints.get(execution_id), step_types)
        for execution_id, execution_runs in ordered
    ]


def _percentiles(values: list[float]) -> tuple[float | None, float | None]:
    from orchestration.gateway.metrics import percentiles

    if not values:
        return None, None
    p50, p95, _ = percentiles(values)
    return round(p50, 3), round(p95, 3)


def workflow_stats(
    workflow: str, runs: Sequence[RunRecord], executions: Sequence[Execution]
) -> WorkflowStats:
    """The statistics of one workflow from its runs and their executions (`executions_of`)."""
    by_status = {status: 0 for status in EXECUTION_STATUSES}
    for execution in executions:
        by_status[execution.status] += 1
    finished = [execution for execution in executions if execution.status in TERMINAL]
    wall_p50, wall_p95 = _percentiles([e.wall_s for e in finished if e.wall_s is not None])
    active_p50, active_p95 = _percentiles([e.active_s for e in finished])
    waiting_on: dict[tuple[str, str], int] = {}
    for execution in executions:
        if execution.waiting is not None:
            key = (execution.waiting.step_id, execution.waiting.kind)
            waiting_on[key] = waiting_on.get(key, 0) + 1
    failures: dict[str, int] = {}
    continued: dict[str, int] = {}
    retries: dict[str, int] = {}
    for run in runs:
        for step in run.steps:
            failures.setdefault(step.key, 0)
            retries[step.key] = retries.get(step.key, 0) + max(0, step.attempts - 1)
            if step.status == "FAILURE":
                failures[step.key] += 1
        for step_id in filter(None, run.tags.get(FAILED_STEPS_TAG, "").split(",")):
            continued[step_id] = continued.get(step_id, 0) + 1
    step_ids = sorted(set(failures) | set(continued))
    return WorkflowStats(
        workflow=workflow,
        executions=len(executions),
        by_status=by_status,
        success_rate=round(by_status["succeeded"] / len(finished), 4) if finished else None,
        wall_p50_s=wall_p50,
        wall_p95_s=wall_p95,
        active_p50_s=active_p50,
        active_p95_s=active_p95,
        waiting=by_status["waiting"],
        waiting_on=tuple(
            WaitingOn(step_id=step_id, kind=kind, executions=count)
            for (step_id, kind), count in sorted(waiting_on.items())
        ),
        steps=tuple(
            StepStats(
                step_id=step_id,
                failures=failures.get(step_id, 0),
                failed_and_continued=continued.get(step_id, 0),
                retries=retries.get(step_id, 0),
            )
            for step_id in step_ids
        ),
        runs=len(runs),
    )


# --- reading the sources --------------------------------------------------------------------------


def runs_from_instance(
    instance: dg.DagsterInstance,
    workflow: str | None = None,
    limit: int = DEFAULT_RUN_LIMIT,
    progress: Callable[[int, int], None] | None = None,
) -> list[RunRecord]:
    """The runs of `workflow` (every workflow when None), newest first, with their step stats;
    `progress(done, total)` is called every few hundred runs (one event-log query each)."""
    import dagster as dg

    from orchestration.workflows.context import KIND_TAG

    tags = {WORKFLOW_TAG: workflow} if workflow else {KIND_TAG: "workflow"}
    records = []
    run_records = instance.get_run_records(filters=dg.RunsFilter(tags=tags), limit=limit)
    for index, run_record in enumerate(run_records):
        if progress is not None and index and index % 250 == 0:
            progress(index, len(run_records))
        run = run_record.dagster_run
        steps = tuple(
            StepRecord(
                key=step.step_key, status=step.status.value if step.status else None, attempts=_attempts(step)
            )
            for step in instance.get_run_step_stats(run.run_id)
        )
        records.append(
            RunRecord(
                run_id=run.run_id,
                status=run.status.value,
                created_at=run_record.create_timestamp.timestamp(),
                started_at=run_record.start_time,
                ended_at=run_record.end_time,
                tags=dict(run.tags),
                steps=steps,
            )
        )
    return records


def _attempts(step: Any) -> int:
    # Closed attempts (up-for-retry, failure, success); a step still running has an open one.
    return max(1, len(step.attempts_list))


# The GraphQL selection the gateway asks Dagster for (`runs_from_graphql` reads it).
RUN_FIELDS = (
    "runId status creationTime startTime endTime tags { key value } "
    "stepStats { stepKey status attempts { startTime } }"
)


def runs_from_graphql(results: Iterable[Mapping[str, Any]]) -> list[RunRecord]:
    """Run records from Dagster GraphQL `Run` objects selected with `RUN_FIELDS`."""
    return [
        RunRecord(
            run_id=run["runId"],
            status=run["status"],
            created_at=run["creationTime"],
            started_at=run["startTime"],
            ended_at=run["endTime"],
            tags={tag["key"]: tag["value"] for tag in run["tags"]},
            steps=tuple(
                StepRecord(key=step["stepKey"], status=step["status"], attempts=max(1, len(step["attempts"])))
                for step in run["stepStats"]
            ),
        )
        for run in results
    ]


def checkpoints_by_execution(execution_ids: Iterable[str], *, engine=None) -> dict[str, Checkpoint]:
    from orchestration.workflows.parking import checkpoints_of

    return {
        checkpoint.execution_id: checkpoint
        for checkpoint in checkpoints_of(list(execution_ids), engine=engine)
    }


def step_types_of(workflows_dir) -> dict[str, dict[str, str]]:
    """`{workflow: {step_id: step type}}` of the specs in `workflows_dir` (to say what a parked
    execution waits on)."""
    from orchestration.workflows.spec import load_workflows, workflow_files

    return {
        spec.name: {step.id: step.type for step in spec.steps}
        for spec in load_workflows(workflow_files(workflows_dir)).values()
    }


@dataclass(frozen=True)
class Report:
    """Statistics and executions of every workflow found in a set of runs."""

    stats: dict[str, WorkflowStats]
    executions: dict[str, list[Execution]]


def build_report(
    runs: Sequence[RunRecord],
    step_types: Mapping[str, Mapping[str, str]],
    *,
    workflows: Iterable[str] = (),
    engine=None,
) -> Report:
    """Group `runs` by workflow, then by execution; `workflows` are reported even without runs."""
    by_workflow: dict[str, list[RunRecord]] = {name: [] for name in workflows}
    for run in runs:
        by_workflow.setdefault(run.tags.get(WORKFLOW_TAG, ""), []).append(run)
    execution_ids = {run.tags.get(EXECUTION_ID_TAG) or run.run_id for run in runs}
    checkpoints = checkpoints_by_execution(execution_ids, engine=engine) if execution_ids else {}
    stats, executions = {}, {}
    for name, workflow_runs in sorted(by_workflow.items()):
        executions[name] = executions_of(workflow_runs, checkpoints, step_types.get(name))
        stats[name] = workflow_stats(name, workflow_runs, executions[name])
    return Report(stats=stats, executions=executions)
