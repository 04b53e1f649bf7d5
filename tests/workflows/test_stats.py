"""Workflow statistics over real executions on a real Dagster instance and platform store: a success
with a retried step, a failure, a parked execution, one resumed after its delay; the CLI's views."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest
import workflow_scripts
from click.testing import CliRunner
from parking_harness import Clock, Parking, counted_step

from orchestration.workflows import stats

FLOW = {
    "name": "stats_flow",
    "inputs": {"wake": {"type": "string"}, "fail_times": {"type": "string", "default": "0"}},
    "steps": [
        counted_step("first"),
        {
            "id": "flaky",
            "type": "custom_script",
            "depends_on": ["first"],
            "retry": {"max_retries": 1},
            "config": {
                "callable": "workflow_scripts:flaky",
                "arguments": {"fail_times": "{{ inputs.fail_times }}"},
            },
        },
        {"id": "pause", "type": "delay", "depends_on": ["flaky"], "config": {"until": "{{ inputs.wake }}"}},
        counted_step("last", ["pause"]),
    ],
}
PAST = "2020-01-01T00:00Z"


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


@pytest.fixture(autouse=True)
def fresh_scripts():
    workflow_scripts.CALLS.clear()
    workflow_scripts.FLAKY_ATTEMPTS.clear()


def run_executions(flow: Parking, clock: Clock) -> dict[str, str]:
    """Four executions: retried-then-succeeded, failed, parked, parked-then-resumed; their ids."""
    ids = {}
    retried = flow.start("stats_flow", wake=PAST, fail_times="1")
    ids["retried"] = flow.run_tags(retried)["junction/execution_id"]
    failed = flow.jobs["stats_flow"].execute_in_process(
        run_config={"wake": PAST, "fail_times": "5"}, instance=flow.instance, raise_on_error=False
    )
    ids["failed"] = flow.run_tags(failed)["junction/execution_id"]
    far = (datetime.now(UTC) + timedelta(days=2)).isoformat()
    ids["parked"] = flow.run_tags(flow.start("stats_flow", wake=far))["junction/execution_id"]
    soon = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    ids["resumed"] = flow.run_tags(flow.start("stats_flow", wake=soon))["junction/execution_id"]
    clock.advance(hours=2)
    (request,) = flow.tick()
    assert request.tags["junction/execution_id"] == ids["resumed"]
    assert flow.launch(request).success
    return ids


def test_statistics_group_runs_by_execution(store_url, instance, monkeypatch):
    flow = Parking(instance, [FLOW])
    ids = run_executions(flow, Clock(monkeypatch))
    runs = stats.runs_from_instance(instance, "stats_flow")
    assert len(runs) == 5, "four executions, one of them in two runs"
    step_types = {"stats_flow": {step["id"]: step["type"] for step in FLOW["steps"]}}
    report = stats.build_report(runs, step_types, workflows=["stats_flow"])
    executions = {execution.execution_id: execution for execution in report.executions["stats_flow"]}

    assert {name: executions[ids[name]].status for name in ids} == {
        "retried": "succeeded",
        "failed": "failed",
        "parked": "waiting",
        "resumed": "succeeded",
    }
    assert executions[ids["failed"]].failed_steps == ("flaky",)
    parked = executions[ids["parked"]]
    assert parked.waiting.step_id == "pause" and parked.waiting.kind == "delay"
    assert parked.waiting.wake_at > datetime.now(UTC) + timedelta(days=1)
    assert parked.wall_s is None and parked.ended_at is None, "not finished: no wall time yet"

    # Wall and active times from Dagster's own run records.
    resumed = executions[ids["resumed"]]
    records = sorted(
        instance.get_run_records(dg.RunsFilter(tags={"junction/execution_id": ids["resumed"]})),
        key=lambda record: record.create_timestamp,
    )
    assert resumed.runs == 2 and resumed.run_ids == tuple(r.dagster_run.run_id for r in records)
    assert resumed.wall_s == pytest.approx(records[1].end_time - records[0].start_time, abs=0.002)
    active = sum(record.end_time - record.start_time for record in records)
    assert resumed.active_s == pytest.approx(active, abs=0.002)
    assert resumed.wall_s >= resumed.active_s

    summary = report.stats["stats_flow"]
    assert summary.executions == 4 and summary.runs == 5
    assert summary.by_status == {"running": 0, "waiting": 1, "succeeded": 2, "failed": 1, "canceled": 0}
    assert summary.success_rate == pytest.approx(2 / 3, abs=1e-4)
    assert summary.waiting == 1
    assert [(w.step_id, w.kind, w.executions) for w in summary.waiting_on] == [("pause", "delay", 1)]
    steps = {step.step_id: step for step in summary.steps}
    # `flaky`: one retry in the retried execution, one (then a final failure) in the failed one.
    assert (steps["flaky"].failures, steps["flaky"].retries) == (1, 2)
    assert (steps["first"].failures, steps["first"].retries) == (0, 0)
    walls = sorted(executions[ids[name]].wall_s for name in ("retried", "failed", "resumed"))
    assert summary.wall_p50_s == pytest.approx(walls[1], abs=0.002)
    assert walls[1] <= summary.wall_p95_s <= walls[2]


def test_a_continued_failure_counts_as_a_failed_step(store_url, instance):
    spec = {
        "name": "keeps_going",
        "steps": [
            {
                "id": "boom",
                "type": "custom_script",
                "continue_on_failure": True,
                "config": {"callable": "workflow_scripts:explode"},
            },
            counted_step("after", ["boom"]),
        ],
    }
    flow = Parking(instance, [spec])
    result = flow.start("keeps_going")
    assert result.success
    report = stats.build_report(stats.runs_from_instance(instance, "keeps_going"), {})
    (execution,) = report.executions["keeps_going"]
    assert execution.status == "succeeded" and execution.failed_steps == ("boom",)
    (boom,) = [step for step in report.stats["keeps_going"].steps if step.step_id == "boom"]
    assert (boom.failures, boom.failed_and_continued) == (0, 1)


def test_an_unfinished_run_makes_its_execution_running(store_url, instance):
    flow = Parking(instance, [FLOW])
    done = flow.start("stats_flow", wake=PAST)
    execution_id = flow.run_tags(done)["junction/execution_id"]
    instance.add_run(
        dg.DagsterRun(
            job_name="stats_flow",
            run_id="a-busy-run",
            status=dg.DagsterRunStatus.STARTED,
            tags={
                "junction/execution_id": execution_id,
                "junction/workflow": "stats_flow",
                "junction/kind": "workflow",
            },
        )
    )
    report = stats.build_report(stats.runs_from_instance(instance, "stats_flow"), {})
    (execution,) = report.executions["stats_flow"]
    assert execution.status == "running" and execution.runs == 2
    assert report.stats["stats_flow"].success_rate is None, "nothing finished"


@pytest.fixture
def platform_instance(junction_home, tmp_path, monkeypatch):
    """The CLI's own instance (the generated DAGSTER_HOME of the test's JUNCTION_HOME) and a
    workflows folder holding FLOW."""
    import yaml

    from orchestration.instance import prepare_dagster_home
    from orchestration.settings import reset_settings_cache

    folder = tmp_path / "workflows"
    folder.mkdir()
    (folder / "stats_flow.yaml").write_text(yaml.safe_dump(FLOW))
    monkeypatch.setenv("JUNCTION_WORKFLOWS_DIR", str(folder))
    reset_settings_cache()
    prepare_dagster_home()
    with dg.DagsterInstance.get() as platform:
        yield platform


def test_the_cli_prints_statistics_and_executions(store_url, platform_instance, monkeypatch):
    from orchestration.cli import cli

    flow = Parking(platform_instance, [FLOW])
    ids = run_executions(flow, Clock(monkeypatch))
    runner = CliRunner()

    result = runner.invoke(cli, ["workflows", "stats"])
    assert result.exit_code == 0, result.output
    header, row = result.output.splitlines()[:2]
    assert header.split()[:7] == ["workflow", "executions", "ok", "failed", "running", "waiting", "success"]
    assert row.split()[:7] == ["stats_flow", "4", "2", "1", "0", "1", "66.7%"]

    result = runner.invoke(cli, ["workflows", "stats", "stats_flow"])
    assert result.exit_code == 0, result.output
    assert "waiting on" in result.output and "pause  delay  1" in result.output
    flaky_line = next(line for line in result.output.splitlines() if line.startswith("flaky"))
    assert flaky_line.split() == ["flaky", "1", "0", "2"]

    result = runner.invoke(cli, ["workflows", "executions", "stats_flow", "--status", "waiting"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 2 and lines[1].startswith(ids["parked"]) and "pause: delay until " in lines[1]

    result = runner.invoke(cli, ["workflows", "executions", "stats_flow", "--json"])
    found = {item["execution_id"]: item for item in map(json.loads, result.output.splitlines())}
    assert set(found) == set(ids.values())
    assert found[ids["resumed"]]["runs"] == 2 and found[ids["failed"]]["status"] == "failed"

    result = runner.invoke(cli, ["workflows", "stats", "nope"])
    assert result.exit_code == 2 and "unknown workflow 'nope' (known: stats_flow)" in result.output


def test_the_workflow_statistics_asset_holds_the_table(store_url, platform_instance, monkeypatch):
    from orchestration.platform_definitions import workflow_statistics
    from resources.platform_store import PlatformStoreResource

    flow = Parking(platform_instance, [FLOW])
    run_executions(flow, Clock(monkeypatch))
    result = dg.materialize(
        [workflow_statistics],
        instance=platform_instance,
        resources={"platform_store": PlatformStoreResource()},
    )
    assert result.success
    metadata = result.asset_materializations_for_node("workflow_statistics")[0].metadata
    assert (metadata["workflows"].value, metadata["executions"].value, metadata["waiting"].value) == (1, 4, 1)
    (row,) = metadata["by_workflow"].value.records
    assert row.data["workflow"] == "stats_flow"
    assert (row.data["executions"], row.data["succeeded"], row.data["failed"], row.data["waiting"]) == (
        4,
        2,
        1,
        1,
    )
    assert row.data["success_rate"] == pytest.approx(0.6667, abs=1e-4)
    assert row.data["waiting_on"] == "pause (delay): 1"
    assert row.data["step_failures"] == "flaky: 1" and row.data["step_retries"] == 2
