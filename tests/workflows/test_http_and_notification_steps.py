"""HTTP Request and Notification steps against real counterparts: a local HTTP API (retries with
Retry-After, auth, extraction, statuses) and a local webhook receiver behind a declared channel."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestration.settings import reset_settings_cache
from resources.notifications import verify_signature

TOKEN_ENV = "JUNCTION_TEST_ORDERS_TOKEN"
TOKEN = "tok-very-secret-123"


def lookup_workflow(url: str, **config: Any) -> dict[str, Any]:
    step_config = {
        "url": url + "/orders/{{ inputs.order_id }}",
        "extract": {"amount": "$.total", "skus": "$.lines[*].sku", "missing": "$.nothing"},
        "retry": {"max_attempts": 3, "initial_backoff_s": 0.05, "max_backoff_s": 5},
    } | config
    return {
        "name": "lookup",
        "inputs": {"order_id": {"type": "string", "default": "A-1"}},
        "steps": [{"id": "lookup_order", "type": "http_request", "config": step_config}],
    }


ORDER = {"total": 2500, "lines": [{"sku": "a"}, {"sku": "b"}], "customer": {"name": "Acme"}}


def failure_text(run) -> str:
    failure = run.result.get_step_failure_events()[0]
    return str(failure.event_specific_data.user_failure_data.description)


def test_get_with_bearer_auth_and_extraction(api_server, run_spec, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    api_server.answer("/orders/A-9", 200, ORDER | {"echo": f"token {TOKEN}"})
    run = run_spec(
        lookup_workflow(
            api_server.url,
            auth={"type": "bearer", "token_env": TOKEN_ENV},
            params={"v": "{{ inputs.order_id }}"},
        ),
        order_id="A-9",
    )
    assert run.result.success
    output = run.output("lookup_order")["output"]
    assert output["status"] == 200
    assert output["extracted"] == {"amount": 2500, "skus": ["a", "b"], "missing": None}
    (request,) = api_server.requests
    assert request.method == "GET" and request.path == "/orders/A-9?v=A-9"
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    # The token the server echoed is masked in the recorded output; the flowing value is untouched.
    assert run.metadata("lookup_order")["output"]["body"]["echo"] == "token ***"
    assert output["body"]["echo"] == f"token {TOKEN}"


def test_503_then_200_waits_what_retry_after_asks(api_server, run_spec):
    api_server.answer("/orders/A-1", 503, {"busy": True}, {"Retry-After": "1"})
    api_server.answer("/orders/A-1", 200, ORDER)
    started = time.monotonic()
    run = run_spec(lookup_workflow(api_server.url))
    elapsed = time.monotonic() - started
    assert run.result.success
    assert len(api_server.requests) == 2
    assert elapsed >= 1.0  # the server's Retry-After, not the 0.05 s backoff
    assert run.output("lookup_order")["output"]["extracted"]["amount"] == 2500


def test_429_is_retried_until_the_attempts_are_used_up(api_server, run_spec):
    api_server.answer("/orders/A-1", 429, {"slow": "down"})
    run = run_spec(lookup_workflow(api_server.url))
    assert not run.result.success
    assert len(api_server.requests) == 3
    assert "answered 429 after 3 attempts" in failure_text(run)


def test_an_unexpected_status_fails_at_once(api_server, run_spec):
    api_server.answer("/orders/A-1", 404, {"error": "no such order"})
    run = run_spec(lookup_workflow(api_server.url, expected_status=[200]))
    assert not run.result.success
    assert len(api_server.requests) == 1
    assert "answered 404 (expected [200])" in failure_text(run)


def test_post_with_templated_json_body_and_basic_auth(api_server, run_spec, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    api_server.answer("/orders/A-1", 201, {"id": 77})
    run = run_spec(
        lookup_workflow(
            api_server.url,
            method="POST",
            json={"order": "{{ inputs.order_id }}", "items": [1, 2]},
            auth={"type": "basic", "username": "junction", "password_env": TOKEN_ENV},
            expected_status=[201],
            extract={"id": "$.id"},
        )
    )
    assert run.result.success
    (request,) = api_server.requests
    assert json.loads(request.body) == {"order": "A-1", "items": [1, 2]}
    assert request.headers["Authorization"].startswith("Basic ")
    assert run.output("lookup_order")["output"]["extracted"] == {"id": 77}


def test_a_missing_secret_is_named(api_server, run_spec, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    run = run_spec(lookup_workflow(api_server.url, auth={"type": "bearer", "token_env": TOKEN_ENV}))
    assert f"environment variable {TOKEN_ENV} (a secret of this step) is not set" in failure_text(run)
    assert api_server.requests == []


def test_the_step_timeout_bounds_retry_waits(api_server, run_spec):
    api_server.answer("/orders/A-1", 503, {}, {"Retry-After": "30"})
    spec = lookup_workflow(
        api_server.url, retry={"max_attempts": 5, "initial_backoff_s": 0.05, "max_backoff_s": 60}
    )
    spec["steps"][0]["timeout_s"] = 2
    started = time.monotonic()
    run = run_spec(spec)
    assert time.monotonic() - started < 5
    assert not run.result.success
    assert "no time left to wait 30.0 s" in failure_text(run)


# --- Notification through a webhook channel ------------------------------------------------------------

SECRET_ENV = "JUNCTION_TEST_WORKFLOW_WEBHOOK_SECRET"
SECRET = "webhook-secret-for-workflows"


@pytest.fixture
def webhook(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store_url: str
) -> Iterator[list[dict[str, Any]]]:
    """A local webhook receiver declared as channel `finance`; yields the verified payloads received."""
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's hook name
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            verify_signature(SECRET, self.headers, body)
            received.append(json.loads(body))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format, *args) -> None:  # noqa: A002 - keep test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    channels = tmp_path / "channels.yaml"
    channels.write_text(
        yaml.safe_dump(
            {
                "channels": {
                    "finance": {
                        "kind": "webhook",
                        "url": f"http://127.0.0.1:{server.server_address[1]}/hook",
                        "secret_env": SECRET_ENV,
                        "retry": {"max_attempts": 1},
                    }
                }
            }
        )
    )
    monkeypatch.setenv(SECRET_ENV, SECRET)
    monkeypatch.setenv("JUNCTION_CHANNELS_FILE", str(channels))
    reset_settings_cache()
    try:
        yield received
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def notify_workflow(channel: str = "finance") -> dict[str, Any]:
    return {
        "name": "notify",
        "inputs": {
            "order_id": {"type": "string", "default": "A-1"},
            "note": {"type": "string", "default": ""},
        },
        "steps": [
            {
                "id": "tell_finance",
                "type": "notification",
                "config": {
                    "channel": channel,
                    "subject": "Order {{ inputs.order_id }}",
                    "body": "Note: {{ inputs.note }} (execution {{ execution.id }})",
                },
            }
        ],
    }


def test_notification_reaches_the_channel_rendered_once(webhook, run_spec):
    # Data that looks like a template stays data: the message is rendered exactly once.
    run = run_spec(notify_workflow(), order_id="A-5", note="{{ inputs.order_id }}")
    assert run.result.success
    (payload,) = webhook
    assert payload["subject"] == "Order A-5"
    assert payload["body"] == f"Note: {{{{ inputs.order_id }}}} (execution {run.result.run_id})"
    output = run.output("tell_finance")["output"]
    assert output["status"] == "delivered" and output["channel"] == "finance" and output["attempts"] == 1


def test_notification_to_an_unknown_channel_fails_naming_it(webhook, run_spec):
    run = run_spec(notify_workflow("nobody"))
    assert not run.result.success
    assert "unknown notification channel 'nobody' (declared: finance)" in failure_text(run)
    assert webhook == []


def test_a_cached_get_is_asked_once_per_url_and_credential(api_server, run_spec, junction_home, monkeypatch):
    """`cache: {namespace, ttl}`: the second run takes the answer from the shipped `http` namespace
    (memory here; Redis too when configured), another URL or token asks the server again."""
    from resources.cache import close_caches

    close_caches()
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    api_server.answer("/orders/A-1", 200, ORDER)
    api_server.answer("/orders/A-2", 200, ORDER | {"total": 1})
    cached = {"cache": {"namespace": "http", "ttl": "1m"}, "auth": {"type": "bearer", "token_env": TOKEN_ENV}}
    first = run_spec(lookup_workflow(api_server.url, **cached))
    second = run_spec(lookup_workflow(api_server.url, **cached))
    assert first.result.success and second.result.success
    assert first.output("lookup_order")["output"]["cached"] is False
    assert second.output("lookup_order")["output"]["cached"] is True
    assert second.output("lookup_order")["output"]["extracted"]["amount"] == 2500
    assert len(api_server.requests) == 1
    other_order = run_spec(lookup_workflow(api_server.url, **cached), order_id="A-2")
    assert other_order.output("lookup_order")["output"]["extracted"]["amount"] == 1
    monkeypatch.setenv(TOKEN_ENV, "another-token")
    run_spec(lookup_workflow(api_server.url, **cached))
    assert len(api_server.requests) == 3, "another credential does not read the first one's answer"
    close_caches()


def test_only_reads_can_be_cached():
    from orchestration.kernel.spec_errors import SpecError
    from orchestration.workflows.spec import parse_workflow

    spec = lookup_workflow("http://127.0.0.1:9", method="POST", cache={"namespace": "http"})
    with pytest.raises(SpecError, match="only GET and HEAD answers are cached, not POST"):
        parse_workflow(spec, "test.yaml")
