"""`junction approvals`: list approval requests of parked workflows, approve or reject them.

Deciding only records the decision (audited with the deciding principal): the resume sensor starts
the execution's next run. The principal is the OS user, or `--as NAME` (with `--group` for approvers
named by group) for someone deciding through an operator at the console.
"""

from __future__ import annotations

import json

import click

from orchestration.cli.common import render_table
from orchestration.cli.keys import cli_actor

PAST_TENSE = {"approve": "approved", "reject": "rejected"}


@click.group()
def approvals() -> None:
    """Approval requests of workflow Approval steps."""


@approvals.command(name="list")
@click.option(
    "--status",
    type=click.Choice(["pending", "approved", "rejected", "failed", "all"]),
    default="pending",
    show_default=True,
)
@click.option("--json", "as_json", is_flag=True, help="A JSON array instead of a table.")
def list_approvals(status: str, as_json: bool) -> None:
    """List approval requests, newest first."""
    from orchestration.workflows.approvals import list_requests

    requests = list_requests(status=None if status == "all" else status)
    if as_json:
        click.echo(json.dumps([request.to_json() for request in requests], indent=2))
        return
    if not requests:
        click.echo(f"no {'' if status == 'all' else status + ' '}approval requests")
        return
    rows = [
        (
            request.id,
            request.workflow,
            request.step_id,
            request.status,
            f"{sum(d.decision == 'approve' for d in request.decisions)}/{request.required_approvals}",
            ",".join(request.approver_principals + [f"@{g}" for g in request.approver_groups]),
            request.timeout_at.strftime("%Y-%m-%d %H:%M") if request.timeout_at else "-",
            request.message.splitlines()[0] if request.message else "",
        )
        for request in requests
    ]
    headers = ("ID", "WORKFLOW", "STEP", "STATUS", "APPROVED", "APPROVERS", "TIMEOUT", "MESSAGE")
    click.echo(render_table(headers, rows))


def _decide(decision: str, request_id: str, comment: str, inputs: tuple[str, ...], as_principal, groups):
    from orchestration.workflows import approvals as approval_store

    request = approval_store.get_request(request_id)
    if request is None:
        raise approval_store.ApprovalNotFound(f"no approval request {request_id!r}")
    principal = as_principal or cli_actor()
    decided = approval_store.decide(
        request_id,
        principal=principal,
        groups=frozenset(groups),
        decision=decision,
        comment=comment,
        inputs=dict(approval_store.parse_form_text(request, text) for text in inputs),
        origin="cli",
    )
    click.echo(
        f"{principal} {PAST_TENSE[decision]} approval request {decided.id} ({decided.workflow}/{decided.step_id}): "
        f"now {decided.status}"
        + ("; the resume sensor continues the workflow" if decided.status != "pending" else "")
    )


def _decision_command(decision: str):
    @click.argument("request_id")
    @click.option("--comment", default="", help="Why (kept with the decision and in the audit log).")
    @click.option("--input", "inputs", multiple=True, metavar="K=V", help="A form input (repeatable).")
    @click.option("--as", "as_principal", help="Decide as this principal (default: the OS user).")
    @click.option("--group", "groups", multiple=True, help="A group of the principal (repeatable).")
    def command(request_id, comment, inputs, as_principal, groups) -> None:
        _decide(decision, request_id, comment, inputs, as_principal, groups)

    command.__doc__ = f"{decision.title()} approval request REQUEST_ID."
    return approvals.command(name=decision)(command)


approve = _decision_command("approve")
reject = _decision_command("reject")
