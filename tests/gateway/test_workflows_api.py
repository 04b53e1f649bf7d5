"""The workflow endpoints' own checks, before Dagster is asked: scopes, 404, 409 without the `api`
trigger, 422 naming the offending input; 503 when Dagster is down. (Launching for real, and the
statistics of real executions: tests/workflows/test_workflows_api_live.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from support import bearer
from test_security_and_problems import assert_problem

LAUNCHABLE = {
    "name": "launchable",
    "inputs": {
        "order_id": {"type": "string"},
        "amount": {"type": "number", "default": 1.5},
        "count": {"type": "integer", "default": 1},
        "urgent": {"type": "boolean", "default": False},
        "due": {"type": "date", "default": "2026-01-01"},
    },
    "triggers": [{"type": "api"}],
    "steps": [{"id": "pause", "type": "delay", "config": {"duration": "1m"}}],
}
MANUAL_ONLY = {**LAUNCHABLE, "name": "manual_only", "triggers": [{"type": "manual"}]}


@pytest.fixture
def workflows_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "workflows"
    folder.mkdir()
    for spec in (LAUNCHABLE, MANUAL_ONLY):
        (folder / f"{spec['name']}.yaml").write_text(yaml.safe_dump(spec))
    return folder


@pytest.fixture
def client(gateway, workflows_dir):
    return gateway(workflows_dir=workflows_dir)


def test_launching_needs_the_workflows_launch_scope_of_that_workflow(client, make_key):
    other = make_key("other-launcher", "workflows:launch:manual_only")
    body = assert_problem(
        client.post("/v1/workflows/launchable/executions", json={"inputs": {}}, headers=bearer(other)),
        403,
        "forbidden",
    )
    assert "workflows:launch:launchable" in body["detail"]
    reader = make_key("reader", "workflows:read")
    assert_problem(client.post("/v1/workflows/launchable/executions", json={}, headers=bearer(reader)), 403)
    assert_problem(client.post("/v1/workflows/launchable/executions", json={}), 401)


def test_unknown_workflow_is_404_and_one_without_the_api_trigger_409(client, make_key):
    key = make_key("launcher", "workflows:launch")
    assert_problem(
        client.post("/v1/workflows/nope/executions", json={}, headers=bearer(key)), 404, "not-found"
    )
    body = assert_problem(
        client.post(
            "/v1/workflows/manual_only/executions", json={"inputs": {"order_id": "A"}}, headers=bearer(key)
        ),
        409,
        "no-api-trigger",
    )
    assert "does not declare the 'api' trigger" in body["detail"]
    reader = make_key("reader", "workflows:read")
    assert_problem(client.get("/v1/workflows/nope/stats", headers=bearer(reader)), 404, "not-found")
    assert_problem(client.get("/v1/workflows/nope/executions", headers=bearer(reader)), 404, "not-found")


@pytest.mark.parametrize(
    ("inputs", "field", "message"),
    [
        ({}, "body.inputs.order_id", "Field required"),
        ({"order_id": 7}, "body.inputs.order_id", "Input should be a valid string"),
        ({"order_id": "A", "count": "3"}, "body.inputs.count", "Input should be a valid integer"),
        ({"order_id": "A", "amount": "1.5"}, "body.inputs.amount", "Input should be a valid number"),
        ({"order_id": "A", "amount": True}, "body.inputs.amount", "Input should be a valid number"),
        ({"order_id": "A", "urgent": "true"}, "body.inputs.urgent", "Input should be a valid boolean"),
        ({"order_id": "A", "due": "soon"}, "body.inputs.due", "Input should be a valid date"),
        ({"order_id": "A", "colour": "red"}, "body.inputs.colour", "Extra inputs are not permitted"),
    ],
)
def test_inputs_are_checked_against_the_typed_inputs(client, make_key, inputs, field, message):
    key = make_key("launcher", "workflows:launch:launchable")
    response = client.post(
        "/v1/workflows/launchable/executions", json={"inputs": inputs}, headers=bearer(key)
    )
    body = assert_problem(response, 422)
    assert body["field"] == field
    assert message in body["errors"][0]["message"]


def test_valid_inputs_reach_dagster_which_is_down_here(client, make_key):
    key = make_key("launcher", "workflows:launch:launchable")
    response = client.post(
        "/v1/workflows/launchable/executions",
        json={"inputs": {"order_id": "A", "amount": 2, "due": "2026-02-03"}},
        headers=bearer(key),
    )
    assert_problem(response, 503)


def test_reads_need_the_read_scope_and_dagster(client, make_key):
    assert_problem(client.get("/v1/workflows"), 401)
    runs_only = make_key("runs-reader", "runs:read")
    assert_problem(client.get("/v1/workflows", headers=bearer(runs_only)), 403)
    one = make_key("one-reader", "workflows:read:launchable")
    assert_problem(client.get("/v1/workflows/manual_only/stats", headers=bearer(one)), 403)
    assert_problem(client.get("/v1/workflows/launchable/stats", headers=bearer(one)), 503)


def test_validated_inputs_fill_defaults_and_write_dates_as_text():
    from orchestration.workflows.launch import validated_inputs
    from orchestration.workflows.spec import parse_workflow

    spec = parse_workflow(LAUNCHABLE, "launchable.yaml")
    assert validated_inputs(spec, {"order_id": "A", "amount": 2, "due": "2026-02-03"}) == {
        "order_id": "A",
        "amount": 2.0,
        "count": 1,
        "urgent": False,
        "due": "2026-02-03",
    }
