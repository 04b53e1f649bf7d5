"""How `junction pipelines run` and `junction workflows run` show a run: one line per log entry as the
run goes, and a failure as one line naming the step and the error, with where the full log is.

Dagster's console logger prints a failed step's whole traceback, which buries the one line a person
needs. The CLIs run with that logger quiet (`QUIET_CONSOLE`) and print the run's event log
themselves; the tracebacks go to a file under `$JUNCTION_HOME/logs/` and stay in the Dagster UI.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

# Run config that keeps Dagster's console logger silent: the CLI prints the event log instead.
QUIET_CONSOLE: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
POLL_INTERVAL_S = 0.2
STEP_VERBS = {
    "STEP_START": "started",
    "STEP_SUCCESS": "succeeded",
    "STEP_SKIPPED": "skipped",
    "STEP_UP_FOR_RETRY": "up for retry",
    "STEP_RESTARTED": "restarted",
}


def root_cause(error: Any) -> str:
    """The innermost error's message, one line (Dagster wraps a step's own exception in its own)."""
    while error.cause is not None or error.context is not None:
        error = error.cause or error.context
    first = " ".join(error.message.split())
    # "orchestration.errors.JunctionError: no file matches ..." -> "no file matches ..."
    kind, separator, message = first.partition(": ")
    return message if separator and kind.rpartition(".")[2] == error.cls_name else first


def entry_line(record: Any) -> str | None:
    """One line for an event log entry, or None for those a person does not follow (engine noise)."""
    event = record.dagster_event
    if event is None:
        return f"  {record.user_message}"
    if event.is_step_failure:
        return f"  {event.step_key}: failed: {root_cause(event.step_failure_data.error)}"
    if event.event_type_value in STEP_VERBS:
        return f"  {event.step_key}: {STEP_VERBS[event.event_type_value]}"
    if event.event_type_value == "RUN_FAILURE" and event.event_specific_data.error is not None:
        return f"  run failed: {root_cause(event.event_specific_data.error)}"
    return None


def follow_run(instance: Any, run_id: str, execute: Callable[[], Any]) -> Any:
    """Call `execute` (which runs `run_id`) in a thread, printing the run's log lines to stderr as
    they are written; returns what `execute` returned, or raises what it raised."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = execute()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"run-{run_id[:8]}", daemon=True)
    thread.start()
    shown = 0
    while True:
        alive = thread.is_alive()
        records = instance.all_logs(run_id)
        for record in records[shown:]:
            line = entry_line(record)
            if line is not None:
                click.echo(line, err=True)
        shown = len(records)
        if not alive:
            break
        time.sleep(POLL_INTERVAL_S)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def failure_line(instance: Any, run_id: str) -> str:
    """`step: error` of the run's first failed step, else its run failure message."""
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event is not None and event.is_step_failure:
            return f"step {event.step_key} failed: {root_cause(event.step_failure_data.error)}"
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event is not None and event.event_type_value == "RUN_FAILURE":
            error = event.event_specific_data.error
            return root_cause(error) if error is not None else record.user_message
    return "the run did not succeed (no step failed: it was canceled or never started)"


def write_full_log(instance: Any, run_id: str, logs_dir: Path) -> Path:
    """Every entry of the run's event log, tracebacks included, as text in `logs_dir/<run_id>.log`."""
    logs_dir.mkdir(parents=True, exist_ok=True)
    path = logs_dir / f"{run_id}.log"
    lines = []
    for record in instance.all_logs(run_id):
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.timestamp))
        event = record.dagster_event
        step = f" {record.step_key}" if record.step_key else ""
        kind = f" {event.event_type_value}" if event is not None else ""
        lines.append(f"{stamp}{step}{kind} - {record.user_message}")
        error = None
        if event is not None and event.is_step_failure:
            error = event.step_failure_data.error
        elif event is not None and event.event_type_value == "RUN_FAILURE":
            error = event.event_specific_data.error
        if error is not None:
            lines.append(error.to_string().rstrip())
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def fail_with_run_error(instance: Any, run_id: str, hint: str = "") -> None:
    """Exit 1 with one line: the run's error, where its full log is (file and Dagster UI), a hint."""
    from orchestration.settings import get_settings

    settings = get_settings()
    log_file = write_full_log(instance, run_id, settings.home_dir / "logs")
    message = (
        f"run {run_id} failed: {failure_line(instance, run_id)}\n"
        f"full log: {log_file} (and {settings.public_url}/runs/{run_id} in the Dagster UI){hint}"
    )
    raise click.ClickException(message)
