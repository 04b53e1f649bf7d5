"""Plain helpers shared by test modules (fixtures live in the conftest files)."""

from __future__ import annotations

import os
import random
import socket

import pytest


def free_port() -> int:
    """A port nobody listens on right now (bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_cluster_port() -> int:
    """A free port a Redis Cluster node can use: at most 55535, with its bus port (+10000) free too
    (an ephemeral port from the kernel is often above 55535, which redis-server refuses)."""
    for _ in range(200):
        port = random.randint(20000, 55535)
        try:
            with socket.socket() as first, socket.socket() as bus:
                first.bind(("127.0.0.1", port))
                bus.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise AssertionError("no free port pair (port, port + 10000) below 55536")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def services_required() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes") or os.environ.get(
        "JUNCTION_REQUIRE_SERVICES", ""
    ) in ("1", "true", "yes")


def service_unavailable(reason: str) -> None:
    """Fail (services required) or skip (a developer's machine without the service)."""
    if services_required():
        pytest.fail(f"required service unavailable: {reason}", pytrace=False)
    pytest.skip(f"service unavailable: {reason}")


def wait_until(condition, timeout_s: float, what: str, *, poll_s: float = 0.05, detail=None):
    """Poll `condition()` until it returns something truthy (returned); fail naming `what` (and
    `detail()`, e.g. a server's log) after `timeout_s`."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f"\n{detail()}" if detail else ""))
        time.sleep(poll_s)


def execution_runs(dagster_home, execution_id: str) -> list:
    """The Dagster runs of one workflow execution (tag `junction/execution_id`), newest first."""
    import dagster as dg

    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        return list(instance.get_runs(filters=dg.RunsFilter(tags={"junction/execution_id": execution_id})))


class ServedApp:
    """An ASGI app under a real uvicorn server in a thread (WebSocket clients need a real socket)."""

    def __init__(self, app, port: int | None = None, **config) -> None:
        import threading

        import uvicorn

        self.port = port or free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=self.port, lifespan="on", log_level="warning", **config
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, 30, "the uvicorn server to start")

    def url(self, path: str = "", scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_gateway(tmp_path, env: dict[str, str], name: str, *args: str):
    """`junction gateway` as a subprocess on a free port: (the process, its gateway base URL); its
    output goes to `tmp_path/<name>.log`."""
    import subprocess
    import sys
    from pathlib import Path

    port = free_port()
    log = open(Path(tmp_path) / f"{name}.log", "wb")  # noqa: SIM115 - the process holds it until it stops
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestration.cli", "gateway", "--port", str(port), *args],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return process, f"http://127.0.0.1:{port}/gateway"


def wait_healthy(base: str, process, log) -> None:
    """Until the gateway at `base` answers /health (503 is fine: Dagster is not running); its log
    as the failure when it exits or takes over a minute."""
    import time
    from pathlib import Path

    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code in (200, 503):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(Path(log).read_text())
