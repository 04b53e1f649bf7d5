"""HTTP Request: a templated call whose JSON answer is picked apart with JSON paths into the context.

Retries: a 429 or 5xx answer and transport errors (connect/read failures, timeouts) are retried with
exponential backoff (tenacity), waiting what the server's `Retry-After` asks instead when it sends
one, and never past the step's timeout. Any other status outside `expected_status` fails the step at
once. This is the request-level retry; the step's `retry` policy (Dagster's) retries the whole step.

Extraction: `extract: {amount: $.order.total}` evaluates each JSONPath (jsonpath-ng, the extended
dialect with filters) on the JSON body: no match gives null, one match its value, several a list.
Secrets (bearer token, basic password) are read from environment variables named in the spec and
masked in the recorded output.
"""

from __future__ import annotations

import os
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from orchestration.errors import JunctionError
from orchestration.kernel.spec_errors import SpecProblem
from orchestration.workflows.context import StepContext
from orchestration.workflows.steps.base import StepConfig, StepType
from resources.cache.http_answers import AnswerCacheSpec

ENV_VAR_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})


class BearerAuth(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["bearer"]
    token_env: str = Field(pattern=ENV_VAR_NAME, description="NAME of the env var holding the token.")


class BasicAuth(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["basic"]
    username: str
    password_env: str = Field(pattern=ENV_VAR_NAME, description="NAME of the env var holding the password.")


class RequestRetry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    max_attempts: int = Field(default=3, ge=1, le=20, description="Attempts in all (1: no retry).")
    initial_backoff_s: float = Field(default=1.0, ge=0)
    max_backoff_s: float = Field(default=30.0, ge=0, description="Also caps a server's Retry-After.")


class HttpRequestConfig(StepConfig):
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"] = "GET"
    url: str = Field(description="Template; must render to an http:// or https:// URL.")
    headers: dict[str, str] = Field(default_factory=dict, description="Templates (not secrets).")
    params: dict[str, str] = Field(default_factory=dict, description="Query parameters (templates).")
    json_body: Any = Field(default=None, alias="json", description="A JSON body; every string is a template.")
    auth: Annotated[BearerAuth | BasicAuth, Field(discriminator="type")] | None = None
    timeout_s: float = Field(default=30.0, gt=0, description="Per attempt.")
    expected_status: list[int] = Field(
        default_factory=list, description="Statuses that succeed; empty: any 2xx."
    )
    extract: dict[str, str] = Field(default_factory=dict, description="Name -> JSONPath into the JSON body.")
    retry: RequestRetry = RequestRetry()
    cache: AnswerCacheSpec | None = Field(default=None, description="Reuse successful GET/HEAD answers")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    not_templates = frozenset({"method", "auth", "timeout_s", "expected_status", "extract", "retry", "cache"})

    @model_validator(mode="after")
    def _cache_reads_only(self) -> HttpRequestConfig:
        if self.cache is not None and self.method not in ("GET", "HEAD"):
            raise ValueError(f"cache: only GET and HEAD answers are cached, not {self.method}")
        return self

    @field_validator("expected_status")
    @classmethod
    def _statuses(cls, value: list[int]) -> list[int]:
        for status in value:
            if not 100 <= status <= 599:
                raise ValueError(f"{status} is not an HTTP status")
        return value

    def load_problems(self) -> list[SpecProblem]:
        from jsonpath_ng.ext import parse

        problems = []
        for name, path in self.extract.items():
            try:
                parse(path)
            # jsonpath-ng raises its lexer/parser errors, but also plain exceptions for some inputs.
            except Exception as exc:  # noqa: BLE001
                problems.append(SpecProblem(f"extract.{name}", f"invalid JSONPath {path!r}: {exc}"))
        return problems

    def secret_env_names(self) -> list[str]:
        if isinstance(self.auth, BearerAuth):
            return [self.auth.token_env]
        if isinstance(self.auth, BasicAuth):
            return [self.auth.password_env]
        return []


class RetryableResponse(Exception):
    """A 429/5xx answer: retried, after the server's Retry-After when it gave one."""

    def __init__(self, status: int, retry_after_s: float | None):
        super().__init__(f"HTTP {status}")
        self.status = status
        self.retry_after_s = retry_after_s


def _secret(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise JunctionError(f"environment variable {name} (a secret of this step) is not set")
    return value


def _auth(config: HttpRequestConfig) -> tuple[dict[str, str], Any]:
    if isinstance(config.auth, BearerAuth):
        return {"Authorization": f"Bearer {_secret(config.auth.token_env)}"}, None
    if isinstance(config.auth, BasicAuth):
        return {}, (config.auth.username, _secret(config.auth.password_env))
    return {}, None


def _extract(body: Any, paths: dict[str, str]) -> dict[str, Any]:
    from jsonpath_ng.ext import parse

    extracted = {}
    for name, path in paths.items():
        matches = [match.value for match in parse(path).find(body)]
        extracted[name] = None if not matches else matches[0] if len(matches) == 1 else matches
    return extracted


def call(config: HttpRequestConfig, context: StepContext) -> dict[str, Any]:
    """The request (or, with `cache`, its cached answer: `cached: true`)."""
    if config.cache is None:
        return _request(config, context)
    import hashlib

    import orjson

    from resources.cache import open_cache

    auth_headers, basic = _auth(config)
    identity = {
        "method": config.method,
        "url": context.render(config.url),
        "params": context.render(config.params),
        "headers": context.render(config.headers),
        # Whose answer it is: another credential must not read it. Hashed with the rest, never stored.
        "auth": [auth_headers, list(basic) if basic is not None else None],
    }
    key = "http:" + hashlib.sha256(orjson.dumps(identity, option=orjson.OPT_SORT_KEYS)).hexdigest()
    ttl = config.cache.ttl_s
    try:
        cache = open_cache(config.cache.namespace)
    except KeyError as exc:
        raise JunctionError(f"cache.namespace: {exc.args[0]}") from None
    fetched: list[bool] = []

    def load() -> dict[str, Any]:
        fetched.append(True)
        return _request(config, context)

    answer = cache.get_or_set(key, load, ttl=ttl)
    return {**answer, "cached": not fetched}


def _request(config: HttpRequestConfig, context: StepContext) -> dict[str, Any]:
    import httpx
    import tenacity

    # One private helper of the notifications module, reused rather than copied: the same parsing of
    # `Retry-After` (seconds or an HTTP date) for every outgoing HTTP call of the platform.
    from resources.notifications import retry_after_seconds

    url = context.render(config.url)
    if not url.startswith(("http://", "https://")):
        raise JunctionError(f"url must render to an http:// or https:// URL, got {url!r}")
    headers = context.render(config.headers)
    params = context.render(config.params)
    body = context.render(config.json_body)
    auth_headers, basic = _auth(config)
    headers = {**headers, **auth_headers}
    policy = config.retry

    def wait(retry_state: tenacity.RetryCallState) -> float:
        failure = retry_state.outcome.exception() if retry_state.outcome else None
        asked = getattr(failure, "retry_after_s", None)
        backoff = policy.initial_backoff_s * 2 ** (retry_state.attempt_number - 1)
        chosen = min(asked if asked is not None else backoff, policy.max_backoff_s)
        remaining = context.remaining_s()
        if remaining is not None and chosen >= remaining:
            raise JunctionError(
                f"step timeout: no time left to wait {chosen:.1f} s before retrying ({failure})"
            )
        return chosen

    def log_retry(retry_state: tenacity.RetryCallState) -> None:
        if context.log is not None:
            failure = retry_state.outcome.exception() if retry_state.outcome else None
            context.log.warning(
                f"{config.method} {url}: {failure}; retrying in {retry_state.upcoming_sleep:.2f} s "
                f"(attempt {retry_state.attempt_number} of {policy.max_attempts})"
            )

    with httpx.Client(timeout=config.timeout_s, auth=basic) as client:

        def attempt() -> httpx.Response:
            timeout = config.timeout_s
            remaining = context.remaining_s()
            if remaining is not None:
                timeout = min(timeout, max(remaining, 0.001))
            response = client.request(
                config.method,
                url,
                headers=headers,
                params=params,
                json=body if config.json_body is not None else None,
                timeout=timeout,
            )
            if response.status_code in RETRIED_STATUSES:
                raise RetryableResponse(
                    response.status_code, retry_after_seconds(response.headers.get("Retry-After"))
                )
            return response

        started = time.monotonic()
        try:
            response = tenacity.Retrying(
                stop=tenacity.stop_after_attempt(policy.max_attempts),
                wait=wait,
                retry=tenacity.retry_if_exception_type((RetryableResponse, httpx.TransportError)),
                before_sleep=log_retry,
                reraise=True,
            )(attempt)
        except RetryableResponse as exc:
            raise JunctionError(
                f"{config.method} {url} answered {exc.status} after {policy.max_attempts} attempts"
            ) from None
        except httpx.HTTPError as exc:
            raise JunctionError(f"{config.method} {url} failed: {type(exc).__name__}: {exc}") from None
    expected = config.expected_status
    if (expected and response.status_code not in expected) or (not expected and not response.is_success):
        raise JunctionError(
            f"{config.method} {url} answered {response.status_code} "
            f"(expected {expected or '2xx'}): {response.text[:500]}"
        )
    try:
        data = response.json() if response.content else None
    except ValueError:
        data = response.text
    if config.extract and not isinstance(data, dict | list):
        raise JunctionError(f"{config.method} {url}: cannot extract JSON paths from a non-JSON answer")
    return {
        "status": response.status_code,
        "body": data,
        "extracted": _extract(data, config.extract),
        "elapsed_s": round(time.monotonic() - started, 3),
    }


STEP_TYPE = StepType(
    name="http_request",
    description="Call an HTTP API; retries 429/5xx honouring Retry-After; extracts JSON paths.",
    config_model=HttpRequestConfig,
    run=call,
)
