"""Helpers shared by the benchmark scripts: ports, percentiles, a clean environment, platform readiness,
a temporary copy of the project with benchmark-only modules, import timings."""

from __future__ import annotations

import compileall
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pct(values: list[float], q: int) -> float:
    """The q-th percentile (inclusive method); the value itself for a single observation."""
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def platform_env() -> dict[str, str]:
    """This environment without a developer's platform settings (a JUNCTION_REDIS_URL or DAGSTER_HOME
    would silently measure another setup)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("JUNCTION_") and k != "DAGSTER_HOME"}


def project_copy(destination: Path, analyst_modules: Mapping[str, str]) -> Path:
    """A copy of the project in `destination` with extra analyst modules under `assets/` (file name →
    source): benchmark-only definitions the shipped project does not have. Run the platform with
    `cwd` and `PYTHONPATH` set to the returned folder, so the copy wins over the editable install.

    The copy is byte-compiled here: with PYTHONDONTWRITEBYTECODE set (as in some shells and CI), every
    run worker would otherwise compile the project's modules again when it imports the code location.
    """
    project = destination / "project"
    shutil.copytree(
        ROOT,
        project,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "__pycache__", ".junction", ".pytest_cache", ".ruff_cache", "*.pyc"
        ),
    )
    for file_name, source in analyst_modules.items():
        (project / "assets" / file_name).write_text(source)
    compileall.compile_dir(project, quiet=1)
    return project


def import_seconds(module: str, env: Mapping[str, str], cwd: Path, runs: int = 3) -> float:
    """Median wall time of `python -c "import <module>"` in a fresh interpreter (after one warm-up run
    for the file system caches): what a run worker pays to load a code location."""
    command = [sys.executable, "-c", f"import {module}"]
    subprocess.run(command, env=env, cwd=cwd, check=True, capture_output=True)
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, env=env, cwd=cwd, check=True, capture_output=True)
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def platform_ready(base: str) -> bool:
    """The Dagster UI answers and the gateway reports its code location loaded."""
    try:
        if httpx.get(f"{base}/server_info", timeout=2).status_code != 200:
            return False
        health = httpx.get(f"{base}/gateway/health", timeout=5)
    except httpx.HTTPError:
        return False
    return health.status_code == 200 and "loaded:" in health.json()["services"]["code_locations"]["detail"]


def wait_for(
    ready, *, process: subprocess.Popen | None = None, timeout_s: float = 240, poll_s: float = 0.1
) -> None:
    """Poll `ready()` until true; fail early if `process` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the platform exited with {process.returncode}")
        if ready():
            return
        time.sleep(poll_s)
    raise TimeoutError("the platform did not become ready")


@contextmanager
def running_platform(env: dict[str, str], cwd: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """`junction dev` started with `env` on a free port, once ready: (base URL, process); SIGTERM after."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestration.cli", "dev", "--port", str(port)],
        env=env,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: platform_ready(base), process=process, poll_s=0.2)
        yield base, process
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)


def ensure_database(url: str) -> None:
    """Create the PostgreSQL database of `url` when it does not exist (the benchmarks load into it)."""
    import sqlalchemy as sa

    target = sa.engine.make_url(url)
    engine = sa.create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            exists = connection.execute(
                sa.text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": target.database}
            ).scalar()
            if not exists:
                connection.execute(sa.text(f'CREATE DATABASE "{target.database}"'))
    finally:
        engine.dispose()


def start_bench_gateway(
    folder: Path, redis_url: str, stream: str, scope: str, extra_env: Mapping[str, str] | None = None
) -> tuple[subprocess.Popen, str, str, dict[str, str]]:
    """`junction gateway` on Redis with one declared `stream` (its store in `folder`) and a key of
    `scope`: (the process, its gateway base URL, the key, the environment it runs in)."""
    import re

    streams = folder / "streams"
    streams.mkdir()
    (streams / "bench.yaml").write_text(f"name: {stream}\nretention: {{max_count: 1000000}}\n")
    env = {
        **platform_env(),
        "JUNCTION_HOME": str(folder / "home"),
        "JUNCTION_REDIS_URL": redis_url,
        "JUNCTION_STREAMS_DIR": str(streams),
        **(extra_env or {}),
    }
    cli = [sys.executable, "-m", "orchestration.cli"]
    subprocess.run([*cli, "events", "streams"], env=env, check=True, capture_output=True, cwd=ROOT)
    created = subprocess.run(
        [*cli, "keys", "create", "bench", "--scope", scope],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    key = re.search(r"jk_[\w-]+", created).group(0)
    port = free_port()
    process = subprocess.Popen(
        [*cli, "gateway", "--port", str(port), "--log-level", "warning"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=(folder / "gateway.log").open("wb"),
    )
    base = f"http://127.0.0.1:{port}/gateway"

    def answers() -> bool:
        try:
            return httpx.get(f"{base}/health", timeout=2).status_code in (200, 503)
        except httpx.HTTPError:
            return False

    wait_for(answers, process=process, timeout_s=60)
    return process, base, key, env
