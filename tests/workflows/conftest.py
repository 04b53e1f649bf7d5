"""Fixtures for workflow tests: a scripted local HTTP API and a helper that runs a spec in process."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import dagster as dg
import pytest

# The in-process gateway on a real store, for deciding approvals through the API.
from gateway.conftest import make_key  # noqa: F401 - a fixture shared with tests/gateway

from orchestration.workflows.factory import build_job
from orchestration.workflows.spec import parse_workflow


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class ApiServer:
    """A real HTTP server on a free port. `script[path]` answers (status, headers, json) in order;
    the last answer repeats. Unknown paths get 404."""

    url: str = ""
    script: dict[str, list[tuple[int, dict[str, str], Any]]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)

    def answer(self, path: str, status: int = 200, body: Any = None, headers: dict[str, str] | None = None):
        self.script.setdefault(path, []).append((status, headers or {}, body))


@pytest.fixture
def api_server() -> Iterator[ApiServer]:
    api = ApiServer()

    class Handler(BaseHTTPRequestHandler):
        def handle_any(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
            path = self.path.split("?")[0]
            api.requests.append(Recorded(self.command, self.path, dict(self.headers.items()), body))
            answers = api.script.get(path)
            if not answers:
                status, headers, payload = 404, {}, {"error": "not found"}
            else:
                status, headers, payload = answers.pop(0) if len(answers) > 1 else answers[0]
            data = json.dumps(payload).encode()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = handle_any  # noqa: N815 - http.server's hook names

        def log_message(self, format, *args) -> None:  # noqa: A002 - keep test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    api.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@dataclass
class WorkflowRun:
    result: dg.ExecuteInProcessResult
    instance: dg.DagsterInstance

    def statuses(self) -> dict[str, str]:
        return {s.step_key: s.status.value for s in self.instance.get_run_step_stats(self.result.run_id)}

    def output(self, step_id: str, output_name: str = "result") -> Any:
        return self.result.output_for_node(step_id, output_name)[step_id]

    def metadata(self, step_id: str) -> dict[str, Any]:
        for event in self.result.all_node_events:
            if event.step_key == step_id and event.is_successful_output:
                return {key: value.value for key, value in event.step_output_data.metadata.items()}
        raise AssertionError(f"no output event for {step_id}")

    def tags(self) -> dict[str, str]:
        return self.instance.get_run_by_id(self.result.run_id).tags


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    """A persistent test instance (run storage survives between the runs of one test)."""
    with dg.instance_for_test() as test_instance:
        yield test_instance


@pytest.fixture
def run_spec() -> Iterator:
    """`run_spec(spec_dict, **inputs)`: build the job and run it in process on an ephemeral instance."""
    instance = dg.DagsterInstance.ephemeral()

    def run(spec: dict[str, Any], raise_on_error: bool = False, **inputs: Any) -> WorkflowRun:
        job = build_job(parse_workflow(spec, "test.yaml"))
        result = job.execute_in_process(run_config=inputs, instance=instance, raise_on_error=raise_on_error)
        return WorkflowRun(result, instance)

    yield run
    instance.dispose()
