"""Parking: a step that waits (Delay, Approval) ends its run instead of holding a worker.

The run's steps save their states in the execution's checkpoint (`workflow_checkpoints`) as they
complete. A parking step raises `ParkStep`: the factory marks the checkpoint `waiting` (with the
parked step, the parked run and when to wake up), tags the run `junction/state=waiting` and yields
nothing, so the run ends successfully with the steps after the parked one skipped. The resume sensor
(`resume.py`) launches a fresh run of the same job once `wake_at` has passed; in that run every step
found in the checkpoint returns its saved state at once, and execution continues after the parked
step. An approval decided early moves `wake_at` to the decision's time; a Sync step parks on its child
run (`waiting_on_run_id`), and the sensor resumes once that run has finished.

Nothing waits in memory: a parked execution is one row, so it survives a restart of the platform.

The store (SQLAlchemy's ORM and the models) is imported by the functions that use it: the workflow
factory imports this module's names when the code location loads, in every run worker, and most
runs never touch a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session

    from orchestration.store.models import WorkflowCheckpoint

# Run tags. Dagster has no suspended status: a parked run ends SUCCESS, so these tags are how the
# Runs page tells the run an execution waits on now (`junction/state=waiting`, exactly one per
# waiting execution) from the runs it has moved past (`resumed`, with `junction/resumed_by`).
STATE_TAG = "junction/state"
WAITING = "waiting"
RUNNING = "running"
RESUMED = "resumed"
PARKED_STEP_TAG = "junction/parked_step"
WAITING_ON_TAG = "junction/waiting_on"  # a person's summary: "approval f6d5…: 0 of 2 from finance, until …"
RESUMED_FROM_TAG = "junction/resumed_from"
RESUMED_STEP_TAG = "junction/resumed_step"
RESUMED_BY_TAG = "junction/resumed_by"
RESTORED = "restored from checkpoint"
# The optional output a parking step yields instead of its result: its metadata says what it waits
# for and how to move it on (nothing depends on it, so the steps after it are still skipped).
PARKED_OUTPUT = "parked"


class ParkStep(Exception):  # noqa: N818 - a signal to the factory, not an error
    """Raised by a parking step: end the run here and wake the execution at `wake_at` (None: when an
    outside event, such as an approval decision, sets it), or once the run `waiting_on_run_id` (a Sync
    step's child run) has finished.

    `summary` is the short line the run's `junction/waiting_on` tag shows; `guidance` the lines that
    tell a person what moves the execution on (the CLI command and API call deciding an approval,
    the time a delay wakes)."""

    def __init__(
        self,
        reason: str,
        wake_at: datetime | None,
        waiting_on_run_id: str | None = None,
        *,
        summary: str | None = None,
        guidance: tuple[str, ...] = (),
    ):
        super().__init__(reason)
        self.reason = reason
        self.wake_at = wake_at
        self.waiting_on_run_id = waiting_on_run_id
        self.summary = summary or reason
        self.guidance = guidance


def short_id(identifier: str) -> str:
    """The first 8 characters of an id, as the Dagster UI shows run ids."""
    return identifier[:8] + "…" if len(identifier) > 8 else identifier


def moment_text(moment: datetime) -> str:
    """A wake-up or timeout time for a person: `2026-12-06 09:00 UTC`."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def mark_resumed(instance: Any, parked_run_id: str, by_run_id: str) -> None:
    """Retag the run an execution was parked on, now that `by_run_id` has resumed it: it no longer
    waits. (Dagster cannot remove a tag, so `junction/waiting_on` is overwritten, not dropped.)"""
    instance.add_run_tags(
        parked_run_id,
        {
            STATE_TAG: RESUMED,
            RESUMED_BY_TAG: by_run_id,
            WAITING_ON_TAG: f"nothing: resumed by run {short_id(by_run_id)}",
        },
    )


def utc_now() -> datetime:
    """The clock of parking decisions (one function, so tests can move it forward)."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class Checkpoint:
    execution_id: str
    workflow: str
    inputs: dict[str, Any]
    step_outputs: dict[str, Any]
    state: str
    parked_step: str | None
    parked_run_id: str | None
    wake_at: datetime | None
    waiting_on_run_id: str | None = None

    @property
    def resume_run_key(self) -> str:
        return f"resume:{self.execution_id}:{self.parked_step}"


def _checkpoint(row: WorkflowCheckpoint) -> Checkpoint:
    return Checkpoint(
        execution_id=row.execution_id,
        workflow=row.workflow,
        inputs=dict(row.inputs),
        step_outputs=dict(row.step_outputs),
        state=row.state,
        parked_step=row.parked_step,
        parked_run_id=row.parked_run_id,
        wake_at=row.wake_at,
        waiting_on_run_id=row.waiting_on_run_id,
    )


def _row(session: Session, execution_id: str, workflow: str, inputs: dict[str, Any]) -> WorkflowCheckpoint:
    from orchestration.store.models import WorkflowCheckpoint

    row = session.get(WorkflowCheckpoint, execution_id, with_for_update=True)
    if row is None:
        now = utc_now()
        row = WorkflowCheckpoint(
            execution_id=execution_id,
            workflow=workflow,
            inputs=inputs,
            step_outputs={},
            state=RUNNING,
            created_at=now,
            updated_at=now,
        )
        session.add(row)
    return row


def get_checkpoint(execution_id: str, *, engine: Engine | None = None) -> Checkpoint | None:
    from orchestration.store.db import session_scope
    from orchestration.store.models import WorkflowCheckpoint

    with session_scope(engine) as session:
        row = session.get(WorkflowCheckpoint, execution_id)
        return _checkpoint(row) if row is not None else None


def save_step_state(
    execution_id: str,
    workflow: str,
    inputs: dict[str, Any],
    step_id: str,
    state: dict[str, Any] | None,
    output_name: str | None,
    *,
    engine: Engine | None = None,
) -> None:
    """Record a completed step (`output_name` None: it yielded nothing, its `when` was false).

    `completed` numbers the steps in the order they completed, across the runs of the execution:
    compensations run in the reverse of it."""
    from orchestration.store.db import session_scope

    with session_scope(engine, write_lock=True) as session:
        row = _row(session, execution_id, workflow, inputs)
        entry = {"state": state, "output_name": output_name, "completed": len(row.step_outputs) + 1}
        # A new dict: SQLAlchemy only notices a JSON column change when the value is replaced.
        row.step_outputs = {**row.step_outputs, step_id: entry}
        row.updated_at = utc_now()


def park(
    execution_id: str,
    workflow: str,
    inputs: dict[str, Any],
    step_id: str,
    run_id: str,
    wake_at: datetime | None,
    *,
    waiting_on_run_id: str | None = None,
    engine: Engine | None = None,
) -> None:
    from orchestration.store.db import session_scope

    with session_scope(engine, write_lock=True) as session:
        row = _row(session, execution_id, workflow, inputs)
        row.state = WAITING
        row.parked_step = step_id
        row.parked_run_id = run_id
        row.wake_at = wake_at
        row.waiting_on_run_id = waiting_on_run_id
        row.updated_at = utc_now()


def wake_now(session: Session, execution_id: str, step_id: str) -> None:
    """Make a waiting execution due at once (an approval was decided), inside the caller's transaction."""
    from sqlalchemy import update

    from orchestration.store.models import WorkflowCheckpoint

    now = utc_now()
    session.execute(
        update(WorkflowCheckpoint)
        .where(WorkflowCheckpoint.execution_id == execution_id)
        .where(WorkflowCheckpoint.state == WAITING)
        .where(WorkflowCheckpoint.parked_step == step_id)
        .values(wake_at=now, updated_at=now)
    )


def begin_resumed_run(execution_id: str, resumed_step: str, *, engine: Engine | None = None) -> bool:
    """The resumed run has started: the execution is no longer waiting, so the sensor stops asking.
    True for the call that moved it (the run's first op), False for the later ones."""
    from sqlalchemy import update

    from orchestration.store.db import session_scope
    from orchestration.store.models import WorkflowCheckpoint

    with session_scope(engine) as session:
        result = session.execute(
            update(WorkflowCheckpoint)
            .where(WorkflowCheckpoint.execution_id == execution_id)
            .where(WorkflowCheckpoint.state == WAITING)
            .where(WorkflowCheckpoint.parked_step == resumed_step)
            .values(state=RUNNING, updated_at=utc_now())
        )
        return result.rowcount == 1


def due_checkpoints(now: datetime, workflows: set[str], *, engine: Engine | None = None) -> list[Checkpoint]:
    """Waiting executions of `workflows` whose wake-up time has come, oldest first, and those waiting
    on a run (the caller checks whether that run has finished)."""
    from sqlalchemy import or_, select

    from orchestration.store.db import session_scope
    from orchestration.store.models import WorkflowCheckpoint

    statement = (
        select(WorkflowCheckpoint)
        .where(WorkflowCheckpoint.state == WAITING)
        .where(or_(WorkflowCheckpoint.wake_at <= now, WorkflowCheckpoint.waiting_on_run_id.is_not(None)))
        .where(WorkflowCheckpoint.workflow.in_(sorted(workflows)))
        .order_by(WorkflowCheckpoint.updated_at)
    )
    with session_scope(engine) as session:
        return [_checkpoint(row) for row in session.scalars(statement)]


def checkpoints_of(execution_ids: list[str], *, engine: Engine | None = None) -> list[Checkpoint]:
    """The checkpoints of these executions (those that have one: executions of parkable workflows)."""
    from sqlalchemy import select

    from orchestration.store.db import session_scope
    from orchestration.store.models import WorkflowCheckpoint

    found = []
    with session_scope(engine) as session:
        # In slices: a statement's bound parameters are limited (SQLite, drivers).
        for start in range(0, len(execution_ids), 500):
            statement = select(WorkflowCheckpoint).where(
                WorkflowCheckpoint.execution_id.in_(execution_ids[start : start + 500])
            )
            found.extend(_checkpoint(row) for row in session.scalars(statement))
    return found
