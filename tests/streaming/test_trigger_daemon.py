"""A stream trigger under the real `dagster-daemon` (`junction dev`): events become runs exactly once.

The platform serves one extra code location (a Python file, as a team would add one) holding a
trigger that makes one run per 2 events of the dotted stream `e2e.orders`, evaluated every second.
Each run reads its id range from the stream and writes the ids it read to a file. After the runs
exist, the sensor's cursor is set back (GraphQL `setSensorCursor`) - what a daemon that died between
launching the runs and saving its cursor leaves behind -, and the next ticks request the same run
keys again: Dagster's run-key dedup keeps one run per batch. Finally the gateway replays the first
two batches as new runs (`POST /v1/streams/{name}/replays`), once per replay id, and the command line
does the same (`junction events replay --as-runs`) through the same function.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from support import wait_until

from orchestration.store import get_engine

pytestmark = pytest.mark.slow

LOCATION = "e2e_streams"
SENSOR = "e2e_orders_in_pairs"

TRIGGER_MODULE = """
import json
import os
from pathlib import Path

import dagster as dg

from resources.event_stream import open_event_stream
from sensors.event_triggers import CountBatches, EventRangeConfig, JobTarget, StreamTrigger


@dg.op
def handle_orders(context: dg.OpExecutionContext, config: EventRangeConfig) -> None:
    with open_event_stream() as events:
        ids = [event.id for event in config.read(events)]
    context.log.info(f"read {len(ids)} events: {ids}")
    handled = Path(os.environ["JUNCTION_HOME"]) / "handled"
    handled.mkdir(exist_ok=True)
    (handled / f"{context.run_id}.json").write_text(json.dumps(ids))


@dg.job
def e2e_orders_job():
    handle_orders()


defs = dg.Definitions(
    jobs=[e2e_orders_job],
    sensors=[
        StreamTrigger(
            name="e2e_orders_in_pairs",
            stream="e2e.orders",
            target=JobTarget(e2e_orders_job, config_op="handle_orders"),
            mode=CountBatches(2),
            minimum_interval_seconds=1,
        ).sensor()
    ],
)
"""

RUNS_QUERY = """
query($filter: RunsFilter) {
  runsOrError(filter: $filter) {
    ... on Runs { results { runId status tags { key value } } }
    ... on PythonError { message }
  }
}
"""

TICKS_QUERY = """
query($selector: SensorSelector!) {
  sensorOrError(sensorSelector: $selector) {
    ... on Sensor { sensorState { ticks(limit: 10) { timestamp status runKeys cursor error { message } } } }
    ... on PythonError { message }
  }
}
"""

SET_CURSOR = """
mutation($selector: SensorSelector!, $cursor: String) {
  setSensorCursor(sensorSelector: $selector, cursor: $cursor) { __typename }
}
"""

SELECTOR = {"repositoryLocationName": LOCATION, "repositoryName": "__repository__", "sensorName": SENSOR}


def graphql(client: httpx.Client, query: str, variables: dict) -> dict:
    response = client.post("/graphql", json={"query": query, "variables": variables})
    response.raise_for_status()
    body = response.json()
    assert "errors" not in body, body
    return body["data"]


def sensor_runs(client: httpx.Client) -> list[dict]:
    data = graphql(client, RUNS_QUERY, {"filter": {"tags": [{"key": "junction/trigger", "value": SENSOR}]}})
    return [
        {**run, "tags": {tag["key"]: tag["value"] for tag in run["tags"]}}
        for run in data["runsOrError"]["results"]
    ]


def ticks(client: httpx.Client) -> list[dict]:
    return graphql(client, TICKS_QUERY, {"selector": SELECTOR})["sensorOrError"]["sensorState"]["ticks"]


def wait_for(condition, timeout_s: float, what: str, platform):
    return wait_until(condition, timeout_s, what, poll_s=0.25, detail=lambda: platform.log()[-3000:])


def finished(runs: list[dict], count: int) -> bool:
    return len(runs) >= count and all(run["status"] in ("SUCCESS", "FAILURE") for run in runs)


def test_the_daemon_launches_one_run_per_batch_even_after_a_lost_cursor(start_platform, tmp_path: Path):
    from resources.event_stream import open_event_stream

    (tmp_path / "e2e_trigger.py").write_text(TRIGGER_MODULE)
    (tmp_path / "workspace.yaml").write_text(
        json.dumps(
            {
                "load_from": [
                    {
                        "python_file": {
                            "relative_path": "e2e_trigger.py",
                            "location_name": LOCATION,
                            "working_directory": str(tmp_path),
                        }
                    }
                ]
            }
        )
    )
    streams = tmp_path / "streams"
    streams.mkdir()
    (streams / "orders.yaml").write_text(
        json.dumps({"name": "e2e.orders", "payload_schema": {"type": "object", "required": ["n"]}})
    )
    platform = start_platform(
        {"JUNCTION_STREAMS_DIR": str(streams)}, args=("--workspace", str(tmp_path / "workspace.yaml"))
    )
    platform.wait_ready(timeout_s=300)  # generous: the machine running the tests may be shared
    store_url = f"sqlite:///{platform.home / 'platform.db'}"

    with (
        open_event_stream(redis_url=None, store_url=store_url) as events,
        httpx.Client(base_url=platform.base_url, timeout=30) as dagster,
    ):
        ids = [
            result.id for result in events.publish_batch("e2e.orders", [{"n": n} for n in range(5)]).results
        ]
        runs = wait_for(
            lambda: (r := sensor_runs(dagster)) and finished(r, 2) and r, 120, "two runs", platform
        )
        assert len(runs) == 2, runs
        by_first = {run["tags"]["junction/events_first"]: run for run in runs}
        assert set(by_first) == {ids[0], ids[2]}
        for first, last in ((ids[0], ids[1]), (ids[2], ids[3])):
            run = by_first[first]
            assert run["status"] == "SUCCESS", run
            assert run["tags"]["junction/events_last"] == last
            assert run["tags"]["junction/stream"] == "e2e.orders"
            assert run["tags"]["dagster/run_key"] == f"batch:e2e.orders:{first}"
            handled = json.loads((platform.home / "handled" / f"{run['runId']}.json").read_text())
            assert handled == [first, last], "the run read exactly its range"

        # A daemon that died after launching these runs never saved its cursor: set it back.
        # The next tick requests both batches again; the daemon finds their run keys used and skips them.
        # A tick already running when the cursor is reset saves its own cursor when it ends, over the
        # reset: then the reset is repeated (what is pinned is the skip, not the race).
        old_keys = {f"batch:e2e.orders:{ids[0]}", f"batch:e2e.orders:{ids[2]}"}
        for attempt in range(3):
            reset_at = time.time()
            graphql(dagster, SET_CURSOR, {"selector": SELECTOR, "cursor": None})
            try:
                wait_for(
                    lambda reset_at=reset_at: [
                        t
                        for t in ticks(dagster)
                        if t["timestamp"] > reset_at and old_keys <= set(t["runKeys"])
                    ],
                    40,
                    "a tick after the cursor reset requesting the same run keys",
                    platform,
                )
                break
            except AssertionError:
                if attempt == 2:
                    raise
        assert len(sensor_runs(dagster)) == 2
        events.publish_batch("e2e.orders", [{"n": 5}])  # completes the open batch (ids[4], new)
        runs = wait_for(
            lambda: (r := sensor_runs(dagster)) and finished(r, 3) and r, 120, "a third run", platform
        )
        time.sleep(2)  # a few more ticks: nothing else may be launched
        runs = sensor_runs(dagster)
        keys = sorted(run["tags"]["dagster/run_key"] for run in runs)
        assert keys == sorted(f"batch:e2e.orders:{first}" for first in (ids[0], ids[2], ids[4])), keys
        errors = [t["error"] for t in ticks(dagster) if t["error"]]
        assert not errors, errors

        # A replay through the gateway: the same batches again, as new runs under their own keys.
        admin = {"Authorization": f"Bearer {(platform.home / 'admin.key').read_text().strip()}"}
        body = {"trigger": SENSOR, "from": ids[0], "to": ids[3], "replay_id": "r1"}
        replayed = dagster.post("/gateway/v1/streams/e2e.orders/replays", json=body, headers=admin)
        assert replayed.status_code == 201, replayed.text
        replay_runs = replayed.json()["runs"]
        assert [(r["run_key"], r["first_id"], r["last_id"], r["launched"]) for r in replay_runs] == [
            (f"replay:r1:batch:e2e.orders:{ids[0]}", ids[0], ids[1], True),
            (f"replay:r1:batch:e2e.orders:{ids[2]}", ids[2], ids[3], True),
        ]
        again = dagster.post("/gateway/v1/streams/e2e.orders/replays", json=body, headers=admin).json()
        assert [(r["run_id"], r["launched"]) for r in again["runs"]] == [
            (r["run_id"], False) for r in replay_runs
        ], "the same replay id launches nothing new"
        runs = wait_for(
            lambda: (r := sensor_runs(dagster)) and finished(r, 5) and r, 120, "the replays", platform
        )
        assert len(runs) == 5
        for run in replay_runs:
            handled = json.loads((platform.home / "handled" / f"{run['run_id']}.json").read_text())
            assert handled == [run["first_id"], run["last_id"]]
        wrong = dagster.post(
            "/gateway/v1/streams/orders/replays", json={**body, "replay_id": None}, headers=admin
        )
        assert wrong.status_code in (404, 422), wrong.text

        # The same replay from the command line: the same function, the platform reached over HTTP.
        env = {**platform.env, "JUNCTION_DAGSTER_URL": platform.base_url}
        command = [sys.executable, "-m", "orchestration.cli", "events", "replay", "e2e.orders", "--as-runs"]
        command += ["--from", ids[0], "--to", ids[3], "--replay-id", "r2"]  # the only trigger: no --trigger
        cli = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stderr
        lines = [line.split("\t") for line in cli.stdout.splitlines()]
        assert [(line[0], line[1], line[3]) for line in lines] == [
            ("launched", f"replay:r2:batch:e2e.orders:{ids[0]}", f"{ids[0]} .. {ids[1]} (2 events)"),
            ("launched", f"replay:r2:batch:e2e.orders:{ids[2]}", f"{ids[2]} .. {ids[3]} (2 events)"),
        ]
        assert f"replay r2 of e2e.orders through {SENSOR} ({ids[0]} .. {ids[3]}): 2 run(s) requested, " in (
            cli.stderr
        )
        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
        assert [line.split("\t")[0] for line in again.stdout.splitlines()] == [
            "skipped (already launched)"
        ] * 2
        assert "0 run(s) requested, 2 skipped as already launched" in again.stderr
        runs = wait_for(
            lambda: (r := sensor_runs(dagster)) and finished(r, 7) and r, 120, "the CLI replays", platform
        )
        cli_runs = [run for run in runs if run["tags"].get("junction/replay") == "r2"]
        assert {run["tags"]["junction/via"] for run in cli_runs} == {"cli"}
        for run in cli_runs:
            assert run["status"] == "SUCCESS", run
            handled = json.loads((platform.home / "handled" / f"{run['runId']}.json").read_text())
            assert handled == [run["tags"]["junction/events_first"], run["tags"]["junction/events_last"]]
        wrong = subprocess.run(
            [*command[:5], "orders", *command[6:], "--trigger", SENSOR],
            env=env,
            capture_output=True,
            text=True,
        )
        assert wrong.returncode != 0 and "listens on stream 'e2e.orders', not 'orders'" in wrong.stderr

    # Both replays are in the audit log, by their caller and origin.
    from orchestration.kernel import audit

    entries = audit.query(action="events.replay", engine=get_engine(store_url))
    by_origin = {(entry.origin, entry.details["replay_id"]) for entry in entries}
    assert {("gateway", "r1"), ("cli", "r2")} <= by_origin
