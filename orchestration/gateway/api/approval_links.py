"""The pages behind the approve/reject links of approval e-mails (`workflows/approval_links.py`).

`GET /v1/approvals/{id}/confirm?token=…` shows the request and a confirm form and changes nothing
(mail scanners prefetch links). `POST` of that form (`application/x-www-form-urlencoded`: the token,
a comment, the request's form inputs as `input.<name>`) records the decision as the token's approver.
No API key: the signed token is the authority, scoped to one request, one approver and one decision,
which is why these two operations do not use `requires(...)`.

Answers are HTML pages for a person in a browser, with the status saying what happened: 200, 403 (an
altered token, one for another request, or an approver no longer allowed), 404, 409 (already decided —
the link is single use), 410 (expired), 422 (a form input of the wrong type, or a required one missing).
"""

from __future__ import annotations

import html
from typing import Annotated

import anyio
from fastapi import APIRouter, Form, Path, Query, Request
from fastapi.responses import HTMLResponse

from orchestration.gateway.problems import PROBLEM_MEDIA_TYPE, problem_responses
from orchestration.workflows import approval_links, approvals
from orchestration.workflows.approval_links import CheckedLink, LinkRefused

router = APIRouter(tags=["approvals"])

# Paths whose POST takes an HTML form body (the request guards let only these through as non-JSON).
FORM_PATHS = r"^/v1/approvals/[0-9a-f]{1,32}/confirm$"
MAX_TOKEN_LENGTH = 2000
FORM_INPUT_PREFIX = "input."

RequestId = Annotated[str, Path(max_length=32, pattern=r"^[0-9a-f]{1,32}$")]


def _page(status: int, title: str, body: str) -> HTMLResponse:
    document = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<meta name=robots content=noindex><title>{html.escape(title)}</title></head>"
        f"<body><main><h1>{html.escape(title)}</h1>{body}</main></body></html>"
    )
    return HTMLResponse(document, status_code=status)


def _text(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


REFUSED_TITLES = {
    403: "This link cannot be used",
    404: "No such approval request",
    410: "This link has expired",
}
HTML_PAGE = {"text/html": {"schema": {"type": "string"}}}


def _documented(*statuses: int) -> dict[int | str, dict]:
    responses: dict[int | str, dict] = {
        status: {"description": "An HTML page saying why.", "content": HTML_PAGE} for status in statuses
    }
    # FastAPI's own validation (a missing or oversized token) answers a problem document.
    responses[422] = {
        "description": "An HTML page (a form input of the wrong type) or a problem document (a malformed request).",
        "content": {**HTML_PAGE, PROBLEM_MEDIA_TYPE: {}},
    }
    return responses


def _refused(exc: LinkRefused) -> HTMLResponse:
    return _page(exc.status, REFUSED_TITLES.get(exc.status, "This link cannot be used"), _text(exc.reason))


def _confirm_form(link: CheckedLink, token: str) -> str:
    request = link.request
    verb = "Approve" if link.decision == "approve" else "Reject"
    fields = []
    if link.decision == "approve":
        for name, spec in request.form_inputs.items():
            label = f"{name} ({spec.get('type', 'string')}{', required' if spec.get('required') else ''})"
            if spec.get("description"):
                label += f": {spec['description']}"
            fields.append(
                f"<p><label>{html.escape(label)}<br>"
                f'<input name="{html.escape(FORM_INPUT_PREFIX + name)}"></label></p>'
            )
    return (
        f"<p><strong>{html.escape(request.message)}</strong></p>"
        f"<p>Workflow {html.escape(request.workflow)}, step {html.escape(request.step_id)}, "
        f"request {html.escape(request.id)}. You decide as <strong>{html.escape(link.approver)}</strong>.</p>"
        f'<form method="post" action="confirm">'
        f'<input type="hidden" name="token" value="{html.escape(token)}">'
        + "".join(fields)
        + '<p><label>Comment<br><textarea name="comment" rows="3" cols="60"></textarea></label></p>'
        f'<p><button type="submit">{verb}</button></p></form>'
    )


@router.get(
    "/approvals/{request_id}/confirm",
    response_class=HTMLResponse,
    responses=_documented(403, 404, 409, 410),
)
async def confirm_page(
    request: Request,
    request_id: RequestId,
    token: Annotated[
        str, Query(max_length=MAX_TOKEN_LENGTH, description="The signed token of the e-mail link.")
    ] = "",
):
    """The confirm page of an e-mail approval link: shows the request and a form; decides nothing."""
    try:
        link = await anyio.to_thread.run_sync(approval_links.check_link, request_id, token)
    except LinkRefused as exc:
        return _refused(exc)
    request.state.principal_name = link.approver  # for the request statistics
    if reason := approval_links.already_decided(link):
        return _page(409, "Already decided", _text(reason))
    verb = "Approve" if link.decision == "approve" else "Reject"
    return _page(200, f"{verb} this request?", _confirm_form(link, token))


@router.post(
    "/approvals/{request_id}/confirm",
    response_class=HTMLResponse,
    # 400/413/415: the request guards' problem documents (a body too large, not a form).
    responses={**problem_responses(400, 413, 415), **_documented(403, 404, 409, 410)},
)
async def confirm_decision(
    request: Request,
    request_id: RequestId,
    token: Annotated[str, Form(max_length=MAX_TOKEN_LENGTH)],
    comment: Annotated[str, Form(max_length=4000)] = "",
):
    """Record the decision of an e-mail approval link (the form of the confirm page), once."""
    form = await request.form()
    given = {
        key.removeprefix(FORM_INPUT_PREFIX): value
        for key, value in form.multi_items()
        if key.startswith(FORM_INPUT_PREFIX) and isinstance(value, str) and value != ""
    }

    def decide() -> tuple[CheckedLink, approvals.ApprovalInfo]:
        link = approval_links.check_link(request_id, token)
        inputs = dict(
            approvals.parse_form_text(link.request, f"{name}={value}") for name, value in given.items()
        )
        return link, approval_links.decide_by_link(request_id, token, comment=comment, inputs=inputs)

    try:
        link, decided = await anyio.to_thread.run_sync(decide)
    except LinkRefused as exc:
        return _refused(exc)
    except approvals.ApprovalNotFound as exc:
        return _page(404, "No such approval request", _text(str(exc)))
    except approvals.ApprovalConflict as exc:
        return _page(409, "Already decided", _text(str(exc)))
    except approvals.ApprovalForbidden as exc:
        return _page(403, "You may not decide this request", _text(str(exc)))
    except approvals.ApprovalInvalid as exc:
        return _page(422, "Check the form", _text(f"{exc}. Go back and correct it; nothing was recorded."))
    request.state.principal_name = link.approver
    done = "approved" if link.decision == "approve" else "rejected"
    outcome = (
        f"The request is now {decided.status}; the workflow continues shortly."
        if decided.status != approvals.PENDING
        else f"The request waits for more approvals ({decided.required_approvals} needed)."
    )
    return _page(200, "Decision recorded", _text(f"{link.approver} {done} request {request_id}. {outcome}"))
