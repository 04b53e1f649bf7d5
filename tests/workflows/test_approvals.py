"""Approval steps end to end on a real Dagster instance and platform store: approve, reject, N of M,
approvers by group, forbidden self-approval, timeout policies, auto-approval, never resumed twice;
deciding through the gateway (scopes, 403/404/409/422) and the CLI."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import dagster as dg
import pytest
import workflow_scripts
from click.testing import CliRunner
from parking_harness import Clock, Parking, counted_step

from orchestration.cli import cli
from orchestration.kernel import audit
from orchestration.workflows import approvals, parking

REQUESTER = {"junction/actor": "carol"}


def purchase(**approval: Any) -> dict[str, Any]:
    config = {
        "message": "Approve the purchase of {{ inputs.amount }} EUR",
        "approvers": {"principals": ["ann", "bob"], "groups": ["finance"]},
        "timeout": "2h",
        "auto_approve": {"field": "inputs.amount", "op": "lt", "value": 1000},
        "inputs": {"po_number": {"type": "string", "required": True}, "budget": {"type": "integer"}},
        "forbid_self_approval": True,
        **approval,
    }
    return {
        "name": "purchase",
        "inputs": {"amount": {"type": "number"}},
        "steps": [
            counted_step("prepare"),
            {"id": "sign_off", "type": "approval", "depends_on": ["prepare"], "config": config},
            counted_step("place_order", ["sign_off.approved"]),
            counted_step("tell_requester", ["sign_off.rejected"]),
        ],
    }


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


@pytest.fixture(autouse=True)
def no_calls_yet():
    workflow_scripts.CALLS.clear()


def park(flow: Parking, amount: float = 5000) -> tuple[dg.ExecuteInProcessResult, approvals.ApprovalInfo]:
    first = flow.start("purchase", tags=REQUESTER, amount=amount)
    assert first.success
    assert flow.run_tags(first)[parking.STATE_TAG] == parking.WAITING
    execution_id = flow.run_tags(first)["junction/execution_id"]
    request = approvals.request_for_step(execution_id, "sign_off")
    assert request.status == approvals.PENDING
    return first, request


def decide(
    request_id: str, principal: str, decision: str = "approve", **options: Any
) -> approvals.ApprovalInfo:
    options.setdefault("inputs", {"po_number": "PO-7"} if decision == "approve" else {})
    return approvals.decide(request_id, principal=principal, decision=decision, origin="test", **options)


def test_approve_resumes_once_with_the_form_inputs(store_url, instance):
    flow = Parking(instance, [purchase()])
    first, request = park(flow)
    assert request.message == "Approve the purchase of 5000.0 EUR" and request.requester == "carol"
    assert flow.tick() == [], "nothing is due before a decision"

    decided = decide(request.id, "ann", comment="fine", inputs={"po_number": "PO-7", "budget": 12})
    assert decided.status == approvals.APPROVED and decided.resolution == "decision"
    # Two ticks before the resumed run starts ask for the same run key: Dagster launches one run.
    (request_a,) = flow.tick()
    (request_b,) = flow.tick()
    assert request_a.run_key == request_b.run_key == f"resume:{request.execution_id}:sign_off"
    second = flow.launch(request_a)
    assert second.success
    assert flow.tick() == [], "once resumed it is no longer waiting"
    statuses = flow.step_statuses(second)
    assert statuses["place_order"] == "SUCCESS" and statuses["tell_requester"] == "SKIPPED"
    output = second.output_for_node("place_order")["sign_off"]["output"]
    assert output["decision"] == "approved" and output["decided_by"] == ["ann"]
    assert output["inputs"] == {"po_number": "PO-7", "budget": 12} and output["comments"] == ["fine"]
    assert workflow_scripts.CALLS == ["prepare", "place_order"]

    (entry,) = audit.query(action="approval.approve")
    assert (entry.actor, entry.target, entry.origin) == ("ann", f"approval:{request.id}", "test")
    assert entry.details["comment"] == "fine" and entry.details["status"] == "approved"
    with pytest.raises(approvals.ApprovalConflict, match="already approved"):
        decide(request.id, "bob")


def test_reject_takes_the_rejected_branch(store_url, instance):
    flow = Parking(instance, [purchase()])
    _, request = park(flow)
    assert decide(request.id, "bob", "reject", comment="too much").status == approvals.REJECTED
    (resume,) = flow.tick()
    second = flow.launch(resume)
    statuses = flow.step_statuses(second)
    assert statuses["place_order"] == "SKIPPED" and statuses["tell_requester"] == "SUCCESS"
    assert second.output_for_node("tell_requester")["sign_off"]["output"]["decision"] == "rejected"


def test_n_of_m_waits_for_enough_approvers(store_url, instance):
    flow = Parking(instance, [purchase(required_approvals=2)])
    first, request = park(flow)
    assert flow.run_tags(first)[parking.WAITING_ON_TAG].startswith(
        f"approval {request.id[:8]}…: 0 of 2 from "
    )
    assert decide(request.id, "ann").status == approvals.PENDING
    assert flow.tick() == []
    # The parked run's summary follows the decisions that do not settle the request.
    assert flow.run_tags(first)[parking.WAITING_ON_TAG].startswith(
        f"approval {request.id[:8]}…: 1 of 2 from "
    )
    with pytest.raises(approvals.ApprovalConflict, match="ann already decided"):
        decide(request.id, "ann")
    # An approver by group: dave is in finance.
    done = decide(request.id, "dave", groups=frozenset({"finance"}))
    assert done.status == approvals.APPROVED
    (resume,) = flow.tick()
    output = flow.launch(resume).output_for_node("place_order")["sign_off"]["output"]
    assert output["decided_by"] == ["ann", "dave"]


def test_who_may_decide(store_url, instance):
    flow = Parking(instance, [purchase()])
    _, request = park(flow)
    with pytest.raises(approvals.ApprovalForbidden, match="eve is not an approver"):
        decide(request.id, "eve", groups=frozenset({"sales"}))
    with pytest.raises(approvals.ApprovalForbidden, match="carol requested this approval"):
        decide(request.id, "carol", groups=frozenset({"finance"}))
    with pytest.raises(approvals.ApprovalInvalid, match="'po_number' is required to approve"):
        decide(request.id, "ann", inputs={})
    with pytest.raises(approvals.ApprovalInvalid, match="unknown form input"):
        decide(request.id, "ann", inputs={"po_number": "x", "colour": "red"})
    with pytest.raises(approvals.ApprovalInvalid, match="'budget' must be of type integer"):
        decide(request.id, "ann", inputs={"po_number": "x", "budget": "lots"})
    with pytest.raises(approvals.ApprovalNotFound):
        decide("0" * 16, "ann")
    assert approvals.get_request(request.id).status == approvals.PENDING


def test_self_approval_is_allowed_unless_forbidden(store_url, instance):
    flow = Parking(instance, [purchase(forbid_self_approval=False)])
    _, request = park(flow)
    assert decide(request.id, "carol", groups=frozenset({"finance"})).status == approvals.APPROVED


@pytest.mark.parametrize(
    ("policy", "ran", "succeeded"),
    [("approve", "place_order", True), ("reject", "tell_requester", True), ("fail", None, False)],
)
def test_timeout_policies(store_url, instance, monkeypatch, policy, ran, succeeded):
    clock = Clock(monkeypatch)
    flow = Parking(instance, [purchase(on_timeout=policy)])
    _, request = park(flow)
    clock.advance(minutes=119)
    assert flow.tick() == []
    clock.advance(minutes=2)
    (resume,) = flow.tick()
    second = flow.launch_allowing_failure(resume) if not succeeded else flow.launch(resume)
    assert second.success is succeeded
    resolved = approvals.get_request(request.id)
    assert resolved.resolution == "timeout"
    assert resolved.status == {"approve": "approved", "reject": "rejected", "fail": "failed"}[policy]
    assert [entry.details["status"] for entry in audit.query(action="approval.timeout")] == [resolved.status]
    assert workflow_scripts.CALLS == ["prepare", *([ran] if ran else [])]
    if not succeeded:
        assert flow.step_statuses(second)["sign_off"] == "FAILURE"
        with pytest.raises(approvals.ApprovalConflict, match="already failed"):
            decide(request.id, "ann")


def test_auto_approval_is_recorded_without_parking(store_url, instance):
    flow = Parking(instance, [purchase()])
    result = flow.start("purchase", tags=REQUESTER, amount=250)
    assert result.success and parking.STATE_TAG not in flow.run_tags(result)
    assert workflow_scripts.CALLS == ["prepare", "place_order"]
    output = result.output_for_node("place_order")["sign_off"]["output"]
    assert output["decision"] == "approved" and output["resolution"] == "auto"
    request = approvals.get_request(output["request_id"])
    assert request.status == approvals.APPROVED and request.resolution == "auto" and not request.decisions
    (entry,) = audit.query(action="approval.auto_approve")
    assert entry.actor == "workflow:purchase" and entry.target == f"approval:{request.id}"
    assert flow.tick() == []


def test_the_approval_config_is_checked_at_load_time():
    from orchestration.kernel.spec_errors import SpecError
    from orchestration.workflows.spec import parse_workflow

    for change, message in [
        ({"approvers": {}}, "name at least one principal or group"),
        ({"approvers": {"principals": ["ann"]}, "required_approvals": 2}, "only 1 approver"),
        ({"timeout": "forever"}, "'forever' is not a duration"),
        ({"auto_approve": {"field": "inputs.missing", "op": "lt", "value": 1}}, "unknown input 'missing'"),
        ({"message": "{{ steps.place_order.output }}"}, "not upstream of this step"),
    ]:
        with pytest.raises(SpecError, match=message):
            parse_workflow(purchase(**change))
    with pytest.raises(SpecError, match="'sign_off' is a approval step: depend on"):
        parse_workflow(purchase() | {"steps": [*purchase()["steps"][:2], counted_step("x", ["sign_off"])]})


# --- the gateway -------------------------------------------------------------------------------------


def test_gateway_lists_and_decides_with_scopes_and_approvers(store_url, instance, gateway, make_key):
    flow = Parking(instance, [purchase()])
    _, request = park(flow)
    client = gateway()
    reader = {"Authorization": f"Bearer {make_key('reader', 'approvals:read')}"}
    ann = {"Authorization": f"Bearer {make_key('ann-key', 'approvals:decide', principal='ann')}"}
    eve = {"Authorization": f"Bearer {make_key('eve-key', 'approvals:decide', principal='eve')}"}
    dave = {
        "Authorization": f"Bearer {make_key('dave-key', 'approvals:decide', principal='dave', groups=['finance'])}"
    }

    listed = client.get("/v1/approvals", headers=reader)
    assert listed.status_code == 200
    (item,) = listed.json()["approvals"]
    assert item["id"] == request.id and item["status"] == "pending"
    assert item["approvers"] == {"principals": ["ann", "bob"], "groups": ["finance"]}
    assert (
        client.get("/v1/approvals", params={"status": "approved"}, headers=reader).json()["approvals"] == []
    )

    path = f"/v1/approvals/{request.id}/approve"
    assert client.get("/v1/approvals").status_code == 401
    assert client.post(path, headers=reader, json={}).status_code == 403, "needs approvals:decide"
    refused = client.post(path, headers=eve, json={"inputs": {"po_number": "PO-1"}})
    assert refused.status_code == 403 and "not an approver" in refused.json()["detail"]
    invalid = client.post(path, headers=ann, json={"inputs": {"po_number": "PO-1", "budget": "x"}})
    assert invalid.status_code == 422 and invalid.json()["field"] == "body.inputs"
    assert client.post("/v1/approvals/00000000/approve", headers=ann, json={}).status_code == 404

    approved = client.post(path, headers=dave, json={"comment": "ok", "inputs": {"po_number": "PO-1"}})
    assert approved.status_code == 200, approved.text
    assert approved.json()["status"] == "approved"
    assert approved.json()["decisions"][0]["principal"] == "dave"
    again = client.post(f"/v1/approvals/{request.id}/reject", headers=ann, json={})
    assert again.status_code == 409 and again.json()["type"] == "urn:junction:problem:conflict"
    (entry,) = audit.query(action="approval.approve")
    assert (entry.actor, entry.origin) == ("dave", "gateway")

    (resume,) = flow.tick()
    assert flow.launch(resume).success
    assert workflow_scripts.CALLS == ["prepare", "place_order"]


# --- the CLI -----------------------------------------------------------------------------------------


def test_cli_lists_approves_and_rejects(store_url, instance):
    flow = Parking(instance, [purchase(required_approvals=2)])
    _, request = park(flow)
    runner = CliRunner()
    listing = runner.invoke(cli, ["approvals", "list"])
    assert listing.exit_code == 0, listing.output
    header, row = listing.output.splitlines()
    assert header.split()[:5] == ["ID", "WORKFLOW", "STEP", "STATUS", "APPROVED"]
    assert row.split()[:5] == [request.id, "purchase", "sign_off", "pending", "0/2"]

    approved = runner.invoke(
        cli,
        [
            "approvals",
            "approve",
            request.id,
            "--as",
            "ann",
            "--input",
            "po_number=PO-9",
            "--input",
            "budget=5",
        ],
    )
    assert approved.exit_code == 0, approved.output
    assert f"ann approved approval request {request.id} (purchase/sign_off): now pending" in approved.output
    bad = runner.invoke(cli, ["approvals", "approve", request.id, "--as", "bob", "--input", "budget=many"])
    assert bad.exit_code != 0 and "'budget' must be of type integer" in str(bad.exception)
    rejected = runner.invoke(cli, ["approvals", "reject", request.id, "--as", "bob", "--comment", "no"])
    assert rejected.exit_code == 0, rejected.output
    assert "now rejected; the resume sensor continues the workflow" in rejected.output
    decisions = approvals.get_request(request.id).decisions
    assert [(d.principal, d.decision, d.inputs) for d in decisions] == [
        ("ann", "approve", {"po_number": "PO-9", "budget": 5}),
        ("bob", "reject", {}),
    ]
    as_json = runner.invoke(cli, ["approvals", "list", "--status", "all", "--json"])
    assert '"status": "rejected"' in as_json.output


def test_a_decision_before_the_resume_wins_over_the_timeout(store_url, instance, monkeypatch):
    clock = Clock(monkeypatch)
    flow = Parking(instance, [purchase(on_timeout="fail")])
    _, request = park(flow)
    clock.advance(hours=3)
    decide(request.id, "ann")
    (resume,) = flow.tick()
    assert flow.launch(resume).success
    assert approvals.get_request(request.id).resolution == "decision"
    assert audit.query(action="approval.timeout") == []


def test_an_execution_parks_twice_and_resumes_each_time_once(store_url, instance, monkeypatch):
    clock = Clock(monkeypatch)
    spec = purchase()
    spec["steps"] = [
        counted_step("prepare"),
        {"id": "cool_off", "type": "delay", "depends_on": ["prepare"], "config": {"duration": "30m"}},
        {**spec["steps"][1], "depends_on": ["cool_off"]},
        *spec["steps"][2:],
    ]
    flow = Parking(instance, [spec])
    first = flow.start("purchase", tags=REQUESTER, amount=5000)
    execution_id = flow.run_tags(first)["junction/execution_id"]
    clock.advance(minutes=31)
    (after_delay,) = flow.tick()
    second = flow.launch(after_delay)
    assert flow.run_tags(second)[parking.PARKED_STEP_TAG] == "sign_off"
    assert flow.tick() == [], "now waiting for the approval"
    request = approvals.request_for_step(execution_id, "sign_off")
    decide(request.id, "bob")
    (after_approval,) = flow.tick()
    assert after_delay.run_key == f"resume:{execution_id}:cool_off"
    assert after_approval.run_key == f"resume:{execution_id}:sign_off"
    third = flow.launch(after_approval)
    assert third.success and flow.tick() == []
    assert workflow_scripts.CALLS == ["prepare", "place_order"]
    assert flow.output_metadata(third, "cool_off")["restored"] == parking.RESTORED
    assert len(flow.execution_runs(execution_id)) == 3
