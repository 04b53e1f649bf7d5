"""Workflow engine benchmark on PostgreSQL storage: throughput against a no-op baseline, per-step
overhead, and parked executions that hold no run worker.

Starts `junction dev` on a temporary copy of the project (`support.project_copy`) with one extra
analyst module under `assets/` defining `bench_noop`, a job of one op that returns None (benchmark
only, not shipped), a fresh PostgreSQL database on 127.0.0.1:5432 holding both Dagster's storage
(dagster-postgres, a generated dagster.yaml as in deploy/dagster.yaml) and the platform store, and a
workflows folder with two benchmark workflows. The baseline runs in the same code location as the
workflows, so the ratio is the workflow engine's overhead over Dagster's own cost per run. Before the
platform starts: what a run worker pays to load the code location (`import orchestration.definitions`
in a fresh interpreter, median of 3) and, for information, a bare code location holding only the no-op
job. Then, all through the gateway API and Dagster's run queue (`--max-concurrent-runs`, default 4 as
the embedded instance):

1. baseline: N runs of `bench_noop` launched at once;
2. N executions of a 4-step workflow (`bench_four_steps`, transformations over two records) launched
   at once; time until all finish, executions per minute, failures, peak memory of the whole platform
   (PSS and RSS of `junction dev`'s process tree), the ratio to the baseline, and per-step overhead
   inside a run (from Dagster's step start/end timestamps);
3. `--parked P` executions of `bench_parked` (a step, an approval, a step) launched and parked:
   process count and memory before and after (a parked execution holds no run worker), then every
   approval approved through the gateway, and the time until all of them complete.

    .venv/bin/python benchmarks/workflows.py [--executions 100] [--parked 200] [--json results.json]
    .venv/bin/python benchmarks/workflows.py --executions 5 --parked 5     # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from support import import_seconds, pct, platform_env, project_copy, running_platform  # noqa: E402

from orchestration.instance import generated_dagster_yaml  # noqa: E402

POSTGRES_ADMIN_URL = os.environ.get(
    "JUNCTION_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
BASELINE_JOB = "bench_noop"
FOUR_STEPS = "bench_four_steps"
PARKED = "bench_parked"
ADMIN = "local-admin"  # the principal of the admin key `junction dev` generates on a fresh home
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}
RECORDS = [{"x": 1}, {"x": 2}]


NOOP_MODULE = '''"""Benchmark only (benchmarks/workflows.py): the no-op 1-op job of the baseline."""

import dagster as dg


@dg.op
def bench_noop_op() -> None:
    return None


# The in-process executor, as the workflow jobs use: Dagster's cheapest run (its default multiprocess
# executor adds a process per step, ~3 s here, which would flatter the workflows).
@dg.job(description="Benchmark baseline: one op that returns None.", executor_def=dg.in_process_executor)
def bench_noop():
    bench_noop_op()
'''

# The same job alone in a code location: what Dagster itself costs a run worker to load.
BARE_LOCATION = f"{NOOP_MODULE}\n\ndefs = dg.Definitions(jobs=[bench_noop])\n"


def transformation(step_id: str, source: str, depends_on: list[str]) -> dict[str, Any]:
    return {
        "id": step_id,
        "type": "transformation",
        "depends_on": depends_on,
        "config": {"source": source, "derive": {"y": "x * 2"}, "select": ["x", "y"]},
    }


WORKFLOWS = {
    FOUR_STEPS: {
        "name": FOUR_STEPS,
        "description": "Benchmark: four light steps in a chain.",
        "inputs": {"rows": {"type": "array", "default": RECORDS}},
        "triggers": [{"type": "api"}],
        "steps": [
            transformation("one", "inputs.rows", []),
            transformation("two", "steps.one.output.records", ["one"]),
            transformation("three", "steps.two.output.records", ["two"]),
            transformation("four", "steps.three.output.records", ["three"]),
        ],
    },
    PARKED: {
        "name": PARKED,
        "description": "Benchmark: a step, an approval (parks), a step.",
        "inputs": {"rows": {"type": "array", "default": RECORDS}},
        "triggers": [{"type": "api"}],
        "steps": [
            transformation("before", "inputs.rows", []),
            {
                "id": "gate",
                "type": "approval",
                "depends_on": ["before"],
                "config": {"message": "Benchmark approval", "approvers": {"principals": [ADMIN]}},
            },
            transformation("after", "steps.before.output.records", ["gate.approved", "before"]),
        ],
    },
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the platform's processes ------------------------------------------------------------------------


def tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def footprint(root: psutil.Process) -> tuple[int, float, float]:
    """(processes, PSS MB, RSS MB) of `root` and its descendants."""
    count, pss, rss = 0, 0, 0
    for process in tree(root):
        try:
            info = process.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        count += 1
        pss += getattr(info, "pss", info.rss)
        rss += info.rss
    return count, pss / 2**20, rss / 2**20


class PeakSampler:
    """Samples the process tree in a thread; keeps the peaks."""

    def __init__(self, root: psutil.Process, interval_s: float = 0.5):
        self.root, self.interval_s = root, interval_s
        self.peak_processes, self.peak_pss_mb, self.peak_rss_mb = 0, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            count, pss, rss = footprint(self.root)
            self.peak_processes = max(self.peak_processes, count)
            self.peak_pss_mb, self.peak_rss_mb = max(self.peak_pss_mb, pss), max(self.peak_rss_mb, rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def settle(root: psutil.Process, idle_processes: int, timeout_s: float = 60) -> tuple[int, float, float]:
    """The footprint once the run workers have exited (back to the idle process count, or timeout)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        current = footprint(root)
        if current[0] <= idle_processes:
            return current
        time.sleep(0.5)
    return footprint(root)


# --- Dagster and the gateway -------------------------------------------------------------------------

RUNS_QUERY = """
query($filter: RunsFilter) { runsOrError(filter: $filter) { ... on Runs { results {
  runId status startTime endTime creationTime stepStats { stepKey startTime endTime }
} } } }
"""


def runs_tagged(dagster: httpx.Client, key: str, value: str) -> list[dict[str, Any]]:
    variables = {"filter": {"tags": [{"key": key, "value": value}]}}
    response = dagster.post("/graphql", json={"query": RUNS_QUERY, "variables": variables})
    response.raise_for_status()
    return response.json()["data"]["runsOrError"]["results"]


def poll(done: Callable[[], bool], what: str, timeout_s: float, interval_s: float = 1.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if done():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"{what}: not done within {timeout_s:.0f} s")


def wait_runs_finished(
    dagster: httpx.Client, key: str, value: str, expected: int, timeout_s: float, since: float = 0.0
) -> list:
    """The runs tagged `key=value` created since `since`, once `expected` of them have finished."""
    state: dict[str, list] = {"runs": []}

    def finished() -> bool:
        state["runs"] = [run for run in runs_tagged(dagster, key, value) if run["creationTime"] >= since]
        done = sum(run["status"] in FINISHED for run in state["runs"])
        log(f"  {done}/{expected} runs finished")
        return len(state["runs"]) >= expected and done == len(state["runs"])

    poll(finished, f"runs tagged {key}={value}", timeout_s, interval_s=2)
    return state["runs"]


def launch_all(count: int, launch: Callable[[int], None], what: str) -> float:
    """Launch `count` at once (queued in Dagster's run queue); returns when the first was sent."""
    started = time.time()
    for index in range(count):
        launch(index)
        if (index + 1) % 25 == 0 or index + 1 == count:
            log(f"  launched {index + 1}/{count} {what}")
    return started


def step_overheads(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Inside each run, from Dagster's step timestamps: the time per step (first step start to last
    step end, divided by the steps — the steps' own work is a few dict operations), the run's start
    until its first step starts, and its last step's end until the run ends."""
    per_step, startup, teardown = [], [], []
    for run in runs:
        steps = [step for step in run["stepStats"] if step["startTime"] and step["endTime"]]
        if not steps or not run["startTime"] or not run["endTime"]:
            continue
        first = min(step["startTime"] for step in steps)
        last = max(step["endTime"] for step in steps)
        per_step.append((last - first) / len(steps))
        startup.append(first - run["startTime"])
        teardown.append(run["endTime"] - last)
    return {
        "per_step_p50_ms": round(pct(per_step, 50) * 1000, 1),
        "per_step_p95_ms": round(pct(per_step, 95) * 1000, 1),
        "run_start_to_first_step_p50_s": round(pct(startup, 50), 3),
        "last_step_to_run_end_p50_s": round(pct(teardown, 50), 3),
    }


def elapsed_s(started: float, runs: list[dict[str, Any]]) -> float:
    return max(run["endTime"] for run in runs) - started


# --- main ------------------------------------------------------------------------------------------


def create_database(name: str) -> str:
    from sqlalchemy import create_engine, make_url, text

    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def drop_database(name: str) -> None:
    from sqlalchemy import create_engine, text

    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def write_home(tmp: Path, project: Path, database_url: str, max_runs: int) -> dict[str, str]:
    """DAGSTER_HOME (PostgreSQL storage), the workflows folder; the environment of `junction dev`
    running the project copy `project`."""
    dagster_home = tmp / "dagster"
    dagster_home.mkdir()
    config = generated_dagster_yaml(dagster_home)
    config["storage"] = {"postgres": {"postgres_url": database_url}}
    # No tag limits: the baseline and the workflows share one queue limit and nothing else.
    config["concurrency"]["runs"] = {"max_concurrent_runs": max_runs}
    (dagster_home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    workflows = tmp / "workflows"
    workflows.mkdir()
    for name, spec in WORKFLOWS.items():
        (workflows / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    env = platform_env()
    env.update(
        {
            "JUNCTION_HOME": str(tmp / "home"),
            "DAGSTER_HOME": str(dagster_home),
            "JUNCTION_DATABASE_URL": database_url,
            "JUNCTION_WORKFLOWS_DIR": str(workflows),
            "PYTHONPATH": str(project),  # the copy (with the no-op module) before the editable install
        }
    )
    return env


def code_location_import(tmp: Path, project: Path, env: dict[str, str]) -> dict[str, float]:
    """Seconds to import Junction's code location and a bare one holding only the no-op job."""
    bare = tmp / "bare"
    bare.mkdir()
    (bare / "bench_bare_location.py").write_text(BARE_LOCATION)
    return {
        "code_location_import_s": round(import_seconds("orchestration.definitions", env, project), 3),
        "bare_noop_location_import_s": round(
            import_seconds("bench_bare_location", {**env, "PYTHONPATH": str(bare)}, bare), 3
        ),
    }


def run_benchmark(
    args: argparse.Namespace, base: str, root: psutil.Process, key: str, imports: dict[str, float]
) -> dict[str, Any]:
    figures: dict[str, Any] = {
        **imports,
        "executions": args.executions,
        "baseline_runs": args.executions,
        "parked": args.parked,
        "max_concurrent_runs": args.max_concurrent_runs,
        "cpu_count": os.cpu_count(),
    }
    api = httpx.Client(base_url=f"{base}/gateway", headers={"Authorization": f"Bearer {key}"}, timeout=120)
    dagster = httpx.Client(base_url=base, timeout=120)
    time.sleep(3)  # let the code server, the daemon and the webserver finish their start-up work
    idle = footprint(root)
    figures.update(idle_processes=idle[0], idle_pss_mb=round(idle[1], 1), idle_rss_mb=round(idle[2], 1))

    def launch_baseline(_: int, phase: str = "baseline") -> None:
        response = api.post(f"/v1/jobs/{BASELINE_JOB}/runs", json={"tags": {"bench": phase}})
        response.raise_for_status()

    def launch_execution(_: int, name: str = FOUR_STEPS) -> None:
        response = api.post(f"/v1/workflows/{name}/executions", json={"inputs": {}})
        response.raise_for_status()

    log("warm-up: one run of each (the daemon's first dequeue, the jobs' snapshots) ...")
    launch_baseline(0, "warm-up")
    launch_execution(0)
    wait_runs_finished(dagster, "bench", "warm-up", 1, args.timeout_s)
    wait_runs_finished(dagster, "junction/workflow", FOUR_STEPS, 1, args.timeout_s)
    settle(root, idle[0], timeout_s=20)

    log(f"baseline: {args.executions} runs of {BASELINE_JOB} ...")

    with PeakSampler(root) as baseline_peak:
        started = launch_all(args.executions, launch_baseline, "baseline runs")
        baseline_runs = wait_runs_finished(dagster, "bench", "baseline", args.executions, args.timeout_s)
    baseline_s = elapsed_s(started, baseline_runs)
    figures.update(
        baseline_time_s=round(baseline_s, 2),
        baseline_runs_per_min=round(args.executions / baseline_s * 60, 1),
        baseline_failures=sum(run["status"] != "SUCCESS" for run in baseline_runs),
        baseline_peak_pss_mb=round(baseline_peak.peak_pss_mb, 1),
        baseline_peak_processes=baseline_peak.peak_processes,
    )
    settle(root, idle[0], timeout_s=20)

    log(f"workflows: {args.executions} executions of {FOUR_STEPS} ...")
    with PeakSampler(root) as workflow_peak:
        started = launch_all(args.executions, launch_execution, "executions")
        workflow_runs = wait_runs_finished(
            dagster, "junction/workflow", FOUR_STEPS, args.executions, args.timeout_s, since=started
        )
    workflow_s = elapsed_s(started, workflow_runs)
    stats = api.get(f"/v1/workflows/{FOUR_STEPS}/stats").json()
    figures.update(
        workflow_time_s=round(workflow_s, 2),
        executions_per_min=round(args.executions / workflow_s * 60, 1),
        workflow_failures=stats["by_status"]["failed"] + stats["by_status"]["canceled"],
        workflow_succeeded=stats["by_status"]["succeeded"] - 1,  # less the warm-up execution
        workflow_peak_pss_mb=round(workflow_peak.peak_pss_mb, 1),
        workflow_peak_rss_mb=round(workflow_peak.peak_rss_mb, 1),
        workflow_peak_processes=workflow_peak.peak_processes,
        ratio_to_baseline_x=round(workflow_s / baseline_s, 3),
        execution_wall_p50_s=stats["wall_p50_s"],
        execution_wall_p95_s=stats["wall_p95_s"],
        **step_overheads(workflow_runs),
    )

    if args.parked:
        before = settle(root, idle[0], timeout_s=20)
        log(f"parked: {args.parked} executions of {PARKED} ...")
        with PeakSampler(root) as parked_peak:
            launch_all(args.parked, lambda index: launch_execution(index, PARKED), "executions to park")

            def all_parked() -> bool:
                current = api.get(f"/v1/workflows/{PARKED}/stats").json()
                log(f"  {current['waiting']}/{args.parked} parked, {current['by_status']['running']} running")
                return current["waiting"] == args.parked

            poll(all_parked, "parking", args.timeout_s, interval_s=2)
        after = settle(root, before[0])
        figures.update(
            parked_processes_before=before[0],
            parked_processes_after=after[0],
            parked_pss_before_mb=round(before[1], 1),
            parked_pss_after_mb=round(after[1], 1),
            parked_rss_before_mb=round(before[2], 1),
            parked_rss_after_mb=round(after[2], 1),
            parking_peak_pss_mb=round(parked_peak.peak_pss_mb, 1),
        )
        pending = api.get("/v1/approvals", params={"status": "pending", "limit": 1000}).json()["approvals"]
        log(f"approving {len(pending)} requests through the gateway ...")
        decided = time.time()
        for index, approval in enumerate(pending):
            api.post(
                f"/v1/approvals/{approval['id']}/approve", json={"comment": "benchmark"}
            ).raise_for_status()
            if (index + 1) % 50 == 0:
                log(f"  approved {index + 1}/{len(pending)}")

        def all_completed() -> bool:
            current = api.get(f"/v1/workflows/{PARKED}/stats").json()["by_status"]
            log(f"  {current['succeeded']}/{args.parked} completed, {current['waiting']} waiting")
            return current["succeeded"] + current["failed"] + current["canceled"] == args.parked

        poll(all_completed, "resumed executions", args.timeout_s, interval_s=3)
        final = api.get(f"/v1/workflows/{PARKED}/stats").json()
        resumed = runs_tagged(dagster, "junction/workflow", PARKED)
        figures.update(
            approvals_decided=len(pending),
            parked_completed=final["by_status"]["succeeded"],
            parked_failures=final["by_status"]["failed"] + final["by_status"]["canceled"],
            approve_to_all_complete_s=round(max(run["endTime"] for run in resumed) - decided, 2),
            parked_runs_total=len(resumed),
        )
    api.close()
    dagster.close()
    return figures


def print_table(figures: dict[str, Any]) -> None:
    rows = [
        ("run worker: import the code location", figures["code_location_import_s"], "s"),
        ("  a bare no-op location (information)", figures["bare_noop_location_import_s"], "s"),
        (f"baseline: {BASELINE_JOB} (no-op 1-op job) runs", figures["baseline_runs"], ""),
        ("  time until all finish", figures["baseline_time_s"], "s"),
        ("  runs per minute", figures["baseline_runs_per_min"], "/min"),
        ("  failures", figures["baseline_failures"], ""),
        ("4-step workflow executions", figures["executions"], ""),
        ("  time until all finish", figures["workflow_time_s"], "s"),
        ("  executions per minute", figures["executions_per_min"], "/min"),
        ("  failures (must be 0)", figures["workflow_failures"], ""),
        ("  ratio to baseline (time)", figures["ratio_to_baseline_x"], "x"),
        (
            "  execution wall p50 / p95",
            f"{figures['execution_wall_p50_s']} / {figures['execution_wall_p95_s']}",
            "s",
        ),
        (
            "  per-step time in a run p50 / p95",
            f"{figures['per_step_p50_ms']} / {figures['per_step_p95_ms']}",
            "ms",
        ),
        ("  run start → first step p50", figures["run_start_to_first_step_p50_s"], "s"),
        ("  last step → run end p50", figures["last_step_to_run_end_p50_s"], "s"),
        ("platform idle: processes / PSS", f"{figures['idle_processes']} / {figures['idle_pss_mb']}", "MB"),
        (
            "platform peak (workflows): processes / PSS",
            f"{figures['workflow_peak_processes']} / {figures['workflow_peak_pss_mb']}",
            "MB",
        ),
        ("platform peak (workflows): RSS", figures["workflow_peak_rss_mb"], "MB"),
    ]
    if figures["parked"]:
        rows += [
            ("parked executions", figures["parked"], ""),
            (
                "  processes before / after parking",
                f"{figures['parked_processes_before']} / {figures['parked_processes_after']}",
                "",
            ),
            (
                "  PSS before / after parking",
                f"{figures['parked_pss_before_mb']} / {figures['parked_pss_after_mb']}",
                "MB",
            ),
            ("  approvals decided (gateway)", figures["approvals_decided"], ""),
            ("  completed after approval", figures["parked_completed"], ""),
            ("  failures", figures["parked_failures"], ""),
            ("  approve → all complete", figures["approve_to_all_complete_s"], "s"),
        ]
    width = max(len(name) for name, _, _ in rows)
    print()
    for name, value, unit in rows:
        print(f"{name:<{width}}  {value} {unit}".rstrip())
    print(
        f"\n{figures['cpu_count']} cores, at most {figures['max_concurrent_runs']} concurrent runs; "
        "a shared machine: other work runs beside the benchmark."
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--executions", type=int, default=100, help="executions, and baseline runs (default 100)"
    )
    parser.add_argument(
        "--parked", type=int, default=200, help="executions parked on an approval (default 200)"
    )
    parser.add_argument(
        "--max-concurrent-runs", type=int, default=4, help="the run queue's limit (default 4, as embedded)"
    )
    parser.add_argument("--timeout-s", type=float, default=3600, help="give up on a phase after this long")
    parser.add_argument("--json", type=Path, help="write the figures (flat, snake_case, units in names)")
    args = parser.parse_args()
    # Stopped with SIGTERM: still stop the platform and drop the database (the `finally` blocks).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    database = f"junction_bench_workflows_{os.getpid()}"
    database_url = create_database(database)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            project = project_copy(Path(tmp), {"bench_noop.py": NOOP_MODULE})
            env = write_home(Path(tmp), project, database_url, args.max_concurrent_runs)
            log("timing the code location's import (median of 3) ...")
            imports = code_location_import(Path(tmp), project, env)
            log(f"starting junction dev (PostgreSQL database {database}) ...")
            with running_platform(env, project) as (base, process):
                key = (Path(tmp) / "home" / "admin.key").read_text().strip()
                figures = run_benchmark(args, base, psutil.Process(process.pid), key, imports)
    finally:
        drop_database(database)
    print_table(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
