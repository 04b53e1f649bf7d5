"""The combined server: the Dagster UI and the gateway from one process, the daemon beside it.

Process layout of `junction dev` (as `dagster dev` does, plus the gateway):
- one **code server** (Dagster's proxy code server, through `ProxyServerManager`) serves the code
  location to both the webserver and the daemon — not one each;
- this process runs uvicorn with one Starlette app: the gateway mounted at JUNCTION_GATEWAY_PREFIX
  *before* the Dagster webserver app, whose last route is a catch-all;
- `dagster-daemon run` runs as a child process (schedules, sensors, the run queue, run monitoring).
Ctrl-C or SIGTERM stops uvicorn, then the daemon (IPC shutdown message, then kill), then the code
server; nothing is left behind. If the daemon dies, the server stops with an error.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import yaml

from orchestration.errors import ConfigurationError
from orchestration.settings import PROJECT_ROOT, JunctionSettings, get_settings

logger = logging.getLogger("junction.server")

# Dagster webserver defaults (dagster_webserver.cli), kept for the embedded webserver.
DB_STATEMENT_TIMEOUT_MS = 15000
DB_POOL_RECYCLE_S = 3600
DB_POOL_MAX_OVERFLOW = 20
DAEMON_STOP_TIMEOUT_S = 20


# No permessage-deflate on WebSockets: its compressor costs ~100 KB per connection and compresses every
# frame once per subscriber (benchmarks/streaming_live.py measures the memory per idle connection).
WEBSOCKETS = {"ws_per_message_deflate": False}


def default_workspace_file() -> Path:
    local = Path.cwd() / "workspace.yaml"
    return local if local.exists() else PROJECT_ROOT / "workspace.yaml"


def check_port_free(host: str, port: int) -> None:
    """Fail before starting anything when the port is taken (a one-line error, not a traceback)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigurationError(
                    f"port {port} on {host} is already in use (choose another with --port)"
                ) from None
            raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def workspace_target(workspace_file: Path):
    """Dagster's load target for a workspace file, validated now so a malformed file fails clearly."""
    from dagster._core.workspace.load_target import WorkspaceFileTarget

    if not workspace_file.is_file():
        raise ConfigurationError(f"{workspace_file}: workspace file not found")
    try:
        document = yaml.safe_load(workspace_file.read_text())
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{workspace_file}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if (
        not isinstance(document, dict)
        or not isinstance(document.get("load_from"), list)
        or not document["load_from"]
    ):
        raise ConfigurationError(f"{workspace_file}: load_from: must be a non-empty list of code locations")
    target = WorkspaceFileTarget(paths=[str(workspace_file)])
    try:
        target.create_origins()
    except Exception as exc:  # noqa: BLE001 - Dagster raises several types for a bad workspace
        message = " ".join(str(exc).split())
        raise ConfigurationError(f"{workspace_file}: {message}") from None
    return target


def open_instance(settings: JunctionSettings):
    """The Dagster instance of DAGSTER_HOME, with a clear error when its storage is unreachable."""
    from dagster import DagsterInstance

    try:
        instance = DagsterInstance.get()
        instance.get_runs_count()  # touches run storage: an unreachable database fails here
        return instance
    except Exception as exc:  # noqa: BLE001 - storage drivers raise their own types
        reason = " ".join(str(exc).split())[:300]
        raise ConfigurationError(
            f"Dagster instance at DAGSTER_HOME={settings.dagster_home} failed: {reason}"
        ) from None


class GatewayFirst:
    """Every path under the gateway's prefix goes to the gateway; everything else to `fallback`.

    A plain prefix test rather than Starlette's `Mount`, whose pattern (`.*`) does not match paths
    holding a newline: those fell through to a bare text 404 instead of the gateway's problem
    document. Lifespan events go to the gateway (a mounted app's lifespan would not run).
    """

    def __init__(self, gateway, prefix: str, fallback) -> None:
        self.gateway = gateway
        self.prefix = prefix
        self.fallback = fallback

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self.gateway(scope, receive, send)
            return
        path = scope["path"]
        if path == self.prefix or path.startswith(self.prefix + "/"):
            # Starlette's mount convention: the path stays whole, root_path grows by the prefix.
            # `app_root_path` is what `request.url_for` and `request.base_url` start from; under a
            # `Mount` the outer router adds the mount path itself, but the gateway's router knows no
            # prefix, so its URLs carry it only if the root they start from does.
            mounted_at = scope.get("root_path", "") + self.prefix
            await self.gateway({**scope, "root_path": mounted_at, "app_root_path": mounted_at}, receive, send)
            return
        await self.fallback(scope, receive, send)


async def not_under_the_gateway(scope, receive, send) -> None:
    """The standalone gateway's answer outside its prefix."""
    from orchestration.gateway.guards import send_problem

    if scope["type"] != "http":
        return
    await send_problem(
        send, 404, "Not Found", "not-found", "the gateway serves only its prefix", scope["path"]
    )


def build_combined_app(settings: JunctionSettings, workspace_process_context) -> GatewayFirst:
    """The gateway under its prefix, then the Dagster webserver (whose last route is a catch-all)."""
    import httpx
    from dagster_webserver.webserver import DagsterWebserver

    from orchestration.gateway.app import create_gateway_app

    dagster_app = DagsterWebserver(workspace_process_context).create_asgi_app()
    gateway = create_gateway_app(settings, dagster_transport=httpx.ASGITransport(app=dagster_app))
    return GatewayFirst(gateway, settings.gateway_prefix, dagster_app)


@contextmanager
def code_server_workspace(instance, target, run_dir: Path) -> Iterator[Path]:
    """Start one code server per location and write a workspace file pointing at them."""
    from dagster._cli.proxy_server_manager import ProxyServerManager

    with ProxyServerManager(instance=instance, workspace_load_target=target) as manager:
        run_dir.mkdir(parents=True, exist_ok=True)
        workspace_file = run_dir / "workspace.yaml"
        workspace_file.write_text(yaml.safe_dump({"load_from": manager.get_code_server_specs()}))
        yield workspace_file


@contextmanager
def daemon_process(instance, workspace_file: Path, log_level: str) -> Iterator[subprocess.Popen]:
    """`dagster-daemon run` against the shared code server, stopped through its IPC shutdown pipe."""
    from dagster_shared.ipc import get_ipc_shutdown_pipe, open_ipc_subprocess, send_ipc_shutdown_message
    from dagster_shared.serdes import serialize_value

    read_fd, write_fd = get_ipc_shutdown_pipe()
    process = open_ipc_subprocess(
        [
            sys.executable, "-m", "dagster._daemon", "run",
            "--log-level", log_level,
            "--shutdown-pipe", str(read_fd),
            "--instance-ref", serialize_value(instance.get_ref()),
            "--workspace", str(workspace_file),
        ],
        pass_fds=[read_fd],
    )  # fmt: skip
    os.close(read_fd)
    try:
        yield process
    finally:
        if process.poll() is None:
            send_ipc_shutdown_message(write_fd)  # also closes write_fd
            try:
                process.wait(timeout=DAEMON_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning("dagster-daemon did not stop in %ss; killing it", DAEMON_STOP_TIMEOUT_S)
                process.kill()
                process.wait()
        else:
            os.close(write_fd)


class _Stop(Exception):
    """SIGTERM, turned into an exception so every context manager unwinds."""


def _raise_stop(_signum, _frame) -> None:
    raise _Stop()


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """uvicorn re-raises the signal it captured once it has shut down; with this handler SIGTERM
    becomes an exception, so the code server and daemon are stopped before the process exits."""
    previous_handler = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        yield
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def serve_platform(
    settings: JunctionSettings, host: str, port: int, workspace_file: Path, log_level: str = "info"
) -> int:
    """Run the combined server until Ctrl-C/SIGTERM (exit 0) or until the daemon dies (exit 1)."""
    import uvicorn
    from dagster import __version__ as dagster_version
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import WorkspaceFileTarget

    target = workspace_target(workspace_file)
    instance = open_instance(settings)
    daemon_died = threading.Event()
    with sigterm_unwinds():
        with ExitStack() as stack:
            stack.enter_context(instance)
            logger.info("starting the code server")
            served_workspace = stack.enter_context(
                code_server_workspace(instance, target, settings.home_dir / "run")
            )
            daemon = stack.enter_context(daemon_process(instance, served_workspace, log_level.upper()))
            instance.optimize_for_webserver(DB_STATEMENT_TIMEOUT_MS, DB_POOL_RECYCLE_S, DB_POOL_MAX_OVERFLOW)
            context = stack.enter_context(
                WorkspaceProcessContext(
                    instance,
                    version=dagster_version,
                    workspace_load_target=WorkspaceFileTarget(paths=[str(served_workspace)]),
                )
            )
            app = build_combined_app(settings, context)
            server = uvicorn.Server(
                uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", **WEBSOCKETS)
            )

            def watch_daemon() -> None:
                daemon.wait()
                if not server.should_exit:
                    daemon_died.set()
                    server.should_exit = True

            threading.Thread(target=watch_daemon, name="watch-daemon", daemon=True).start()
            freeze_the_heap()
            logger.info(
                "Dagster UI on http://%s:%s  gateway on http://%s:%s%s",
                host,
                port,
                host,
                port,
                settings.gateway_prefix,
            )
            server.run()
            if not server.started and not daemon_died.is_set():
                raise ConfigurationError(f"the server could not start on {host}:{port}")
    if daemon_died.is_set():
        logger.error("dagster-daemon exited unexpectedly; the platform stopped")
        return 1
    logger.info("the platform stopped")
    return 0


def standalone_gateway(settings: JunctionSettings | None = None) -> GatewayFirst:
    """The gateway as `junction gateway` serves it (also the factory its worker processes import)."""
    from orchestration.gateway.app import create_gateway_app

    settings = settings or get_settings()
    app = GatewayFirst(create_gateway_app(settings), settings.gateway_prefix, not_under_the_gateway)
    freeze_the_heap()
    return app


def freeze_the_heap() -> None:
    """Move everything a server holds once built (modules, apps, models) out of the collector's
    sight. Without it each full collection walked all of it: benchmarks/proxy.py saw collections of
    up to ~100 ms on the request path (the proxy's p99). Objects made later are collected as usual;
    what is frozen is freed by reference counting as before, only its cycles are kept."""
    import gc

    gc.collect()
    gc.freeze()


def serve_gateway(
    settings: JunctionSettings, host: str, port: int, log_level: str = "info", workers: int = 1
) -> int:
    """The gateway alone (scale-out behind a load balancer); it reaches Dagster at JUNCTION_DAGSTER_URL.
    With several `workers`, uvicorn's processes share the port; each builds its gateway from the
    environment's settings, and shared rate limits count in Redis."""
    import uvicorn

    if workers > 1:
        uvicorn.run(
            "orchestration.server:standalone_gateway",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level=log_level,
            lifespan="on",
            **WEBSOCKETS,
        )
        return 0
    root = standalone_gateway(settings)
    server = uvicorn.Server(
        uvicorn.Config(root, host=host, port=port, log_level=log_level, lifespan="on", **WEBSOCKETS)
    )
    with sigterm_unwinds():
        server.run()
    if not server.started:
        raise ConfigurationError(f"the gateway could not start on {host}:{port}")
    return 0
