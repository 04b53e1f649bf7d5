"""`junction dev` (the whole platform) and `junction gateway` (the gateway alone)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import click

LOG_LEVELS = click.Choice(["critical", "error", "warning", "info", "debug"], case_sensitive=False)


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)-7s %(name)s - %(message)s")
    # Alembic logs every migration step at INFO; the store's revision is printed once instead.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # The gateway's calls to the in-process Dagster app would log every request twice.
    logging.getLogger("httpx").setLevel(logging.WARNING)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option(
    "--port", default=3000, show_default=True, type=click.IntRange(1, 65535), help="Port to listen on."
)
@click.option(
    "--workspace",
    "workspace_file",
    type=click.Path(path_type=Path),
    default=None,
    help="Dagster workspace file (default: ./workspace.yaml, else the project's).",
)
@click.option("--log-level", type=LOG_LEVELS, default="info", show_default=True)
def dev(host: str, port: int, workspace_file: Path | None, log_level: str) -> None:
    """Start the platform: the Dagster UI and the gateway on one port, with the Dagster daemon.

    Migrates the platform store, generates DAGSTER_HOME (unless set) and a local admin API key on
    first start. Stop with Ctrl-C.
    """
    from orchestration.instance import prepare_dagster_home
    from orchestration.kernel.principals import ensure_local_admin_key, export_local_admin_key
    from orchestration.platform_lock import hold_platform_lock
    from orchestration.server import check_port_free, default_workspace_file, serve_platform, workspace_target
    from orchestration.settings import export_public_url, get_settings
    from orchestration.store.bootstrap import migrate_store
    from orchestration.store.db import get_engine
    from resources.event_stream.registry import StreamRegistry

    started = time.perf_counter()
    _configure_logging(log_level)
    settings = export_public_url(get_settings(), host, port)
    check_port_free(host, port)
    workspace_file = workspace_file or default_workspace_file()
    workspace_target(workspace_file)
    dagster_home = prepare_dagster_home(settings)
    revision = migrate_store()
    streams = StreamRegistry(get_engine()).sync_declared(settings.streams_dir)
    subscriptions = sync_subscriptions(settings)
    key, created = ensure_local_admin_key(settings.admin_key_file)
    export_local_admin_key(settings.admin_key_file)  # for the code server, the daemon, run workers
    click.echo(f"junction: state in {settings.home_dir}  (DAGSTER_HOME={dagster_home}, store at {revision})")
    click.echo(f"junction: {len(streams)} stream(s) declared in {settings.streams_dir}")
    click.echo(f"junction: {len(subscriptions)} subscription(s) declared in {settings.subscriptions_dir}")
    verb = "created" if created else "kept"
    click.echo(f"junction: local admin API key '{key.name}' {verb} in {settings.admin_key_file}")
    click.echo(f"junction: starting on http://{host}:{port}  (gateway at {settings.gateway_prefix})")
    click.echo(f"junction: links in reports and notifications start with {settings.public_url}")
    logging.getLogger("junction.server").info("prepared in %.1fs", time.perf_counter() - started)
    with hold_platform_lock(settings.home_dir):
        sys.exit(serve_platform(settings, host, port, workspace_file, log_level))


def sync_subscriptions(settings) -> list:
    """The subscriptions folder into the store (a broken file stops the start, naming file and field)."""
    from orchestration.store.db import get_engine
    from resources.event_stream import open_event_stream
    from resources.event_stream.subscriptions import SubscriptionRegistry, sync_declared

    with open_event_stream(redis_url=settings.redis_url, store_url=settings.store_url) as events:
        return sync_declared(events, SubscriptionRegistry(get_engine()), settings.subscriptions_dir)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option(
    "--port", default=3100, show_default=True, type=click.IntRange(1, 65535), help="Port to listen on."
)
@click.option("--log-level", type=LOG_LEVELS, default="info", show_default=True)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Processes sharing the port (shared rate limits count in Redis).",
)
def gateway(host: str, port: int, log_level: str, workers: int) -> None:
    """Serve the gateway alone (scale out behind a load balancer).

    It reaches Dagster's webserver at JUNCTION_DAGSTER_URL and shares the platform store
    (JUNCTION_DATABASE_URL) with the other instances.
    """
    from orchestration.server import check_port_free, serve_gateway
    from orchestration.settings import get_settings
    from orchestration.store.bootstrap import migrate_store

    _configure_logging(log_level)
    settings = get_settings()
    check_port_free(host, port)
    migrate_store()
    click.echo(
        f"junction: gateway on http://{host}:{port}{settings.gateway_prefix} -> Dagster at {settings.dagster_url}"
    )
    sys.exit(serve_gateway(settings, host, port, log_level, workers))
