"""Gateway benchmark: launch → RUN_START latency through the platform API, against Dagster's GraphQL.

Starts `junction dev` on a fresh JUNCTION_HOME, then launches the `audit_log_verification` job N times
through `POST /gateway/v1/jobs/{name}/runs` and N times through Dagster's own `launchRun` GraphQL
mutation (the peer: what the UI does), one at a time, and measures for each the time from sending
the request until Dagster records the run's start (RUN_START), plus the launch request's own latency.

    .venv/bin/python benchmarks/gateway.py [--runs 10] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from support import pct, platform_env, running_platform  # noqa: E402

from orchestration.gateway.dagster_client import LAUNCH_RUN_MUTATION  # noqa: E402

JOB = "audit_log_verification"


def started_at(client: httpx.Client, run_id: str, timeout_s: float = 120) -> float:
    """Dagster's recorded start time of the run (RUN_START), polled through GraphQL."""
    query = "query($id: ID!) { runOrError(runId: $id) { ... on Run { startTime status } } }"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = client.post("/graphql", json={"query": query, "variables": {"id": run_id}}).json()["data"][
            "runOrError"
        ]
        if run.get("startTime"):
            return run["startTime"]
        time.sleep(0.05)
    raise TimeoutError(f"run {run_id} never started")


def wait_finished(client: httpx.Client, run_id: str) -> None:
    query = "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"
    while True:
        status = client.post("/graphql", json={"query": query, "variables": {"id": run_id}}).json()["data"][
            "runOrError"
        ]
        if status["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
            return
        time.sleep(0.1)


def measure(launch, dagster: httpx.Client, runs: int) -> tuple[list[float], list[float]]:
    to_start, request = [], []
    for index in range(runs):
        print(f"  launch {index + 1}/{runs}", file=sys.stderr)
        sent = time.time()
        run_id = launch()
        request.append(time.time() - sent)
        to_start.append(started_at(dagster, run_id) - sent)
        wait_finished(dagster, run_id)  # one at a time: measure the launch path, not the queue
    return to_start, request


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=10, help="launches per path (default 10)")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args()

    env = platform_env()
    with tempfile.TemporaryDirectory() as tmp:
        env["JUNCTION_HOME"] = str(Path(tmp) / "home")
        with running_platform(env, ROOT) as (base, _):
            key = (Path(tmp) / "home" / "admin.key").read_text().strip()
            with (
                httpx.Client(base_url=f"{base}/gateway", headers={"X-API-Key": key}, timeout=60) as api,
                httpx.Client(base_url=base, timeout=60) as dagster,
            ):

                def via_api() -> str:
                    response = api.post(f"/v1/jobs/{JOB}/runs", json={})
                    response.raise_for_status()
                    return response.json()["run_id"]

                def via_graphql() -> str:
                    params = {
                        "selector": {
                            "repositoryLocationName": "junction",
                            "repositoryName": "__repository__",
                            "jobName": JOB,
                        },
                        "runConfigData": {},
                    }
                    data = dagster.post(
                        "/graphql",
                        json={"query": LAUNCH_RUN_MUTATION, "variables": {"executionParams": params}},
                    )
                    return data.json()["data"]["launchRun"]["run"]["runId"]

                via_api()  # warm both paths (first launch loads the code location's job snapshot)
                print("through the gateway API ...", file=sys.stderr)
                api_start, api_request = measure(via_api, dagster, args.runs)
                print("through Dagster's GraphQL (peer) ...", file=sys.stderr)
                gql_start, gql_request = measure(via_graphql, dagster, args.runs)

    rows = [
        ("gateway API", api_start, api_request),
        ("Dagster GraphQL (peer)", gql_start, gql_request),
    ]
    print(f"\n{'path':<24} {'launch→RUN_START p50 s':>23} {'p95 s':>7} {'request p50 ms':>15} {'p95 ms':>8}")
    for name, start, request in rows:
        print(
            f"{name:<24} {pct(start, 50):>23.2f} {pct(start, 95):>7.2f} {pct(request, 50) * 1000:>15.1f} {pct(request, 95) * 1000:>8.1f}"
        )
    ratio = pct(api_start, 50) / pct(gql_start, 50)
    print(f"\nratio (gateway ÷ GraphQL, launch→RUN_START p50): {ratio:.2f}x over {args.runs} runs each")
    if args.json:
        figures = {
            "api_launch_to_run_start_p50_s": round(pct(api_start, 50), 3),
            "api_launch_to_run_start_p95_s": round(pct(api_start, 95), 3),
            "graphql_launch_to_run_start_p50_s": round(pct(gql_start, 50), 3),
            "graphql_launch_to_run_start_p95_s": round(pct(gql_start, 95), 3),
            "api_launch_request_p50_ms": round(pct(api_request, 50) * 1000, 1),
            "graphql_launch_request_p50_ms": round(pct(gql_request, 50) * 1000, 1),
            "ratio_vs_graphql_x": round(ratio, 3),
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
