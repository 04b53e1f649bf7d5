"""Alerts and silences: the alert state the `alert_evaluation` sensor keeps, the rules it evaluates,
and the silences that mute them (`alertmanager`'s `/api/v2/alerts` and `/api/v2/silences`, here).

Reading needs `alerts:read`; creating and expiring a silence `alerts:silence`, and both are audited.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field

from orchestration.gateway.api.common import record
from orchestration.gateway.problems import ProblemError, problem_responses
from orchestration.gateway.security import requires
from orchestration.kernel.principals import Principal
from orchestration.kernel.times import parse_duration

router = APIRouter(tags=["alerts"])


class AlertModel(BaseModel):
    fingerprint: str
    rule: str
    status: str = Field(description="pending (condition holds, `for` not yet over), firing or resolved.")
    severity: str
    labels: dict[str, str]
    value: float | None
    summary: str
    active_since: datetime
    fired_at: datetime | None
    resolved_at: datetime | None
    muted_by: str | None = Field(
        description="The silence id, or `inhibited`, keeping it from being notified."
    )
    group_key: str


class AlertsPage(BaseModel):
    alerts: list[AlertModel]


class RuleModel(BaseModel):
    name: str
    signal: dict[str, Any]
    condition: dict[str, Any] | None
    for_: str = Field(alias="for")
    severity: str
    labels: dict[str, str]
    channels: list[str]
    group_by: list[str]
    group_wait: str
    group_interval: str
    repeat_interval: str


class RulesPage(BaseModel):
    rules: list[RuleModel]
    file: str


class MatcherModel(BaseModel):
    label: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    op: str = Field(pattern=r"^(=|!=|=~|!~)$")
    value: str


class SilenceRequest(BaseModel):
    matchers: list[MatcherModel] = Field(min_length=1)
    duration: str | None = Field(
        default=None, description="How long it lasts from now or `starts_at` (2h, 1d)."
    )
    starts_at: datetime | None = None
    ends_at: datetime | None = None
    comment: str = Field(min_length=1)


class SilenceModel(BaseModel):
    id: str
    matchers: list[MatcherModel]
    starts_at: datetime
    ends_at: datetime
    comment: str
    created_by: str
    created_at: datetime
    state: str = Field(description="pending, active or expired.")


class SilencesPage(BaseModel):
    silences: list[SilenceModel]


def _engine(request: Request):
    from orchestration.store import get_engine

    return get_engine(request.app.state.settings.store_url)


@router.get("/alerts", response_model=AlertsPage, responses=problem_responses(401, 403))
async def list_alerts(
    request: Request,
    _: Annotated[Principal, Depends(requires("alerts:read", read_only=True))],
    status: Annotated[str | None, Query(pattern="^(pending|firing|resolved)$")] = None,
):
    """Every alert the rules hold now (resolved ones for 24 h), firing first."""
    from sensors.alerts.evaluation import current_alerts

    alerts = await anyio.to_thread.run_sync(lambda: current_alerts(_engine(request)))
    return AlertsPage(alerts=[alert for alert in alerts if status is None or alert["status"] == status])


@router.get("/alerts/rules", response_model=RulesPage, responses=problem_responses(401, 403, 503))
async def list_rules(
    request: Request, _: Annotated[Principal, Depends(requires("alerts:read", read_only=True))]
):
    """The rules of the alerts file, their timings resolved from its defaults."""
    from orchestration.kernel.spec_errors import SpecError
    from sensors.alerts.rules import load_alert_rules

    settings = request.app.state.settings
    try:
        rules = await anyio.to_thread.run_sync(
            lambda: load_alert_rules(settings.alerts_file, _channel_names(settings.channels_file))
        )
    except SpecError as exc:
        raise ProblemError(503, f"the alerts file does not load: {exc}", slug="alerts-file") from None
    return RulesPage(
        file=str(settings.alerts_file),
        rules=[
            RuleModel.model_validate(
                {
                    "name": rule.name,
                    "signal": rule.spec.signal,
                    "condition": rule.spec.condition,
                    "for": rule.spec.for_,
                    "severity": rule.spec.severity,
                    "labels": rule.spec.labels,
                    "channels": rule.spec.channels,
                    **rule.timing.model_dump(),
                }
            )
            for rule in rules.rules.values()
        ],
    )


def _channel_names(channels_file) -> set[str]:
    from resources.notifications import load_channels

    return set(load_channels(channels_file))


@router.get("/silences", response_model=SilencesPage, responses=problem_responses(401, 403))
async def list_silences(
    request: Request,
    _: Annotated[Principal, Depends(requires("alerts:read", read_only=True))],
    include_expired: bool = False,
):
    """Active and pending silences (and expired ones with `include_expired`)."""
    from sensors.alerts.silences import list_silences as listed

    silences = await anyio.to_thread.run_sync(
        lambda: listed(_engine(request), include_expired=include_expired)
    )
    return SilencesPage(silences=[silence.as_json() for silence in silences])


@router.post(
    "/silences",
    status_code=201,
    response_model=SilenceModel,
    responses=problem_responses(400, 401, 403, 413, 415, 422),
)
async def create_silence(
    body: SilenceRequest,
    request: Request,
    response: Response,
    principal: Annotated[Principal, Depends(requires("alerts:silence"))],
):
    """Mute the firing alerts whose labels match every matcher, from now (or `starts_at`) for
    `duration` (or until `ends_at`). Audited."""
    from sensors.alerts.silences import Matcher, SilenceError
    from sensors.alerts.silences import create_silence as create

    duration: timedelta | None = None
    if body.duration is not None:
        duration = parse_duration(body.duration)
        if duration is None:
            raise ProblemError(
                422,
                f"body.duration: {body.duration!r} is not a duration (2h, 1d)",
                slug="validation",
                field="body.duration",
            )
    try:
        matchers = [Matcher(item.label, item.op, item.value) for item in body.matchers]  # type: ignore[arg-type]
        silence = await anyio.to_thread.run_sync(
            lambda: create(
                matchers,
                duration=duration,
                starts_at=body.starts_at,
                ends_at=body.ends_at,
                comment=body.comment,
                created_by=principal.name,
                engine=_engine(request),
            )
        )
    except SilenceError as exc:
        raise ProblemError(422, str(exc), slug="validation", field="body") from None
    await record("alerts.silence.create", principal, silence.id, silence.as_json())
    response.headers["Location"] = f"{request.url.path}/{silence.id}"
    return silence.as_json()


@router.get("/silences/{silence_id}", response_model=SilenceModel, responses=problem_responses(401, 403, 404))
async def get_silence(
    silence_id: str,
    request: Request,
    _: Annotated[Principal, Depends(requires("alerts:read", read_only=True))],
):
    from sensors.alerts.silences import get_silence as found

    silence = await anyio.to_thread.run_sync(lambda: found(silence_id, _engine(request)))
    if silence is None:
        raise ProblemError(404, f"no silence {silence_id!r}", slug="not-found")
    return silence.as_json()


@router.delete(
    "/silences/{silence_id}", response_model=SilenceModel, responses=problem_responses(401, 403, 404)
)
async def expire_silence(
    silence_id: str, request: Request, principal: Annotated[Principal, Depends(requires("alerts:silence"))]
):
    """End the silence now (kept, expired, for the record). Audited."""
    from sensors.alerts.silences import expire_silence as expire

    silence = await anyio.to_thread.run_sync(lambda: expire(silence_id, _engine(request)))
    if silence is None:
        raise ProblemError(404, f"no silence {silence_id!r}", slug="not-found")
    await record("alerts.silence.expire", principal, silence.id, {"ends_at": silence.ends_at.isoformat()})
    return silence.as_json()
