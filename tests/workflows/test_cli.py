"""`junction workflows list|validate|schema|run` through click's CliRunner; `run` against a local API,
recorded in the Dagster instance of the test's JUNCTION_HOME."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from test_spec import VALID, changed

from orchestration.cli import cli
from orchestration.settings import reset_settings_cache


@pytest.fixture
def workflows_dir(tmp_path: Path, junction_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "workflows"
    folder.mkdir()
    monkeypatch.setenv("JUNCTION_WORKFLOWS_DIR", str(folder))
    reset_settings_cache()
    return folder


def test_list_and_validate_a_folder(workflows_dir: Path):
    (workflows_dir / "orders.yaml").write_text(yaml.safe_dump(VALID))
    (workflows_dir / "nightly.yaml").write_text(
        yaml.safe_dump(
            VALID
            | {
                "name": "nightly",
                "inputs": {},
                "triggers": [{"type": "schedule", "cron": "0 3 * * *"}],
                "steps": VALID["steps"][:1],
            }
        )
    )
    # The nightly spec reads inputs.order_id, which it no longer declares.
    result = CliRunner().invoke(cli, ["workflows", "validate"])
    assert result.exit_code == 1
    assert (
        "nightly.yaml: steps[0].config.url: unknown input 'order_id' in 'inputs.order_id' (declared: none)"
        in result.output
    )
    (workflows_dir / "nightly.yaml").write_text(
        yaml.safe_dump(
            VALID
            | {
                "name": "nightly",
                "inputs": {},
                "triggers": [{"type": "schedule", "cron": "0 3 * * *"}],
                "steps": [{"id": "ping", "type": "http_request", "config": {"url": "http://x/"}}],
            }
        )
    )
    result = CliRunner().invoke(cli, ["workflows", "validate"])
    assert result.exit_code == 0, result.output
    assert "2 workflow(s) valid: nightly, orders" in result.output
    listing = CliRunner().invoke(cli, ["workflows", "list"])
    assert listing.exit_code == 0
    lines = listing.output.splitlines()
    assert lines[0].split() == ["name", "steps", "triggers", "file"]
    assert lines[1].split() == ["nightly", "1", "0", "3", "*", "*", "*", "nightly.yaml"]
    assert lines[2].split() == ["orders", "3", "manual", "orders.yaml"]


def test_validate_given_files_reports_every_problem_of_every_file(tmp_path: Path, junction_home: Path):
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text(yaml.safe_dump(changed("steps.1.type", "teleport")))
    second.write_text(yaml.safe_dump(changed("steps.0.depends_on", ["tell"])))
    result = CliRunner().invoke(cli, ["workflows", "validate", str(first), str(second)])
    assert result.exit_code == 1
    assert f"{first}: steps[1].type: unknown step type" in result.output
    assert f"{second}: steps: depends_on forms a cycle" in result.output


def test_schema_is_json_schema(junction_home: Path):
    result = CliRunner().invoke(cli, ["workflows", "schema"])
    assert result.exit_code == 0
    assert json.loads(result.output)["title"] == "Junction workflow"


@pytest.fixture
def cli_instance_home(junction_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # `run` exports DAGSTER_HOME for the instance it generates; registering the variable here makes
    # monkeypatch remove it again after the test.
    monkeypatch.setenv("DAGSTER_HOME", "")
    return junction_home


def test_run_the_shipped_example_large_order(api_server, cli_instance_home: Path):
    import dagster as dg

    api_server.answer(
        "/orders/A-1",
        200,
        {
            "total": 2500,
            "customer": {"name": "Acme"},
            "lines": [{"sku": "a", "quantity": 2, "unit_price": 10}],
        },
    )
    result = CliRunner().invoke(
        cli,
        [
            "workflows",
            "run",
            "order_review",
            "--input",
            "order_id=A-1",
            "--input",
            f"orders_api={api_server.url}",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "  lookup_order: succeeded" in result.output
    assert "  large_order_lines: succeeded" in result.output
    # The shipped `finance` channel is an outbox in JUNCTION_HOME: out of the box, the message lands there.
    assert "  notify_finance: succeeded" in result.output
    assert result.output.rstrip().endswith("SUCCESS")
    run_id = result.output.split()[1]
    (line,) = (cli_instance_home / "outbox" / "finance.jsonl").read_text().splitlines()
    assert json.loads(line)["subject"] == "Large order A-1: 2500"
    with dg.DagsterInstance.get() as instance:
        run = instance.get_run_by_id(run_id)
        assert run.tags["junction/execution_id"] == run_id
        assert run.tags["junction/workflow"] == "order_review"
        assert run.job_code_origin is not None  # re-executable from the UI


def test_run_the_shipped_example_small_order_skips_the_branch(api_server, cli_instance_home: Path):
    api_server.answer("/orders/B-2", 200, {"total": 20, "customer": {"name": "Bob"}, "lines": []})
    result = CliRunner().invoke(
        cli,
        [
            "workflows",
            "run",
            "order_review",
            "--input",
            "order_id=B-2",
            "--input",
            f"orders_api={api_server.url}",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "  large_order_lines: skipped" in result.output
    assert "  notify_finance: skipped" in result.output
    assert result.output.rstrip().endswith(": SUCCESS")


def test_run_fails_with_a_non_zero_exit(api_server, cli_instance_home: Path):
    # JSON paths need a JSON object or list: the lookup fails (twice: the step is retried once).
    api_server.answer("/orders/C-3", 200, "not an object")
    result = CliRunner().invoke(
        cli,
        [
            "workflows",
            "run",
            "order_review",
            "--input",
            "order_id=C-3",
            "--input",
            f"orders_api={api_server.url}",
        ],
    )
    assert result.exit_code == 1, result.output
    steps = [line.strip() for line in result.output.splitlines() if line.startswith("  lookup_order:")]
    assert steps[:3] == ["lookup_order: started", "lookup_order: up for retry", "lookup_order: restarted"]
    assert steps[3].startswith("lookup_order: failed: ") and len(steps) == 4
    # The error as one line and where the full log is; the traceback only in that file.
    assert "Traceback" not in result.output
    error = result.output.rstrip().splitlines()[-2:]
    assert error[0].startswith("Error: run ") and " failed: step lookup_order failed: " in error[0]
    log_file = Path(error[1].removeprefix("full log: ").split(" (and ")[0])
    assert "lookup_order STEP_FAILURE" in log_file.read_text()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["nope"],
            "unknown workflow 'nope' (known: large_order_follow_up, nightly_flights_report, order_approval, order_review, order_totals)",
        ),
        (["order_review"], "missing required input(s): order_id"),
        (["order_review", "--input", "order_id"], "'order_id' is not k=v"),
        (
            ["order_review", "--input", "colour=red"],
            "unknown input 'colour' (declared: order_id, orders_api)",
        ),
    ],
)
def test_run_rejects_bad_arguments(arguments: list[str], message: str, cli_instance_home: Path):
    result = CliRunner().invoke(cli, ["workflows", "run", *arguments])
    assert result.exit_code == 2
    assert message in result.output
