"""Custom Script steps that run an external program through Dagster Pipes: outputs and metadata flow
back into the context and the run's events; a non-zero exit fails with the stderr tail; a timeout
kills the program's whole process group."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

PROGRAMS = Path(__file__).parent / "pipes_programs"


def program_workflow(program: str, **config: Any) -> dict[str, Any]:
    step = {
        "id": "external",
        "type": "custom_script",
        "config": {"command": ["python", str(PROGRAMS / program)], **config},
    }
    return {
        "name": "pipes_flow",
        "inputs": {"who": {"type": "string", "default": "world"}},
        "steps": [
            step,
            {
                "id": "after",
                "type": "conditional",
                "depends_on": ["external"],
                "config": {
                    "condition": {"field": "steps.external.output.outputs.count", "op": "eq", "value": 2}
                },
            },
        ],
    }


def failure_text(run) -> str:
    failure = run.result.get_step_failure_events()[0]
    return str(failure.event_specific_data.user_failure_data.description)


def test_outputs_metadata_and_materializations_flow_back(run_spec, tmp_path, monkeypatch):
    monkeypatch.setenv("JUNCTION_TEST_GREETING", "from-the-run")
    echo = tmp_path / "echo.txt"
    spec = program_workflow(
        "report.py",
        arguments={"who": "{{ inputs.who }}", "echo_file": str(echo)},
        env={"JUNCTION_TEST_EXTRA": "{{ run.id }}"},
        cwd=str(tmp_path),
    )
    run = run_spec(spec, who="ann")
    assert run.result.success
    output = run.output("external")["output"]
    # Later custom messages win per key; a message of another shape is kept, not dropped.
    assert output["outputs"] == {"greeting": "hello ann", "count": 2}
    assert output["metadata"] == {"rows": 42, "table": "orders"}
    assert output["messages"] == [["something", "else"]]
    assert output["materializations"] == [{"asset_key": "pipes_report", "metadata": {"rows": 42}}]
    assert output["exit_code"] == 0
    # The next step reads the program's outputs from the context.
    assert run.output("after", "then")["output"]["matched"] is True

    # The op's output metadata in the UI carries the reported metadata beside the output.
    metadata = run.metadata("external")
    assert metadata["rows"] == 42 and metadata["table"] == "orders"
    assert metadata["output"]["outputs"]["greeting"] == "hello ann"
    # The materialization is an event of the op, so the asset catalog shows it.
    (materialization,) = run.result.asset_materializations_for_node("external")
    assert materialization.asset_key == dg.AssetKey("pipes_report")
    assert materialization.metadata["rows"].value == 42
    logs = [record.user_message for record in run.instance.all_logs(run.result.run_id)]
    assert any("hello from pid" in message for message in logs), "the program's log reached the run"
    # Environment (the run's plus `env`), working directory and extras reached the program.
    greeting, cwd, execution_id, who = echo.read_text().strip().split("|")
    assert greeting == "from-the-run" and Path(cwd) == tmp_path
    assert execution_id == run.result.run_id and who == "ann"


def test_a_non_zero_exit_fails_with_the_stderr_tail(run_spec):
    run = run_spec(program_workflow("fail.py"))
    assert not run.result.success
    text = failure_text(run)
    assert "fail.py exited with code 3" in text
    assert "the ledger is closed" in text and "noise 29" in text
    assert "noise 0" not in text, "only the tail of stderr"
    assert "after" not in run.statuses(), "nothing after a failed step runs"


def test_a_timeout_kills_the_process_group(run_spec, tmp_path):
    pid_file = tmp_path / "child.pid"
    started = time.monotonic()
    run = run_spec(program_workflow("hang.py", arguments={"pid_file": str(pid_file)}, timeout_s=3))
    elapsed = time.monotonic() - started
    assert not run.result.success
    assert "did not finish within 3 s; its process group was killed" in failure_text(run)
    assert elapsed < 20
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.1)
    assert not _alive(child), "the program's own child was killed with it"


def test_the_step_timeout_bounds_the_program(run_spec, tmp_path):
    spec = program_workflow("hang.py", arguments={"pid_file": str(tmp_path / "pid")}, timeout_s=300)
    spec["steps"][0]["timeout_s"] = 3
    started = time.monotonic()
    run = run_spec(spec)
    assert not run.result.success
    assert "its process group was killed" in failure_text(run)
    assert time.monotonic() - started < 20


def test_a_missing_program_is_named(run_spec):
    spec = program_workflow("report.py")
    spec["steps"][0]["config"]["command"] = ["/nonexistent/junction-program"]
    run = run_spec(spec)
    assert "cannot start '/nonexistent/junction-program'" in failure_text(run)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "set either callable (a project function) or command (a Pipes program)"),
        (
            {"callable": "a.b:c", "command": ["python", "x.py"]},
            "set either callable (a project function) or command (a Pipes program)",
        ),
        ({"callable": "a.b:c", "timeout_s": 5}, "timeout_s: only for a command, not a callable"),
        ({"command": []}, "at least 1 item"),
    ],
)
def test_config_errors(config, message):
    from orchestration.kernel.spec_errors import SpecError
    from orchestration.workflows.spec import parse_workflow

    spec = {"name": "bad", "steps": [{"id": "s", "type": "custom_script", "config": config}]}
    with pytest.raises(SpecError, match="steps\\[0\\]") as caught:
        parse_workflow(spec, "bad.yaml")
    assert message in str(caught.value)


def test_the_shipped_example_runs(run_spec):
    from orchestration.kernel.spec_errors import read_yaml

    spec = read_yaml(Path(__file__).parents[2] / "orchestration/workflows/order_totals.yaml")
    run = run_spec(spec)
    assert run.result.success
    summary = run.output("summarize")["output"]["outputs"]
    assert summary == {"count": 2, "total": 2050.0, "large_orders": ["A-2"], "large_count": 1}
    assert run.output("list_large")["output"]["records"] == [{"id": "A-2", "amount": 1800}]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child of a dead parent is reaped by init; a zombie still answers kill(0).
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
