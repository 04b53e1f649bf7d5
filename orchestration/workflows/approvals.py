"""Approval requests and decisions, in the platform store.

An Approval step opens a request (or records it as auto-approved); principals decide through the
gateway or the CLI. Deciding only *records*: the request becomes `approved` once `required_approvals`
approvers approved, `rejected` at the first rejection, and the parked execution's checkpoint is made
due in the same transaction. Only the resume sensor launches the resumed run, so a decision can never
resume an execution twice. A request still pending at `timeout_at` is resolved by the resumed Approval
step with its policy (`approve`, `reject` or `fail`). Every decision and resolution is audited.

Who may decide: a principal named in `approver_principals` or a member of one of `approver_groups`;
never the requester when `forbid_self_approval`; once per request.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from orchestration.errors import JunctionError
from orchestration.kernel.audit import AuditEvent, run_audited
from orchestration.store.db import session_scope
from orchestration.store.models import ApprovalDecision, ApprovalRequest
from orchestration.workflows import parking

PENDING, APPROVED, REJECTED, FAILED = "pending", "approved", "rejected", "failed"
DECISIONS = {"approve": APPROVED, "reject": REJECTED}
TIMEOUT_POLICIES = {"approve": APPROVED, "reject": REJECTED, "fail": FAILED}
FORM_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
}


class ApprovalError(JunctionError):
    """An approval cannot be decided as asked."""


class ApprovalNotFound(ApprovalError):
    pass


class ApprovalConflict(ApprovalError):
    """Already decided, or this principal already decided."""


class ApprovalForbidden(ApprovalError):
    """Not an approver, or self-approval where it is forbidden."""


class ApprovalInvalid(ApprovalError):
    """Form inputs that the request does not declare or of the wrong type."""


@dataclass(frozen=True)
class DecisionInfo:
    principal: str
    decision: str
    comment: str
    inputs: dict[str, Any]
    decided_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "principal": self.principal,
            "decision": self.decision,
            "comment": self.comment,
            "inputs": self.inputs,
            "decided_at": self.decided_at.isoformat(),
        }


@dataclass(frozen=True)
class ApprovalInfo:
    id: str
    execution_id: str
    workflow: str
    step_id: str
    message: str
    approver_principals: list[str]
    approver_groups: list[str]
    required_approvals: int
    timeout_at: datetime | None
    on_timeout: str
    form_inputs: dict[str, Any]
    forbid_self_approval: bool
    requester: str
    status: str
    resolution: str | None
    created_at: datetime
    decided_at: datetime | None
    decisions: list[DecisionInfo] = field(default_factory=list)

    def inputs(self) -> dict[str, Any]:
        """The form inputs of the decisions that made the outcome (later decisions win)."""
        outcome_decision = {APPROVED: "approve", REJECTED: "reject"}.get(self.status)
        merged: dict[str, Any] = {}
        for decision in self.decisions:
            if decision.decision == outcome_decision:
                merged.update(decision.inputs)
        return merged

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "execution_id": self.execution_id,
            "workflow": self.workflow,
            "step_id": self.step_id,
            "message": self.message,
            "approvers": {"principals": self.approver_principals, "groups": self.approver_groups},
            "required_approvals": self.required_approvals,
            "timeout_at": self.timeout_at.isoformat() if self.timeout_at else None,
            "on_timeout": self.on_timeout,
            "form_inputs": self.form_inputs,
            "forbid_self_approval": self.forbid_self_approval,
            "requester": self.requester,
            "status": self.status,
            "resolution": self.resolution,
            "created_at": self.created_at.isoformat(),
            "decided_at": self.decided_at.isoformat() if self.decided_at else None,
            "decisions": [decision.to_json() for decision in self.decisions],
        }


def _info(session: Session, row: ApprovalRequest) -> ApprovalInfo:
    decisions = session.scalars(
        select(ApprovalDecision)
        .where(ApprovalDecision.request_id == row.id)
        .order_by(ApprovalDecision.decided_at, ApprovalDecision.id)
    )
    return ApprovalInfo(
        id=row.id,
        execution_id=row.execution_id,
        workflow=row.workflow,
        step_id=row.step_id,
        message=row.message,
        approver_principals=list(row.approver_principals),
        approver_groups=list(row.approver_groups),
        required_approvals=row.required_approvals,
        timeout_at=row.timeout_at,
        on_timeout=row.on_timeout,
        form_inputs=dict(row.form_inputs),
        forbid_self_approval=row.forbid_self_approval,
        requester=row.requester,
        status=row.status,
        resolution=row.resolution,
        created_at=row.created_at,
        decided_at=row.decided_at,
        decisions=[
            DecisionInfo(d.principal, d.decision, d.comment, dict(d.inputs), d.decided_at) for d in decisions
        ],
    )


def open_request(
    *,
    execution_id: str,
    workflow: str,
    step_id: str,
    message: str,
    approver_principals: list[str],
    approver_groups: list[str],
    required_approvals: int,
    timeout_at: datetime | None,
    on_timeout: str,
    form_inputs: dict[str, Any],
    forbid_self_approval: bool,
    requester: str,
    auto_approved: bool,
    engine: Engine | None = None,
) -> ApprovalInfo:
    """The step's request, created (audited) unless it exists: a retried or resumed step reuses it."""
    existing = request_for_step(execution_id, step_id, engine=engine)
    if existing is not None:
        return existing
    now = parking.utc_now()

    def insert(session: Session) -> tuple[ApprovalInfo, AuditEvent]:
        row = ApprovalRequest(
            id=secrets.token_hex(8),
            execution_id=execution_id,
            workflow=workflow,
            step_id=step_id,
            message=message,
            approver_principals=approver_principals,
            approver_groups=approver_groups,
            required_approvals=required_approvals,
            timeout_at=timeout_at,
            on_timeout=on_timeout,
            form_inputs=form_inputs,
            forbid_self_approval=forbid_self_approval,
            requester=requester,
            status=APPROVED if auto_approved else PENDING,
            resolution="auto" if auto_approved else None,
            created_at=now,
            decided_at=now if auto_approved else None,
        )
        session.add(row)
        session.flush()
        event = AuditEvent(
            action="approval.auto_approve" if auto_approved else "approval.request",
            actor=f"workflow:{workflow}",
            target=f"approval:{row.id}",
            origin="workflow",
            details={"execution_id": execution_id, "step": step_id, "requester": requester},
        )
        return _info(session, row), event

    try:
        info, _ = run_audited(insert, engine=engine)
    except IntegrityError:
        # The same step opened it concurrently (a retry racing its predecessor): use that one.
        return request_for_step(execution_id, step_id, engine=engine)
    return info


def request_for_step(execution_id: str, step_id: str, *, engine: Engine | None = None) -> ApprovalInfo | None:
    with session_scope(engine) as session:
        row = session.scalar(
            select(ApprovalRequest)
            .where(ApprovalRequest.execution_id == execution_id)
            .where(ApprovalRequest.step_id == step_id)
        )
        return _info(session, row) if row is not None else None


def get_request(request_id: str, *, engine: Engine | None = None) -> ApprovalInfo | None:
    with session_scope(engine) as session:
        row = session.get(ApprovalRequest, request_id)
        return _info(session, row) if row is not None else None


def list_requests(
    *, status: str | None = None, limit: int = 100, engine: Engine | None = None
) -> list[ApprovalInfo]:
    """Requests newest first, optionally of one status."""
    statement = select(ApprovalRequest).order_by(ApprovalRequest.created_at.desc()).limit(limit)
    if status is not None:
        statement = statement.where(ApprovalRequest.status == status)
    with session_scope(engine) as session:
        return [_info(session, row) for row in session.scalars(statement)]


def may_decide(request: ApprovalInfo | ApprovalRequest, principal: str, groups: frozenset[str]) -> bool:
    return principal in request.approver_principals or bool(groups & set(request.approver_groups))


def _checked_inputs(declared: dict[str, Any], given: dict[str, Any], decision: str) -> dict[str, Any]:
    unknown = sorted(set(given) - set(declared))
    if unknown:
        known = ", ".join(sorted(declared)) or "none"
        raise ApprovalInvalid(f"unknown form input(s) {', '.join(unknown)} (declared: {known})")
    for name, spec in declared.items():
        value = given.get(name)
        if value is None:
            if spec.get("required") and decision == "approve":
                raise ApprovalInvalid(f"form input {name!r} is required to approve")
            continue
        allowed = FORM_TYPES[spec.get("type", "string")]
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise ApprovalInvalid(f"form input {name!r} must be of type {spec.get('type', 'string')}")
    return {name: value for name, value in given.items() if value is not None}


def decide(
    request_id: str,
    *,
    principal: str,
    groups: frozenset[str] = frozenset(),
    decision: str,
    comment: str = "",
    inputs: dict[str, Any] | None = None,
    origin: str,
    engine: Engine | None = None,
) -> ApprovalInfo:
    """Record `principal`'s decision (`approve` or `reject`) and audit it; see the module doc."""
    if decision not in DECISIONS:
        raise ApprovalInvalid(f"decision must be one of {', '.join(DECISIONS)}")

    def record(session: Session) -> tuple[ApprovalInfo, AuditEvent]:
        row = session.get(ApprovalRequest, request_id, with_for_update=True)
        if row is None:
            raise ApprovalNotFound(f"no approval request {request_id!r}")
        if row.status != PENDING:
            raise ApprovalConflict(f"approval request {request_id} is already {row.status}")
        if not may_decide(row, principal, groups):
            raise ApprovalForbidden(f"{principal} is not an approver of request {request_id}")
        if row.forbid_self_approval and row.requester and principal == row.requester:
            raise ApprovalForbidden(f"{principal} requested this approval and may not decide it")
        already = session.scalar(
            select(ApprovalDecision.id)
            .where(ApprovalDecision.request_id == request_id)
            .where(ApprovalDecision.principal == principal)
        )
        if already is not None:
            raise ApprovalConflict(f"{principal} already decided approval request {request_id}")
        checked = _checked_inputs(row.form_inputs, inputs or {}, decision)
        now = parking.utc_now()
        session.add(
            ApprovalDecision(
                request_id=request_id,
                principal=principal,
                decision=decision,
                comment=comment,
                inputs=checked,
                decided_at=now,
            )
        )
        session.flush()
        approvals = session.scalars(
            select(ApprovalDecision.id)
            .where(ApprovalDecision.request_id == request_id)
            .where(ApprovalDecision.decision == "approve")
        ).all()
        if decision == "reject" or len(approvals) >= row.required_approvals:
            row.status = DECISIONS[decision]
            row.resolution = "decision"
            row.decided_at = now
            parking.wake_now(session, row.execution_id, row.step_id)
        event = AuditEvent(
            action=f"approval.{decision}",
            actor=principal,
            target=f"approval:{request_id}",
            origin=origin,
            details={
                "execution_id": row.execution_id,
                "workflow": row.workflow,
                "step": row.step_id,
                "comment": comment,
                "inputs": checked,
                "status": row.status,
            },
        )
        return _info(session, row), event

    info, _ = run_audited(record, engine=engine)
    if info.status == PENDING:
        retag_parked_run(info, engine=engine)
    return info


def waiting_summary(request: ApprovalInfo) -> str:
    """`approval f6d5…: 1 of 2 from local-admin or finance, until 2026-12-06 18:00 UTC`: the parked
    run's `junction/waiting_on` tag."""
    approved = sum(1 for decision in request.decisions if decision.decision == "approve")
    who = " or ".join([*request.approver_principals, *request.approver_groups]) or "anyone allowed"
    until = f", until {parking.moment_text(request.timeout_at)}" if request.timeout_at else ""
    return f"approval {parking.short_id(request.id)}: {approved} of {request.required_approvals} from {who}{until}"


def deciding_guidance(request: ApprovalInfo) -> tuple[str, ...]:
    """The exact command and call that decide the request (the parked step's log and metadata)."""
    lines = [
        f"decide from the CLI: junction approvals approve {request.id} "
        f"(or: junction approvals reject {request.id})",
        f"or through the API (scope approvals:decide): POST /gateway/v1/approvals/{request.id}/approve "
        '(or .../reject) with {"comment": "..."}',
    ]
    if request.timeout_at:
        lines.append(f"undecided at {request.timeout_at.isoformat()}: on_timeout {request.on_timeout}")
    return tuple(lines)


def retag_parked_run(request: ApprovalInfo, *, engine: Engine | None = None) -> None:
    """After a decision that leaves the request pending (1 of 2 approved), the parked run's
    `junction/waiting_on` says so. Best effort: the decision is recorded whatever happens here, and
    without a reachable Dagster instance the tag keeps the count of when the run parked."""
    import logging

    checkpoint = parking.get_checkpoint(request.execution_id, engine=engine)
    if (
        checkpoint is None
        or checkpoint.state != parking.WAITING
        or checkpoint.parked_step != request.step_id
        or not checkpoint.parked_run_id
    ):
        return
    try:
        from dagster import DagsterInstance

        from orchestration.settings import get_settings

        dagster_home = get_settings().dagster_home
        if not dagster_home.is_dir():  # no Dagster instance here (a gateway elsewhere): nothing to retag
            return
        with DagsterInstance.from_config(str(dagster_home)) as instance:
            instance.add_run_tags(
                checkpoint.parked_run_id, {parking.WAITING_ON_TAG: waiting_summary(request)}
            )
    except Exception:  # noqa: BLE001 - the tag is a courtesy; the decision stands
        logging.getLogger("junction.approvals").warning(
            "could not update the waiting_on tag of run %s", checkpoint.parked_run_id, exc_info=True
        )


class _NotTimedOut(Exception):
    """The request was decided (or its timeout moved) before the policy could apply."""


def resolve_timeout(request_id: str, *, engine: Engine | None = None) -> ApprovalInfo:
    """Apply the timeout policy to a request still pending past `timeout_at`, audited; a request
    decided in the meantime is returned as decided (the decision won the race)."""

    def resolve(session: Session) -> tuple[ApprovalInfo, AuditEvent]:
        row = session.get(ApprovalRequest, request_id, with_for_update=True)
        now = parking.utc_now()
        if row.status != PENDING or row.timeout_at is None or row.timeout_at > now:
            raise _NotTimedOut
        row.status = TIMEOUT_POLICIES[row.on_timeout]
        row.resolution = "timeout"
        row.decided_at = now
        session.flush()
        return _info(session, row), AuditEvent(
            action="approval.timeout",
            actor=f"workflow:{row.workflow}",
            target=f"approval:{request_id}",
            origin="workflow",
            details={"execution_id": row.execution_id, "step": row.step_id, "status": row.status},
        )

    try:
        info, _ = run_audited(resolve, engine=engine)
    except _NotTimedOut:
        return get_request(request_id, engine=engine)
    return info


def parse_form_text(request: ApprovalInfo, text: str) -> tuple[str, Any]:
    """`name=value` from the command line, typed by the request's declared form input."""
    name, separator, raw = text.partition("=")
    if not separator:
        raise ApprovalInvalid(f"{text!r} is not name=value")
    declared = request.form_inputs.get(name)
    if declared is None:
        known = ", ".join(sorted(request.form_inputs)) or "none"
        raise ApprovalInvalid(f"unknown form input {name!r} (declared: {known})")
    kind = declared.get("type", "string")
    try:
        if kind == "integer":
            return name, int(raw)
        if kind == "number":
            return name, float(raw)
    except ValueError:
        raise ApprovalInvalid(f"form input {name!r} must be of type {kind}, not {raw!r}") from None
    if kind == "boolean":
        if raw.lower() not in ("true", "false"):
            raise ApprovalInvalid(f"form input {name!r} must be true or false, not {raw!r}")
        return name, raw.lower() == "true"
    return name, raw
