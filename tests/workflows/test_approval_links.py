"""Signed e-mail approval links end to end: a real SMTP server (aiosmtpd) receives each approver's
e-mail; its links are opened on the real gateway over a real platform store. GET only shows a page;
the POST decides once (audited as the approver, origin email-link); reuse answers 409; altered, foreign
and expired tokens are refused; the resume sensor then continues the execution."""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest
import workflow_scripts
import yaml
from aiosmtpd.controller import Controller
from parking_harness import Parking, counted_step
from support import free_port

from orchestration.kernel import audit
from orchestration.settings import reset_settings_cache
from orchestration.workflows import approval_links, approvals

PUBLIC_URL = "https://junction.example.com"


class Mailbox:
    def __init__(self) -> None:
        self.envelopes: list = []

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802 - aiosmtpd's hook name
        self.envelopes.append(envelope)
        return "250 Message accepted for delivery"

    def messages(self) -> list[email.message.EmailMessage]:
        return [email.message_from_bytes(e.content, policy=email.policy.default) for e in self.envelopes]

    def links_for(self, address: str) -> dict[str, str]:
        (message,) = [m for m in self.messages() if m["To"] == address]
        body = message.get_body(("plain",)).get_content()
        return {
            "approve": re.search(r"Approve: (\S+)", body).group(1),
            "reject": re.search(r"Reject:  (\S+)", body).group(1),
        }


@pytest.fixture
def mailbox(tmp_path, monkeypatch, store_url) -> Iterator[Mailbox]:
    """aiosmtpd behind the channel `approvers`; links point at PUBLIC_URL."""
    box = Mailbox()
    controller = Controller(box, hostname="127.0.0.1", port=free_port())
    controller.start()
    channels = tmp_path / "channels.yaml"
    channels.write_text(
        yaml.safe_dump(
            {
                "channels": {
                    "approvers": {
                        "kind": "email",
                        "host": "127.0.0.1",
                        "port": controller.port,
                        "security": "none",
                        "sender": "junction@example.com",
                        "retry": {"max_attempts": 1},
                    }
                }
            }
        )
    )
    monkeypatch.setenv("JUNCTION_CHANNELS_FILE", str(channels))
    monkeypatch.setenv("JUNCTION_PUBLIC_URL", PUBLIC_URL)
    reset_settings_cache()
    try:
        yield box
    finally:
        controller.stop()


@pytest.fixture(autouse=True)
def no_calls_yet():
    workflow_scripts.CALLS.clear()


SPEC = {
    "name": "purchase_by_mail",
    "inputs": {"amount": {"type": "number", "default": 5000}},
    "steps": [
        counted_step("prepare"),
        {
            "id": "sign_off",
            "type": "approval",
            "depends_on": ["prepare"],
            "config": {
                "message": "Approve the purchase of {{ inputs.amount }} EUR",
                "approvers": {"principals": ["ann", "bob"]},
                "timeout": "2h",
                "inputs": {"po_number": {"type": "string", "required": True}, "budget": {"type": "integer"}},
                "notify": {
                    "channel": "approvers",
                    "addresses": {"ann": "ann@example.com", "bob": "{{ 'bob' }}@example.com"},
                    "subject": "Purchase of {{ inputs.amount }} EUR",
                },
            },
        },
        counted_step("place_order", ["sign_off.approved"]),
        counted_step("tell_requester", ["sign_off.rejected"]),
    ],
}


def gateway_path(link: str) -> tuple[str, str]:
    """The gateway-relative path and the token of a link from an e-mail."""
    parts = urlsplit(link)
    assert f"{parts.scheme}://{parts.netloc}" == PUBLIC_URL
    path = parts.path.removeprefix("/gateway")
    return path, parse_qs(parts.query)["token"][0]


def park(instance) -> tuple[Parking, approvals.ApprovalInfo]:
    flow = Parking(instance, [SPEC])
    first = flow.start("purchase_by_mail")
    assert first.success
    execution_id = flow.run_tags(first)["junction/execution_id"]
    return flow, approvals.request_for_step(execution_id, "sign_off")


def test_each_approver_gets_their_own_links_and_get_never_decides(mailbox, gateway, instance):
    flow, request = park(instance)
    messages = mailbox.messages()
    assert sorted(m["To"] for m in messages) == ["ann@example.com", "bob@example.com"]
    assert {m["Subject"] for m in messages} == {"Purchase of 5000.0 EUR"}
    ann, bob = mailbox.links_for("ann@example.com"), mailbox.links_for("bob@example.com")
    assert len({ann["approve"], ann["reject"], bob["approve"], bob["reject"]}) == 4
    assert ann["approve"].startswith(f"{PUBLIC_URL}/gateway/v1/approvals/{request.id}/confirm?token=")

    client = gateway()
    path, token = gateway_path(ann["approve"])
    for _ in range(2):  # a mail scanner's prefetch, then the person
        page = client.get(f"{path}?token={token}")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "Approve the purchase of 5000.0 EUR" in page.text and "as <strong>ann</strong>" in page.text
        assert f'name="token" value="{token}"' in page.text and 'name="input.po_number"' in page.text
    assert approvals.get_request(request.id).status == approvals.PENDING
    assert audit.query(action="approval.approve") == []
    assert flow.tick() == [], "opening a link resumes nothing"

    # A required form input missing: nothing is recorded, the link still works afterwards.
    missing = client.post(path, data={"token": token})
    assert missing.status_code == 422 and "po_number" in missing.text
    assert approvals.get_request(request.id).decisions == []

    decided = client.post(
        path, data={"token": token, "comment": "fine", "input.po_number": "PO-9", "input.budget": "12"}
    )
    assert decided.status_code == 200, decided.text
    assert "ann approved request" in decided.text
    settled = approvals.get_request(request.id)
    assert settled.status == approvals.APPROVED and settled.inputs() == {"po_number": "PO-9", "budget": 12}
    (entry,) = audit.query(action="approval.approve")
    assert (entry.actor, entry.origin, entry.target) == ("ann", "email-link", f"approval:{request.id}")
    assert entry.details["comment"] == "fine"

    # Single use: the same link again, ann's other link, and bob's link after the request settled.
    assert client.post(path, data={"token": token}).status_code == 409
    assert client.get(f"{path}?token={token}").status_code == 409
    reject_path, reject_token = gateway_path(ann["reject"])
    assert client.post(reject_path, data={"token": reject_token}).status_code == 409
    bob_path, bob_token = gateway_path(bob["reject"])
    again = client.post(bob_path, data={"token": bob_token})
    assert again.status_code == 409 and "already approved" in again.text

    (resume,) = flow.tick()
    second = flow.launch(resume)
    assert flow.step_statuses(second)["place_order"] == "SUCCESS"
    assert workflow_scripts.CALLS == ["prepare", "place_order"]


def test_altered_foreign_and_expired_links_are_refused(mailbox, gateway, instance, monkeypatch):
    _, request = park(instance)
    client = gateway()
    path, token = gateway_path(mailbox.links_for("bob@example.com")["reject"])

    middle = len(token) // 2
    altered = token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1 :]
    for response in (client.get(f"{path}?token={altered}"), client.post(path, data={"token": altered})):
        assert response.status_code == 403 and "not valid" in response.text
    no_token = client.post(path, data={"comment": "x"})  # not a form the page made: a malformed request
    assert no_token.status_code == 422 and no_token.headers["content-type"] == "application/problem+json"

    other = approvals.open_request(
        execution_id="another",
        workflow="w",
        step_id="s",
        message="m",
        approver_principals=["bob"],
        approver_groups=[],
        required_approvals=1,
        timeout_at=None,
        on_timeout="reject",
        form_inputs={},
        forbid_self_approval=False,
        requester="",
        auto_approved=False,
    )
    foreign = client.post(f"/v1/approvals/{other.id}/confirm", data={"token": token})
    assert foreign.status_code == 403 and "not issued for this request" in foreign.text

    # A token minted three hours ago for a request that times out after two.
    import itsdangerous.timed

    real = itsdangerous.timed.TimestampSigner.get_timestamp
    monkeypatch.setattr(
        itsdangerous.timed.TimestampSigner, "get_timestamp", lambda self: real(self) - 3 * 3600
    )
    old = approval_links.link_token(request.id, "bob", "reject")
    monkeypatch.setattr(itsdangerous.timed.TimestampSigner, "get_timestamp", real)
    for response in (client.get(f"{path}?token={old}"), client.post(path, data={"token": old})):
        assert response.status_code == 410 and "expired" in response.text
    assert approvals.get_request(request.id).status == approvals.PENDING

    # A form body is accepted only by the confirm page; the JSON API still answers 415 to it.
    refused = client.post(f"/v1/approvals/{request.id}/approve", data={"token": token})
    assert refused.status_code == 415

    # The untouched link still works.
    assert client.post(path, data={"token": token}).status_code == 200
    assert approvals.get_request(request.id).status == approvals.REJECTED


def test_notify_names_only_principal_approvers():
    from orchestration.kernel.spec_errors import SpecError
    from orchestration.workflows.spec import parse_workflow

    spec = yaml.safe_load(yaml.safe_dump(SPEC))
    spec["steps"][1]["config"]["notify"]["addresses"]["carol"] = "carol@example.com"
    with pytest.raises(SpecError, match=r"notify.addresses: carol not among approvers.principals"):
        parse_workflow(spec, "mail.yaml")
