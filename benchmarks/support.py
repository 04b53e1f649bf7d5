"""Helpers shared by the benchmark scripts: ports, percentiles, a clean environment, platform readiness."""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


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
