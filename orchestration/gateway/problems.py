"""RFC 9457 problem details: every gateway error is `application/problem+json`, never a traceback.

Handlers map each failure to its code: 400 malformed JSON, 422 invalid input (with the offending
field), 401/403 from security, 404/409 from the endpoints, 413/415 from the request guards, 503 when
Dagster or the platform store is unreachable, and a bare 500 (logged with an id, no internals) for
anything unexpected.
"""

from __future__ import annotations

import logging
import uuid
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from orchestration.gateway.dagster_client import DagsterUnavailable

logger = logging.getLogger("junction.gateway")

PROBLEM_MEDIA_TYPE = "application/problem+json"


class FieldProblem(BaseModel):
    field: str = Field(description="Where in the request: body.run_config, query.limit, path.name ...")
    message: str
    type: str


class Problem(BaseModel):
    """An RFC 9457 problem document."""

    type: str = Field(
        description="A URI naming the kind of problem.", examples=["urn:junction:problem:not-found"]
    )
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    field: str | None = Field(default=None, description="The first offending field of a validation error.")
    errors: list[FieldProblem] | None = None


def problem_type(slug: str) -> str:
    return f"urn:junction:problem:{slug}"


def status_slug(status: int) -> str:
    return HTTPStatus(status).phrase.lower().replace(" ", "-").replace("'", "")


class ProblemError(Exception):
    """Raise from an endpoint to answer with a problem document."""

    def __init__(
        self,
        status: int,
        detail: str | None = None,
        *,
        title: str | None = None,
        slug: str | None = None,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(detail or title or HTTPStatus(status).phrase)
        self.status = status
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.slug = slug or status_slug(status)
        self.field = field
        self.headers = headers


def problem_response(
    request: Request | None,
    status: int,
    *,
    title: str | None = None,
    detail: str | None = None,
    slug: str | None = None,
    field: str | None = None,
    errors: list[FieldProblem] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    problem = Problem(
        type=problem_type(slug or status_slug(status)),
        title=title or HTTPStatus(status).phrase,
        status=status,
        detail=detail,
        instance=str(request.url.path) if request is not None else None,
        field=field,
        errors=errors,
    )
    return JSONResponse(
        problem.model_dump(exclude_none=True),
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


def _field_name(location: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in location)


async def _validation_problem(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(error.get("type") == "json_invalid" for error in errors):
        message = next(error for error in errors if error.get("type") == "json_invalid").get("msg", "")
        return problem_response(request, 400, title="Malformed JSON", slug="malformed-json", detail=message)
    fields = [
        FieldProblem(
            field=_field_name(error.get("loc", ())), message=error.get("msg", ""), type=error.get("type", "")
        )
        for error in errors
    ]
    return problem_response(
        request,
        422,
        title="Invalid request",
        slug="validation",
        detail="; ".join(f"{f.field}: {f.message}" for f in fields),
        field=fields[0].field if fields else None,
        errors=fields,
    )


async def _http_problem(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = (
        exc.detail
        if isinstance(exc.detail, str) and exc.detail != HTTPStatus(exc.status_code).phrase
        else None
    )
    return problem_response(request, exc.status_code, detail=detail, headers=getattr(exc, "headers", None))


async def _problem_error(request: Request, exc: ProblemError) -> JSONResponse:
    return problem_response(
        request,
        exc.status,
        title=exc.title,
        detail=exc.detail,
        slug=exc.slug,
        field=exc.field,
        headers=exc.headers,
    )


async def _dagster_unavailable(request: Request, exc: DagsterUnavailable) -> JSONResponse:
    return problem_response(
        request, 503, title="Dagster unavailable", slug="dagster-unavailable", detail=str(exc)
    )


async def _store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
    return problem_response(
        request, 503, title="Platform store unavailable", slug="store-unavailable", detail=reason
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    error_id = uuid.uuid4().hex[:12]
    logger.exception("unexpected error %s on %s %s", error_id, request.method, request.url.path)
    return problem_response(
        request, 500, title="Internal error", slug="internal", detail=f"logged as error {error_id}"
    )


def install_problem_handlers(app: FastAPI) -> None:
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    app.add_exception_handler(RequestValidationError, _validation_problem)
    app.add_exception_handler(StarletteHTTPException, _http_problem)
    app.add_exception_handler(ProblemError, _problem_error)
    app.add_exception_handler(DagsterUnavailable, _dagster_unavailable)
    app.add_exception_handler(OperationalError, _store_unavailable)
    app.add_exception_handler(PoolTimeout, _store_unavailable)
    app.add_exception_handler(Exception, _unexpected)


# Documented on every operation so clients (and schemathesis) know the shape of errors.
def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {
        status: {
            "model": Problem,
            "description": HTTPStatus(status).phrase,
            "content": {PROBLEM_MEDIA_TYPE: {}},
        }
        for status in statuses
    }
