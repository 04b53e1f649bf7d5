"""Signed, single-use, expiring approve/reject links in approval e-mails.

When an Approval step with `notify` opens its request, each notified approver gets an e-mail with two
links, `{public_url}{gateway_prefix}/v1/approvals/{id}/confirm?token=…`, one per decision. The token
is the kernel's (`signed_links.sign("approval-link", {request, approver, decision})`); it proves who
may decide what, so the link needs no API key. It expires with the request's timeout
(`timeout_at - created_at`), or after `DEFAULT_LIFETIME` for a request without one.

Opening a link (GET) only shows a confirm page — mail scanners prefetch links, so a GET never
decides. The page's form POSTs the token back in its body (the token is the CSRF proof: a forged form
cannot know it), and only that POST records the decision as the token's approver, audited with origin
`email-link`. Single use needs no table of used tokens: an approver decides a request once
(`approvals.decide` refuses a second decision, and any decision once the request is settled), so a
second POST of the same link, or of the other link, is a conflict.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import quote

from orchestration.kernel import signed_links
from orchestration.workflows import approvals
from orchestration.workflows.approvals import ApprovalInfo

PURPOSE = "approval-link"
DEFAULT_LIFETIME = timedelta(days=7)
EMAIL_LINK_ORIGIN = "email-link"
LINK_DECISIONS = ("approve", "reject")


class LinkRefused(Exception):
    """The link cannot be used: `status` is the HTTP answer (403 forged/other request, 404, 410 expired)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class CheckedLink:
    request: ApprovalInfo
    approver: str
    decision: str


def link_token(request_id: str, approver: str, decision: str) -> str:
    if decision not in LINK_DECISIONS:
        raise ValueError(f"decision must be one of {', '.join(LINK_DECISIONS)}")
    return signed_links.sign(PURPOSE, {"request": request_id, "approver": approver, "decision": decision})


def confirm_url(request_id: str, token: str) -> str:
    from orchestration.settings import get_settings

    settings = get_settings()
    return (
        f"{settings.public_url}{settings.gateway_prefix}/v1/approvals/{quote(request_id)}/confirm"
        f"?token={quote(token)}"
    )


def lifetime(request: ApprovalInfo) -> timedelta:
    """How long the request's links stay valid: until its timeout, or `DEFAULT_LIFETIME`."""
    if request.timeout_at is None:
        return DEFAULT_LIFETIME
    return max(request.timeout_at - request.created_at, timedelta(seconds=1))


def check_link(request_id: str, token: str) -> CheckedLink:
    """The request, approver and decision a link stands for; `LinkRefused` when it may not be used.

    The signature is checked before the request is looked up, so a forged token learns nothing about
    which requests exist; its age is checked against the request's own lifetime."""
    try:
        payload = signed_links.verify(PURPOSE, token)
    except signed_links.InvalidLink as exc:
        raise LinkRefused(403, exc.reason) from None
    approver, decision = payload.get("approver"), payload.get("decision")
    if (
        payload.get("request") != request_id
        or not isinstance(approver, str)
        or decision not in LINK_DECISIONS
    ):
        raise LinkRefused(403, "the link is not valid (altered, or not issued for this request)")
    request = approvals.get_request(request_id)
    if request is None:
        raise LinkRefused(404, f"no approval request {request_id!r}")
    try:
        signed_links.verify(PURPOSE, token, max_age_s=lifetime(request).total_seconds())
    except signed_links.InvalidLink as exc:
        raise LinkRefused(410, exc.reason) from None
    return CheckedLink(request, approver, decision)


def already_decided(link: CheckedLink) -> str | None:
    """Why the link's decision can no longer be made (the request settled, or this approver decided)."""
    request = link.request
    mine = [d for d in request.decisions if d.principal == link.approver]
    if mine:
        return f"{link.approver} already decided this request ({mine[0].decision})"
    if request.status != approvals.PENDING:
        return f"this request is already {request.status}"
    return None


def decide_by_link(
    request_id: str, token: str, *, comment: str = "", inputs: dict[str, Any] | None = None
) -> ApprovalInfo:
    """Record the link's decision as its approver (audited, origin `email-link`)."""
    link = check_link(request_id, token)
    return approvals.decide(
        request_id,
        principal=link.approver,
        decision=link.decision,
        comment=comment,
        inputs=inputs or {},
        origin=EMAIL_LINK_ORIGIN,
    )


def notify_approvers(
    request: ApprovalInfo,
    *,
    channel: str,
    addresses: dict[str, str],
    subject: str,
    origin: str,
    log: Any = None,
) -> list[dict[str, Any]]:
    """One e-mail per approver in `addresses` (principal -> address) with their own approve and reject
    links. A failed delivery is logged and recorded (`notification_deliveries`), not raised: the
    request stays decidable through the gateway and the CLI, and its timeout still applies."""
    from resources.notifications import Message, NotificationError, send

    sent = []
    for approver, address in addresses.items():
        links = {
            decision: confirm_url(request.id, link_token(request.id, approver, decision))
            for decision in LINK_DECISIONS
        }
        body = (
            f"{request.message}\n\n"
            f"Approve: {links['approve']}\n"
            f"Reject:  {links['reject']}\n\n"
            f"Each link opens a page where you confirm; it is yours alone ({approver}), works once, "
            f"and expires {_expiry(request)}.\n"
            f"Workflow {request.workflow}, step {request.step_id}, request {request.id}."
        )
        message = Message(
            subject=subject, body=body, recipients=(address,), metadata={"approval": request.id}
        )
        try:
            record = send(channel, message, origin=f"{origin}/approval:{request.id}")
        except NotificationError as exc:
            if log is not None:
                log.warning(f"approval request {request.id}: could not e-mail {approver} <{address}>: {exc}")
            sent.append({"approver": approver, "status": "failed", "error": str(exc)})
            continue
        sent.append({"approver": approver, "status": record.status, "delivery_id": record.id})
    return sent


def _expiry(request: ApprovalInfo) -> str:
    moment = request.timeout_at or request.created_at + DEFAULT_LIFETIME
    return f"at {moment:%Y-%m-%d %H:%M} UTC"
