"""The OpenAPI document is valid, and the live API keeps to it under fuzzing (schemathesis)."""

from __future__ import annotations

import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import validate
from schemathesis.specs.openapi.checks import positive_data_acceptance

pytestmark = pytest.mark.slow

# Not `admin`: the fuzzing key cannot create admin keys, and a key cannot revoke itself.
FUZZ_SCOPES = [
    "runs:read",
    "runs:launch",
    "runs:cancel",
    "audit:read",
    "keys:read",
    "keys:manage",
    "analytics:read",
    "metrics:read",
    "events:read",
    # Publishing only to the shipped `orders` stream: a random stream name must get 403/404.
    "events:publish:orders",
    "events:replay:orders",
    "events:manage:fuzz-declared",
    "subscriptions:read",
    # Declaring only `fuzz-subscription`: a random subscription name must get 403.
    "subscriptions:manage:fuzz-subscription",
    "approvals:read",
    "approvals:decide",
    "pipelines:read",
    "caches:read",
    "caches:manage",
    "workflows:read",
    "workflows:launch",
    "gateway:manage",
    "alerts:read",
    "alerts:silence",
]
MAX_EXAMPLES = 15
# Operations whose inputs are checked beyond what a schema can say (Dagster validates run config
# against the job; a key's expiry must be in the future): a schema-valid request may get 422 there.
# A stream's payload schema lives in the streams registry, not in the OpenAPI document; a read's
# `from` must also be a real date (no 2024-13-45) or an id within the stores' range.
SEMANTICALLY_VALIDATED = {
    ("POST", "/v1/jobs/{name}/runs"),
    ("POST", "/v1/keys"),
    # A stream token's scopes must parse as scopes and be covered by the caller's, as a key's.
    ("POST", "/v1/streams/tokens"),
    ("POST", "/v1/streams/{name}/events"),
    ("GET", "/v1/streams/{name}/events"),
    ("POST", "/v1/streams/{name}/replays"),
    ("PUT", "/v1/streams/{name}"),
    # A subscription names a declared stream, and its filter must be a condition.
    ("PUT", "/v1/subscriptions/{name}"),
    # An e-mail approval link's token must be one the platform signed.
    ("GET", "/v1/approvals/{request_id}/confirm"),
    ("POST", "/v1/approvals/{request_id}/confirm"),
    # A workflow's inputs are typed by its spec, not by the OpenAPI document.
    ("POST", "/v1/workflows/{name}/executions"),
    # An invalidation names at least one key or tag (either list may be empty on its own).
    ("POST", "/v1/caches/{namespace}/invalidations"),
    # A route names an upstream declared in the routes file or through the API.
    ("PUT", "/v1/routes/{name}"),
    ("PUT", "/v1/upstreams/{name}"),
    # A silence's regex matchers must compile (RE2) and its duration parse.
    ("POST", "/v1/silences"),
}

# Server-Sent Events: the answer never ends, so it is checked by its head (status, media type).
EVENT_STREAMS = {("GET", "/v1/streams/{name}/sse")}


@pytest.fixture(scope="session")
def fuzz_key(live_platform, admin_key) -> str:
    response = httpx.post(
        f"{live_platform.base_url}/gateway/v1/keys",
        json={"name": "schemathesis", "scopes": FUZZ_SCOPES},
        headers={"Authorization": f"Bearer {admin_key}"},
    )
    assert response.status_code == 201, response.text
    return response.json()["key"]


@pytest.fixture(scope="session")
def openapi_document(live_platform) -> dict:
    response = httpx.get(f"{live_platform.base_url}/gateway/openapi.json")
    assert response.status_code == 200
    return response.json()


@pytest.fixture
def api_schema(live_platform, openapi_document):
    loaded = schemathesis.openapi.from_dict(openapi_document)
    loaded.config.update(base_url=f"{live_platform.base_url}/gateway")
    return loaded


def test_the_document_is_valid_openapi(openapi_document):
    validate(openapi_document)
    assert openapi_document["openapi"].startswith("3.")
    schemes = openapi_document["components"]["securitySchemes"]
    assert {scheme["type"] for scheme in schemes.values()} == {"http", "apiKey"}


def test_fuzz(api_schema, fuzz_key):
    """No 5xx from the gateway, and every response matches its documented status, type and schema.

    The operations are driven by hand (Hypothesis over each operation's strategy) rather than by
    `schemathesis.pytest.from_fixture`, whose lazy loader relies on pytest internals removed in pytest 9.
    """
    headers = {"Authorization": f"Bearer {fuzz_key}"}
    # An event stream answers forever: its bad inputs are tested in test_live_subscriptions.py.
    operations = [
        operation
        for operation in (result.ok() for result in api_schema.get_all_operations())
        if (operation.method.upper(), operation.path) not in EVENT_STREAMS
    ]
    assert len(operations) >= 10
    for operation in operations:
        try:
            fuzz_operation(operation, headers)
        except Exception as exc:
            raise AssertionError(f"{operation.method.upper()} {operation.path}: {exc}") from exc


def fuzz_operation(operation, headers: dict[str, str]) -> None:
    semantic = (operation.method.upper(), operation.path) in SEMANTICALLY_VALIDATED
    excluded = [positive_data_acceptance] if semantic else []

    @given(case=operation.as_strategy())
    @settings(
        max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    def exercise(case):
        case.call_and_validate(headers=headers, excluded_checks=excluded)

    exercise()


def test_every_operation_answers_2xx_to_a_valid_request(
    live_platform, admin_key, fuzz_key, api_schema, openapi_document
):
    """A suite that only ever sees 401s proves nothing: one valid call per operation, validated."""
    headers = {"Authorization": f"Bearer {fuzz_key}"}
    with httpx.Client(base_url=f"{live_platform.base_url}/gateway", headers=headers, timeout=30) as client:
        run_id = client.post("/v1/jobs/audit_log_verification/runs", json={}).json()["run_id"]
        # A report needs a pipeline run that staged: the shipped flights pipeline (~336k rows).
        pipeline_run_id = client.post("/v1/jobs/flights_pipeline/runs", json={}).json()["run_id"]
        wait_for_run(client, pipeline_run_id)
        client.post("/v1/keys", json={"name": "to-revoke", "scopes": ["runs:read"]})
        silence_id = client.post(
            "/v1/silences",
            json={
                "matchers": [{"label": "rule", "op": "=", "value": "fuzz"}],
                "duration": "1h",
                "comment": "fuzz",
            },
        ).json()["id"]
    to_approve, to_reject, by_link = (
        open_approval(live_platform, step) for step in ("approve_me", "reject_me", "approve_by_link")
    )
    link_token = approval_link_token(live_platform, by_link)

    valid = {
        ("GET", "/health"): {},
        ("GET", "/metrics"): {},
        ("GET", "/v1/jobs"): {},
        ("POST", "/v1/jobs/{name}/runs"): {"path_parameters": {"name": "audit_log_verification"}, "body": {}},
        ("POST", "/v1/assets/materializations"): {"body": {"assets": ["audit_activity"]}},
        ("GET", "/v1/runs/{run_id}"): {"path_parameters": {"run_id": run_id}},
        ("POST", "/v1/runs/{run_id}/cancel"): {"path_parameters": {"run_id": run_id}},
        ("GET", "/v1/audit"): {},
        ("GET", "/v1/keys"): {},
        ("GET", "/v1/caches"): {},
        ("GET", "/v1/caches/{namespace}"): {"path_parameters": {"namespace": "lookups"}},
        ("POST", "/v1/caches/{namespace}/invalidations"): {
            "path_parameters": {"namespace": "lookups"},
            "body": {"tags": ["made-by-fuzz-check"]},
        },
        ("POST", "/v1/keys"): {"body": {"name": "made-by-fuzz-check", "scopes": ["runs:read"]}},
        ("DELETE", "/v1/keys/{name}"): {"path_parameters": {"name": "to-revoke"}},
        ("GET", "/v1/analytics/requests"): {},
        ("GET", "/v1/analytics/requests/history"): {},
        ("GET", "/v1/analytics/proxy"): {},
        ("GET", "/v1/streams"): {},
        ("GET", "/v1/streams/{name}/stats"): {"path_parameters": {"name": "orders"}},
        ("GET", "/v1/streams/{name}"): {"path_parameters": {"name": "orders"}},
        ("PUT", "/v1/streams/{name}"): {
            "path_parameters": {"name": "fuzz-declared"},
            "body": {"payload_schema": {"type": "object"}, "retention": {"max_age": "1d"}},
        },
        ("POST", "/v1/streams/{name}/events"): {
            "path_parameters": {"name": "orders"},
            "body": [
                {"payload": {"order_id": "o-1", "customer_id": "c-1", "amount": 12.5, "currency": "EUR"}},
                {
                    "payload": {"order_id": "o-2", "customer_id": "c-1", "amount": 3, "currency": "EUR"},
                    "idempotency_key": "o-2",
                },
            ],
        },
        ("GET", "/v1/streams/{name}/events"): {
            "path_parameters": {"name": "orders"},
            "query": {"limit": 10},
        },
        ("GET", "/v1/streams/{name}/sse"): {
            "path_parameters": {"name": "orders"},
            "query": {"from": "earliest"},
        },
        ("POST", "/v1/streams/tokens"): {"body": {"scopes": ["events:read:orders"]}},
        # The shipped example trigger over a range before any event: a replay of nothing (201, no run).
        ("POST", "/v1/streams/{name}/replays"): {
            "path_parameters": {"name": "orders"},
            "body": {"trigger": "order_summaries_on_orders", "from": "0-1", "to": "0-2"},
        },
        ("GET", "/v1/approvals"): {},
        ("POST", "/v1/approvals/{request_id}/approve"): {
            "path_parameters": {"request_id": to_approve},
            "body": {"comment": "fine"},
        },
        ("POST", "/v1/approvals/{request_id}/reject"): {"path_parameters": {"request_id": to_reject}},
        ("GET", "/v1/pipelines"): {},
        ("GET", "/v1/pipelines/{name}/reports"): {"path_parameters": {"name": "flights"}},
        ("GET", "/v1/pipelines/{name}/reports/{run_id}"): {
            "path_parameters": {"name": "flights", "run_id": pipeline_run_id},
            "headers": {"Accept": "application/json"},
        },
        # The confirm page (GET decides nothing), then its form (POST decides, as the link's approver).
        ("GET", "/v1/approvals/{request_id}/confirm"): {
            "path_parameters": {"request_id": by_link},
            "query": {"token": link_token},
        },
        ("POST", "/v1/approvals/{request_id}/confirm"): {
            "path_parameters": {"request_id": by_link},
            "body": {"token": link_token, "comment": "by mail"},
            "media_type": "application/x-www-form-urlencoded",
        },
        ("PUT", "/v1/upstreams/{name}"): {
            "path_parameters": {"name": "fuzz-upstream"},
            "body": {"targets": [{"url": f"{live_platform.base_url}/gateway"}]},
        },
        ("GET", "/v1/upstreams"): {},
        ("GET", "/v1/upstreams/{name}"): {"path_parameters": {"name": "fuzz-upstream"}},
        ("PUT", "/v1/routes/{name}"): {
            "path_parameters": {"name": "fuzz-route"},
            "body": {"path": "/fuzz", "upstream": "fuzz-upstream"},
        },
        ("GET", "/v1/routes"): {},
        ("GET", "/v1/routes/{name}"): {"path_parameters": {"name": "fuzz-route"}},
        ("DELETE", "/v1/routes/{name}"): {"path_parameters": {"name": "fuzz-route"}},
        ("DELETE", "/v1/upstreams/{name}"): {"path_parameters": {"name": "fuzz-upstream"}},
        ("PUT", "/v1/subscriptions/{name}"): {
            "path_parameters": {"name": "fuzz-subscription"},
            "body": {"stream": "orders", "url": f"{live_platform.base_url}/gateway/none", "paused": True},
        },
        ("GET", "/v1/subscriptions"): {},
        ("GET", "/v1/subscriptions/{name}"): {"path_parameters": {"name": "fuzz-subscription"}},
        ("GET", "/v1/subscriptions/{name}/stats"): {"path_parameters": {"name": "fuzz-subscription"}},
        ("GET", "/v1/subscriptions/{name}/dead-letters"): {"path_parameters": {"name": "fuzz-subscription"}},
        ("DELETE", "/v1/subscriptions/{name}"): {"path_parameters": {"name": "fuzz-subscription"}},
        ("GET", "/v1/metrics/runs"): {"query": {"limit": 100}},
        ("GET", "/v1/alerts"): {"query": {"status": "firing"}},
        ("GET", "/v1/alerts/rules"): {},
        ("GET", "/v1/silences"): {},
        ("POST", "/v1/silences"): {
            "body": {
                "matchers": [{"label": "job", "op": "=~", "value": "night.*"}],
                "duration": "2h",
                "comment": "c",
            }
        },
        ("GET", "/v1/silences/{silence_id}"): {"path_parameters": {"silence_id": silence_id}},
        ("DELETE", "/v1/silences/{silence_id}"): {"path_parameters": {"silence_id": silence_id}},
        ("GET", "/v1/workflows"): {},
        ("GET", "/v1/workflows/{name}/stats"): {"path_parameters": {"name": "order_review"}},
        ("GET", "/v1/workflows/{name}/executions"): {
            "path_parameters": {"name": "order_review"},
            "query": {"status": "succeeded"},
        },
        ("POST", "/v1/workflows/{name}/executions"): {
            "path_parameters": {"name": "order_review"},
            # The gateway answers 404 at once: the execution fails fast, which is not this table's
            # concern (it is waited for below, so no run worker outlives the platform).
            "body": {"inputs": {"order_id": "A-1", "orders_api": f"{live_platform.base_url}/gateway/none"}},
        },
    }
    documented = {
        (method.upper(), path)
        for path, item in openapi_document["paths"].items()
        for method in item
        # Proxied routes (none are shipped) are their upstreams' operations: test_proxy_openapi.py.
        if method != "parameters" and not path.startswith("/proxy/")
    }
    assert documented == set(valid), f"add a valid request for: {documented ^ set(valid)}"

    for (method, path), arguments in valid.items():
        case = api_schema[path][method].Case(**arguments)
        if (method, path) == ("POST", "/v1/runs/{run_id}/cancel"):
            response = case.call(headers=headers)
            # Queued or running: cancelled (202); already finished: 409. Either is documented.
            assert response.status_code in (202, 409), response.text
            continue
        if (method, path) in EVENT_STREAMS:
            url = f"{live_platform.base_url}/gateway{path.format(**arguments['path_parameters'])}"
            with httpx.stream("GET", url, params=arguments["query"], headers=headers, timeout=30) as response:
                assert response.status_code == 200, response.read()
                assert response.headers["content-type"].startswith("text/event-stream")
                assert next(response.iter_lines()).startswith("id: ")  # the first event
            continue
        response = case.call_and_validate(headers=headers)
        assert 200 <= response.status_code < 300, f"{method} {path}: {response.status_code} {response.text}"
        if (method, path) == ("POST", "/v1/workflows/{name}/executions"):
            workflow_run_id = response.json()["run_id"]
    with httpx.Client(base_url=f"{live_platform.base_url}/gateway", headers=headers, timeout=30) as client:
        wait_for_run(client, workflow_run_id, expect=None)


def wait_for_run(
    client: httpx.Client, run_id: str, *, expect: str | None = "SUCCESS", timeout_s: float = 300
) -> None:
    """Until the run ends (no run worker may outlive the platform); `expect`: the status it must end in."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get(f"/v1/runs/{run_id}").json()["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            assert expect is None or status == expect, f"run {run_id} ended {status}"
            return
        time.sleep(1)
    raise AssertionError(f"run {run_id} did not finish in {timeout_s} s")


def approval_link_token(live_platform, request_id: str) -> str:
    """An approve link's token, signed with the live platform's key (its `secret.key`)."""
    from orchestration.kernel import signed_links
    from orchestration.settings import JunctionSettings
    from orchestration.workflows.approval_links import PURPOSE

    settings = JunctionSettings(home=live_platform.home)
    payload = {"request": request_id, "approver": "schemathesis", "decision": "approve"}
    return signed_links.sign(PURPOSE, payload, settings=settings)


def open_approval(live_platform, step_id: str) -> str:
    """A pending approval request in the live platform's store that the fuzzing key may decide."""
    from orchestration.store.db import get_engine
    from orchestration.workflows import approvals

    request = approvals.open_request(
        execution_id=f"openapi-{step_id}",
        workflow="openapi_check",
        step_id=step_id,
        message="Decided by the valid-request table",
        approver_principals=["schemathesis"],
        approver_groups=[],
        required_approvals=1,
        timeout_at=None,
        on_timeout="reject",
        form_inputs={},
        forbid_self_approval=False,
        requester="",
        auto_approved=False,
        engine=get_engine(f"sqlite:///{live_platform.home / 'platform.db'}"),
    )
    return request.id
