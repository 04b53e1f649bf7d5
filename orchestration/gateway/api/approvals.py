"""Approval requests of parked workflows: list them, approve or reject them.

Listing needs `approvals:read`; deciding needs `approvals:decide` *and* being one of the request's
approvers (by principal name or group). A decision is only recorded (and audited with the caller as
its principal): the resume sensor launches the execution's next run, so a decision never resumes an
execution twice. Deciding a request that is no longer pending, or twice, answers 409.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from orchestration.gateway.problems import ProblemError, problem_responses
from orchestration.gateway.security import requires
from orchestration.kernel.principals import Principal
from orchestration.workflows import approvals
from orchestration.workflows.approvals import ApprovalInfo

router = APIRouter(tags=["approvals"])

RequestId = Annotated[str, Path(max_length=32, pattern=r"^[0-9a-f]{1,32}$")]


class Approvers(BaseModel):
    principals: list[str]
    groups: list[str]


class Decision(BaseModel):
    principal: str
    decision: Literal["approve", "reject"]
    comment: str
    inputs: dict[str, Any]
    decided_at: datetime


class Approval(BaseModel):
    id: str
    execution_id: str
    workflow: str
    step_id: str
    message: str
    approvers: Approvers
    required_approvals: int
    timeout_at: datetime | None
    on_timeout: Literal["approve", "reject", "fail"]
    form_inputs: dict[str, Any] = Field(description="The form inputs a decider may fill in, by name.")
    forbid_self_approval: bool
    requester: str
    status: Literal["pending", "approved", "rejected", "failed"]
    resolution: Literal["decision", "auto", "timeout"] | None
    created_at: datetime
    decided_at: datetime | None
    decisions: list[Decision]


class ApprovalList(BaseModel):
    approvals: list[Approval]


class DecisionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    comment: str = Field(default="", max_length=4000)
    inputs: dict[str, str | int | float | bool] = Field(
        default_factory=dict, max_length=100, description="Form inputs the request declares."
    )


def _approval(info: ApprovalInfo) -> Approval:
    return Approval.model_validate(info.to_json())


@router.get("/approvals", response_model=ApprovalList, responses=problem_responses(401, 403, 422, 503))
async def list_approvals(
    _: Annotated[Principal, Depends(requires("approvals:read", read_only=True))],
    status: Literal["pending", "approved", "rejected", "failed", "all"] = Query(
        default="pending", description="Only requests of this status, or all of them."
    ),
    limit: int = Query(default=100, ge=1, le=1000),
):
    """Approval requests, newest first (pending ones by default)."""
    infos = await anyio.to_thread.run_sync(
        lambda: approvals.list_requests(status=None if status == "all" else status, limit=limit)
    )
    return ApprovalList(approvals=[_approval(info) for info in infos])


async def _decide(request_id: str, decision: str, body: DecisionRequest, principal: Principal) -> Approval:
    def decide() -> ApprovalInfo:
        return approvals.decide(
            request_id,
            principal=principal.name,
            groups=principal.groups,
            decision=decision,
            comment=body.comment,
            inputs=body.inputs,
            origin="gateway",
        )

    try:
        return _approval(await anyio.to_thread.run_sync(decide))
    except approvals.ApprovalNotFound as exc:
        raise ProblemError(404, str(exc), slug="not-found") from None
    except approvals.ApprovalForbidden as exc:
        raise ProblemError(403, str(exc), title="Forbidden", slug="forbidden") from None
    except approvals.ApprovalConflict as exc:
        raise ProblemError(409, str(exc), slug="conflict") from None
    except approvals.ApprovalInvalid as exc:
        raise ProblemError(
            422, str(exc), title="Invalid request", slug="validation", field="body.inputs"
        ) from None


DECISION_RESPONSES = problem_responses(400, 401, 403, 404, 409, 413, 415, 422, 503)


@router.post("/approvals/{request_id}/approve", response_model=Approval, responses=DECISION_RESPONSES)
async def approve(
    request_id: RequestId,
    principal: Annotated[Principal, Depends(requires("approvals:decide"))],
    body: DecisionRequest | None = None,
):
    """Approve as the caller (an approver of the request); approved once enough approvers did."""
    return await _decide(request_id, "approve", body or DecisionRequest(), principal)


@router.post("/approvals/{request_id}/reject", response_model=Approval, responses=DECISION_RESPONSES)
async def reject(
    request_id: RequestId,
    principal: Annotated[Principal, Depends(requires("approvals:decide"))],
    body: DecisionRequest | None = None,
):
    """Reject as the caller (an approver of the request); one rejection rejects the request."""
    return await _decide(request_id, "reject", body or DecisionRequest(), principal)
