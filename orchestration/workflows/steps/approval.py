"""Approval: ask principals to approve; continue on `<id>.approved` or `<id>.rejected`.

The step opens an approval request (`approvals.py`) and parks the workflow until it is decided or
times out. `auto_approve` is a kernel condition over the context: when it holds, the request is
recorded as auto-approved and the step continues without parking. The decision's form `inputs` and
its deciders become the step's output (`steps.<id>.output.inputs.<name>`).

On resume the step finds its request: decided, it takes the branch; pending past its timeout, it
applies `on_timeout` (`approve`, `reject`, or `fail`: the step fails).

`notify` e-mails the approvers it names when the request opens, each with their own signed,
single-use approve and reject links (`approval_links.py`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from orchestration.errors import JunctionError
from orchestration.kernel.times import DurationText
from orchestration.workflows.context import StepContext
from orchestration.workflows.steps.base import StepConfig, StepType

BRANCHES = ("approved", "rejected")
ACTOR_TAG = "junction/actor"
DAGSTER_USER_TAG = "dagster/user"


class Approvers(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    principals: list[str] = Field(default_factory=list, description="Principals who may decide.")
    groups: list[str] = Field(default_factory=list, description="Groups whose members may decide.")


class FormInput(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["string", "integer", "number", "boolean"] = "string"
    description: str = ""
    required: bool = Field(default=False, description="Required to approve.")


class ApprovalNotify(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    channel: str = Field(min_length=1, description="An email channel named in channels.yaml.")
    addresses: dict[str, str] = Field(
        min_length=1,
        description="Approver principal -> e-mail address (a template); each gets their own links.",
    )
    subject: str = Field(default="Approval needed: {{ execution.workflow }}", description="Template.")


class ApprovalConfig(StepConfig):
    message: str = Field(description="Template: what the approvers are asked.")
    approvers: Approvers
    required_approvals: int = Field(default=1, ge=1, description="N of the approvers must approve.")
    timeout: DurationText | None = Field(default=None, description="How long to wait: 90m, 12h, 2d, 1w.")
    on_timeout: Literal["approve", "reject", "fail"] = "reject"
    auto_approve: dict[str, Any] | None = Field(
        default=None,
        description="A kernel condition over the context; when it holds the step is auto-approved.",
    )
    inputs: dict[str, FormInput] = Field(
        default_factory=dict, description="Form inputs a decider may fill in; they flow into the output."
    )
    forbid_self_approval: bool = False
    requester: str | None = Field(
        default=None,
        description="Template naming who asks; default: the run's junction/actor (or dagster/user) tag.",
    )
    notify: ApprovalNotify | None = Field(
        default=None, description="E-mail the approvers signed approve/reject links when the request opens."
    )

    not_templates = frozenset({"approvers", "timeout", "on_timeout", "auto_approve", "inputs"})
    condition_fields = frozenset({"auto_approve"})

    @model_validator(mode="after")
    def _someone_decides(self) -> ApprovalConfig:
        if not self.approvers.principals and not self.approvers.groups:
            raise ValueError("approvers: name at least one principal or group")
        if self.notify is not None:
            strangers = sorted(set(self.notify.addresses) - set(self.approvers.principals))
            if strangers:
                raise ValueError(
                    f"notify.addresses: {', '.join(strangers)} not among approvers.principals "
                    "(a link decides as the principal it names)"
                )
        if not self.approvers.groups and self.required_approvals > len(self.approvers.principals):
            raise ValueError(
                f"required_approvals is {self.required_approvals} but only "
                f"{len(self.approvers.principals)} approver(s) are named"
            )
        return self


def request_approval(config: ApprovalConfig, context: StepContext) -> dict[str, Any]:
    from orchestration.kernel.conditions import evaluate, parse_condition
    from orchestration.kernel.times import parse_duration
    from orchestration.workflows import approvals
    from orchestration.workflows.parking import ParkStep, utc_now

    request = approvals.request_for_step(context.execution_id, context.step_id)
    opened_now = request is None
    if request is None:
        auto = config.auto_approve is not None and evaluate(
            parse_condition(config.auto_approve), context.variables()
        )
        requester = (
            str(context.render(config.requester))
            if config.requester is not None
            else context.run_tags.get(ACTOR_TAG) or context.run_tags.get(DAGSTER_USER_TAG, "")
        )
        request = approvals.open_request(
            execution_id=context.execution_id,
            workflow=context.workflow,
            step_id=context.step_id,
            message=str(context.render(config.message)),
            approver_principals=list(config.approvers.principals),
            approver_groups=list(config.approvers.groups),
            required_approvals=config.required_approvals,
            timeout_at=utc_now() + parse_duration(config.timeout) if config.timeout else None,
            on_timeout=config.on_timeout,
            form_inputs={name: spec.model_dump() for name, spec in config.inputs.items()},
            forbid_self_approval=config.forbid_self_approval,
            requester=requester,
            auto_approved=auto,
        )
    if opened_now and config.notify is not None and request.status == approvals.PENDING:
        from orchestration.workflows.approval_links import notify_approvers

        notify_approvers(
            request,
            channel=config.notify.channel,
            addresses={
                name: str(context.render(address)) for name, address in config.notify.addresses.items()
            },
            subject=str(context.render(config.notify.subject)),
            origin=f"workflow:{context.workflow}/{context.step_id}",
            log=context.log,
        )
    if request.status == approvals.PENDING and request.timeout_at and request.timeout_at <= utc_now():
        request = approvals.resolve_timeout(request.id)
    if request.status == approvals.PENDING:
        raise ParkStep(
            f"waiting for approval request {request.id}",
            request.timeout_at,
            summary=approvals.waiting_summary(request),
            guidance=approvals.deciding_guidance(request),
        )
    if request.status == approvals.FAILED:
        raise JunctionError(f"approval request {request.id} timed out (on_timeout: fail)")
    return {
        "request_id": request.id,
        "decision": request.status,
        "resolution": request.resolution,
        "decided_by": [d.principal for d in request.decisions],
        "comments": [d.comment for d in request.decisions if d.comment],
        "inputs": request.inputs(),
        "branch": request.status,
    }


STEP_TYPE = StepType(
    name="approval",
    description="Ask approvers; the workflow parks until they decide. Depend on `<id>.approved` or "
    "`<id>.rejected`.",
    config_model=ApprovalConfig,
    run=request_approval,
    outputs=BRANCHES,
    parks=True,
)
