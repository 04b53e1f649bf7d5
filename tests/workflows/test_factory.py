"""The job factory: a spec's job shape (ops, edges, retry policy, config, schedule) and how it runs —
branches skipped, `when`, `continue_on_failure`, timeouts, context flow, metadata, execution id."""

from __future__ import annotations

import time
from typing import Any

import dagster as dg
import pytest

from orchestration.workflows.context import EXECUTION_ID_TAG, FAILED_STEPS_TAG
from orchestration.workflows.factory import build_job, build_schedules
from orchestration.workflows.spec import parse_workflow

SCRIPTS = "workflow_scripts"


def script_step(
    step_id: str, function: str, depends_on: list[str] | None = None, **extra: Any
) -> dict[str, Any]:
    config = {"callable": f"{SCRIPTS}:{function}", "arguments": extra.pop("arguments", {})}
    return {"id": step_id, "type": "custom_script", "depends_on": depends_on or [], "config": config, **extra}


NUMBERS = {
    "id": "numbers",
    "type": "transformation",
    "description": "The order's positive lines, with totals.",
    "config": {
        "source": "inputs.lines",
        "derive": {"total": "quantity * price"},
        "filter": {"field": "total", "op": "gt", "value": 0},
        "select": ["sku", "total"],
    },
}

BRANCHING: dict[str, Any] = {
    "name": "branching",
    "description": "A transformation, a branch on its count, a script on each side.",
    "inputs": {
        "order_id": {"type": "string", "default": "A-1"},
        "lines": {"type": "array", "default": []},
        "limit": {"type": "integer", "default": 1},
    },
    "tags": {"team": "finance"},
    "triggers": [{"type": "manual"}, {"type": "schedule", "cron": "0 6 * * *", "timezone": "Europe/Paris"}],
    "steps": [
        NUMBERS,
        {
            "id": "many",
            "type": "conditional",
            "depends_on": ["numbers"],
            "config": {"condition": {"field": "steps.numbers.output.count", "op": "gt", "value": 1}},
        },
        script_step(
            "summarise",
            "order_summary",
            ["many.then"],
            arguments={"currency": "{{ inputs.order_id }}-EUR", "factor": 2},
            retry={"max_retries": 3, "delay_s": 0.5, "backoff": "exponential", "jitter": "full"},
        ),
        script_step("single", "order_summary", ["many.otherwise"], arguments={"currency": "USD"}),
        script_step("after_summary", "order_summary", ["summarise"], arguments={"currency": "GBP"}),
    ],
}

LINES = [
    {"sku": "a", "quantity": 2, "price": 5},
    {"sku": "b", "quantity": 1, "price": 7},
    {"sku": "c", "quantity": 0, "price": 9},
]


def test_job_shape_ops_edges_retry_config_tags_and_schedule():
    spec = parse_workflow(BRANCHING)
    job = build_job(spec)
    assert job.name == "branching" and job.description == BRANCHING["description"]
    assert {node.name for node in job.nodes} == {"numbers", "many", "summarise", "single", "after_summary"}
    assert (
        job.graph.node_named("numbers").definition.description == "The order's positive lines, with totals."
    )
    edges = {
        # The node is the step id; its definition is named <workflow>__<step> (unique in the location).
        (invocation.alias, dependency.output, dependency.node)
        for invocation, inputs in job.graph.dependencies.items()
        for dependency in inputs.values()
    }
    assert edges == {
        ("many", "result", "numbers"),
        ("summarise", "then", "many"),
        ("single", "otherwise", "many"),
        ("after_summary", "result", "summarise"),
    }
    policy = job.graph.node_named("summarise").definition.retry_policy
    assert policy == dg.RetryPolicy(
        max_retries=3, delay=0.5, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.FULL
    )
    assert job.graph.node_named("single").definition.retry_policy is None
    assert job.executor_def.name == "in_process"
    assert job.tags["team"] == "finance" and job.tags["junction/workflow"] == "branching"
    run_config_fields = job.run_config_schema.config_type.fields
    assert set(run_config_fields) == {"order_id", "lines", "limit"}
    assert run_config_fields["limit"].default_value == 1
    (schedule,) = build_schedules(spec, job)
    assert (schedule.name, schedule.cron_schedule, schedule.execution_timezone) == (
        "branching_schedule",
        "0 6 * * *",
        "Europe/Paris",
    )
    assert schedule.job_name == "branching"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED


def test_a_required_input_is_required_run_config():
    spec = parse_workflow(
        BRANCHING
        | {
            "triggers": [{"type": "manual"}],
            "inputs": {"order_id": {"type": "string"}, "lines": {"type": "array"}},
        }
    )
    fields = build_job(spec).run_config_schema.config_type.fields
    assert fields["order_id"].is_required and fields["lines"].is_required


def test_the_taken_branch_runs_and_the_other_is_skipped(run_spec):
    run = run_spec(BRANCHING, order_id="A-7", lines=LINES)
    assert run.result.success
    assert run.statuses() == {
        "numbers": "SUCCESS",
        "many": "SUCCESS",
        "summarise": "SUCCESS",
        "single": "SKIPPED",
        "after_summary": "SUCCESS",
    }
    assert run.output("numbers")["output"]["records"] == [{"sku": "a", "total": 10}, {"sku": "b", "total": 7}]
    summary = run.output("summarise")["output"]
    assert summary == {"order": "A-7", "currency": "A-7-EUR", "doubled": 4, "execution": run.result.run_id}
    # Steps see every ancestor's state, not only their direct parents'.
    assert set(run.result.output_for_node("after_summary")) == {
        "numbers",
        "many",
        "summarise",
        "after_summary",
    }
    assert run.metadata("summarise")["output"] == summary
    assert run.tags()[EXECUTION_ID_TAG] == run.result.run_id


def test_the_other_branch(run_spec):
    run = run_spec(BRANCHING, lines=LINES[:1])
    assert run.statuses() == {
        "numbers": "SUCCESS",
        "many": "SUCCESS",
        "summarise": "SKIPPED",
        "single": "SUCCESS",
        "after_summary": "SKIPPED",
    }
    assert run.output("many", "otherwise")["output"] == {"matched": False, "branch": "otherwise"}


def test_when_false_yields_nothing_and_skips_what_follows(run_spec):
    spec = {
        "name": "guarded",
        "inputs": {
            "order_id": {"type": "string", "default": "A-1"},
            "lines": {"type": "array", "default": []},
            "go": {"type": "boolean", "default": False},
        },
        "steps": [
            NUMBERS | {"when": {"field": "inputs.go", "op": "eq", "value": True}},
            script_step("after", "order_summary", ["numbers"], arguments={"currency": "EUR"}),
        ],
    }
    stopped = run_spec(spec, lines=LINES)
    assert stopped.result.success
    assert stopped.statuses() == {"numbers": "SUCCESS", "after": "SKIPPED"}
    with pytest.raises(dg.DagsterInvariantViolationError):
        stopped.result.output_for_node("numbers")
    going = run_spec(spec, lines=LINES, go=True)
    assert going.statuses() == {"numbers": "SUCCESS", "after": "SUCCESS"}


def test_continue_on_failure_records_the_error_and_tags_the_run(run_spec):
    spec = {
        "name": "resilient",
        "inputs": {"order_id": {"type": "string", "default": "A-1"}},
        "steps": [
            script_step("ledger", "explode", continue_on_failure=True),
            {
                "id": "report",
                "type": "conditional",
                "depends_on": ["ledger"],
                "config": {"condition": {"field": "steps.ledger.status", "op": "eq", "value": "failed"}},
            },
            script_step("tidy_up", "explode", ["report.then"], continue_on_failure=True),
        ],
    }
    run = run_spec(spec)
    assert run.result.success
    assert run.statuses() == {"ledger": "SUCCESS", "report": "SUCCESS", "tidy_up": "SUCCESS"}
    ledger = run.result.output_for_node("ledger")["ledger"]
    assert ledger == {
        "status": "failed",
        "output": {"error": {"type": "RuntimeError", "message": "the ledger is closed"}},
    }
    assert run.metadata("ledger")["status"] == "failed"
    assert run.tags()[FAILED_STEPS_TAG] == "ledger,tidy_up"


def test_a_failing_step_fails_the_run_after_its_retries(run_spec):
    spec = {
        "name": "fragile",
        "steps": [
            script_step("ledger", "explode", retry={"max_retries": 2}),
            script_step("after", "explode", ["ledger"]),
        ],
    }
    run = run_spec(spec)
    assert not run.result.success
    assert run.statuses()["ledger"] == "FAILURE"
    assert "after" not in run.statuses()  # never started: its dependency failed
    stats = {s.step_key: s for s in run.instance.get_run_step_stats(run.result.run_id)}
    assert stats["ledger"].attempts == 3
    failure = run.result.get_step_failure_events()[0]
    assert "RuntimeError: the ledger is closed" in failure.event_specific_data.error.message + str(
        failure.event_specific_data.user_failure_data.description
    )


def test_continue_on_failure_still_uses_the_retries_first(run_spec):
    spec = {
        "name": "retried",
        "steps": [script_step("ledger", "explode", retry={"max_retries": 1}, continue_on_failure=True)],
    }
    run = run_spec(spec)
    assert run.result.success
    stats = {s.step_key: s for s in run.instance.get_run_step_stats(run.result.run_id)}
    assert stats["ledger"].attempts == 2
    assert run.output("ledger")["status"] == "failed"


def test_the_step_enforces_its_timeout(run_spec):
    spec = {"name": "slow", "steps": [script_step("nap", "sleepy", arguments={"seconds": 5}, timeout_s=0.5)]}
    started = time.monotonic()
    run = run_spec(spec)
    assert time.monotonic() - started < 4
    assert not run.result.success
    failure = run.result.get_step_failure_events()[0]
    assert "did not finish within its timeout of 0.5 s" in str(
        failure.event_specific_data.user_failure_data.description
    )


def test_a_script_output_must_be_json(run_spec):
    run = run_spec({"name": "opaque", "steps": [script_step("odd", "not_json")]})
    assert not run.result.success
    failure = run.result.get_step_failure_events()[0]
    assert "not JSON-able" in str(failure.event_specific_data.user_failure_data.description)


def test_an_execution_id_given_at_launch_is_kept(run_spec):
    job = build_job(
        parse_workflow(
            {
                "name": "tagged",
                "inputs": {
                    "order_id": {"type": "string", "default": "A"},
                    "lines": {"type": "array", "default": []},
                },
                "steps": [NUMBERS],
            }
        )
    )
    instance = dg.DagsterInstance.ephemeral()
    result = job.execute_in_process(instance=instance, tags={EXECUTION_ID_TAG: "exec-1"})
    assert instance.get_run_by_id(result.run_id).tags[EXECUTION_ID_TAG] == "exec-1"


def test_transformation_rejects_a_source_that_is_not_records(run_spec):
    run = run_spec(
        {
            "name": "shapeless",
            "inputs": {"lines": {"type": "object", "default": {"a": 1}}},
            "steps": [NUMBERS],
        }
    )
    assert not run.result.success
    failure = run.result.get_step_failure_events()[0]
    assert "source 'inputs.lines' is not a list of records (got dict)" in str(
        failure.event_specific_data.user_failure_data.description
    )


@pytest.mark.parametrize("bad", [{"order_id": 5}, {"unknown": 1}])
def test_inputs_are_typed_run_config(run_spec, bad):
    with pytest.raises(dg.DagsterInvalidConfigError):
        run_spec(BRANCHING, **bad)


def test_secrets_are_masked_by_key_and_by_value():
    from orchestration.workflows.context import mask_secrets

    output = {"api_token": "abc", "nested": [{"Password": "x", "note": "key is s3cr3t!"}], "count": 3}
    assert mask_secrets(output, ["s3cr3t", ""]) == {
        "api_token": "***",
        "nested": [{"Password": "***", "note": "key is ***!"}],
        "count": 3,
    }


def test_a_bad_spec_fails_the_code_location_with_the_kernel_message(tmp_path):
    import os
    import subprocess
    import sys

    import yaml
    from test_spec import changed

    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(changed("steps.2.depends_on", ["nowhere"])))
    env = {**os.environ, "JUNCTION_WORKFLOWS_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", "import orchestration.definitions"], capture_output=True, text=True, env=env
    )
    assert result.returncode != 0
    assert f"{tmp_path / 'broken.yaml'}: steps[2].depends_on[0]: unknown step 'nowhere'" in result.stderr


def test_the_code_location_holds_the_shipped_workflow():
    from orchestration.definitions import defs

    job = defs.get_job_def("order_review")
    assert {node.name for node in job.nodes} == {
        "lookup_order",
        "is_large",
        "large_order_lines",
        "notify_finance",
    }
    assert "notifications" in job.resource_defs


def test_a_schedule_tick_launches_with_the_input_defaults():
    spec = parse_workflow(BRANCHING)
    job = build_job(spec)
    (schedule,) = build_schedules(spec, job)
    with dg.build_schedule_context(scheduled_execution_time=None) as context:
        (request,) = schedule.evaluate_tick(context).run_requests
    result = job.execute_in_process(run_config=request.run_config, instance=dg.DagsterInstance.ephemeral())
    assert result.success
    assert result.output_for_node("numbers")["numbers"]["output"]["count"] == 0
