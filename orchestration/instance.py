"""The Dagster instance Junction runs against: `DAGSTER_HOME` if set, else a generated one.

The generated `dagster.yaml` keeps Dagster's own SQLite storage, queues runs (Dagster's run queue is
Junction's only queue), turns on run monitoring (so `dagster/max_runtime` works and a run whose worker
died is marked failed instead of holding a queue slot) and runs sensors and schedules on threads.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from orchestration.settings import JunctionSettings, get_settings

# Runs queued beyond this wait in Dagster's queue. 2 cores here and ~105 MB per run worker:
# a handful of concurrent runs keeps the machine responsive.
DEFAULT_MAX_CONCURRENT_RUNS = 4


def generated_dagster_yaml(dagster_home: Path) -> dict:
    storage = str(dagster_home / "storage")
    return {
        "storage": {"sqlite": {"base_dir": storage}},
        "local_artifact_storage": {
            "module": "dagster._core.storage.root",
            "class": "LocalArtifactStorage",
            "config": {"base_dir": str(dagster_home)},
        },
        "run_coordinator": {
            "module": "dagster._core.run_coordinator",
            "class": "QueuedRunCoordinator",
            "config": {"dequeue_interval_seconds": 2},
        },
        # Scale-out knobs are Dagster's own: run limits (also per tag) and op concurrency pools.
        "concurrency": {
            "runs": {
                "max_concurrent_runs": DEFAULT_MAX_CONCURRENT_RUNS,
                # The platform's own maintenance runs (tagged junction/kind=platform) go one at a time.
                # Runs of one ETL pipeline (tagged junction/pipeline=<name>) go one at a time: their
                # staging places are per run, but two publishes of one target would race.
                "tag_concurrency_limits": [
                    {"key": "junction/kind", "value": "platform", "limit": 1},
                    {"key": "junction/pipeline", "value": {"applyLimitPerUniqueValue": True}, "limit": 1},
                ],
            }
        },
        "run_monitoring": {
            "enabled": True,
            "start_timeout_seconds": 180,
            "cancel_timeout_seconds": 180,
            "max_resume_run_attempts": 0,
            "poll_interval_seconds": 30,
        },
        "sensors": {"use_threads": True, "num_workers": 4},
        "schedules": {"use_threads": True, "num_workers": 2},
        "telemetry": {"enabled": False},
        "code_servers": {"local_startup_timeout": 180},
    }


def prepare_dagster_home(settings: JunctionSettings | None = None) -> Path:
    """Make sure DAGSTER_HOME exists (generating its dagster.yaml if it is ours) and export it.

    Exporting it lets every child process (code server, daemon, run workers) find the same instance.
    """
    settings = settings or get_settings()
    home = settings.dagster_home
    if settings.dagster_home_is_generated:
        home.mkdir(parents=True, exist_ok=True)
        config_path = home / "dagster.yaml"
        wanted = yaml.safe_dump(generated_dagster_yaml(home), sort_keys=False)
        if not config_path.exists() or config_path.read_text() != wanted:
            config_path.write_text(wanted)
    elif not home.is_dir():
        raise FileNotFoundError(f"DAGSTER_HOME={home} is not a folder")
    os.environ["DAGSTER_HOME"] = str(home)
    return home
