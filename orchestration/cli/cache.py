"""`junction cache`: the declared namespaces, a value, invalidation by key or tag, and draining a
write-behind queue.

Figures are kept per process (see `GET /gateway/v1/caches` for the gateway's); what these commands
read and invalidate is the shared part: Redis and the platform store, and every listening process's
memory through Redis.
"""

from __future__ import annotations

import json

import click

from orchestration.cli.common import render_table


@click.group()
def cache() -> None:
    """The multi-layer cache (namespaces in JUNCTION_CACHES_FILE, default resources/caches.yaml)."""


@cache.command()
def namespaces() -> None:
    """Each namespace's layers and policy (a bad caches.yaml is reported with every problem)."""
    from resources.cache import load_namespaces, open_cache

    rows = []
    for name, spec in sorted(load_namespaces().items()):
        active = [layer.name for layer in open_cache(name).layers]
        rows.append(
            (
                name,
                ",".join(active) + ("" if active == spec.layers else f" (declared {','.join(spec.layers)})"),
                spec.ttl,
                spec.stale_grace or "-",
                f"{spec.memory.max_entries:,} / {spec.memory.max_bytes}",
                spec.serializer,
                "-" if spec.compress_over_bytes is None else f">{spec.compress_over_bytes} B",
            )
        )
    headers = ("namespace", "layers", "ttl", "stale grace", "memory entries / bytes", "serializer", "zstd")
    click.echo(render_table(headers, rows))


@cache.command()
@click.argument("namespace")
@click.argument("key")
def get(namespace: str, key: str) -> None:
    """Print the value of KEY in NAMESPACE as JSON (exit 1 when it is not cached)."""
    from resources.cache import open_cache

    value = _open(namespace, open_cache).get(key, _MISSING)
    if value is _MISSING:
        raise click.ClickException(f"{key!r} is not cached in {namespace}")
    click.echo(json.dumps(value, default=str, ensure_ascii=False))


@cache.command()
@click.argument("namespace")
@click.option("--key", "keys", multiple=True, help="A key to drop (repeatable).")
@click.option("--tag", "tags", multiple=True, help="Drop every entry with this tag (repeatable).")
def invalidate(namespace: str, keys: tuple[str, ...], tags: tuple[str, ...]) -> None:
    """Drop keys and tagged entries from every layer and every process's memory (audited)."""
    from orchestration.cli.keys import cli_actor
    from orchestration.kernel import audit
    from orchestration.store.bootstrap import migrate_store
    from resources.cache import open_cache

    if not keys and not tags:
        raise click.UsageError("name at least one --key or --tag")
    migrate_store()
    opened = _open(namespace, open_cache)
    dropped = set(keys)
    if keys:
        opened.delete(*keys)
    if tags:
        dropped |= opened.invalidate_tags(*tags)
    audit.append(
        "cache.invalidate",
        actor=cli_actor(),
        target=f"cache:{namespace}",
        origin="cli",
        details={"keys": list(keys), "tags": list(tags), "dropped": len(dropped)},
    )
    click.echo(f"dropped {len(dropped)} key(s) from {namespace}: {', '.join(sorted(dropped)) or '-'}")


@cache.command()
@click.argument("namespace")
@click.option(
    "--timeout", "timeout_s", default=300.0, show_default=True, help="Give up after this many seconds."
)
def flush(namespace: str, timeout_s: float) -> None:
    """Apply NAMESPACE's queued write-behind writes to its origin now, until none is left.

    Waits for a flusher of another process to finish its turn (its lease); exits 1 while the
    writer keeps failing or the time runs out, with the writes left queued (none is lost).
    """
    import time

    from orchestration.store.bootstrap import migrate_store
    from resources.cache import open_cache

    migrate_store()
    opened = _open(namespace, open_cache)
    write_behind = opened.write_behind
    if write_behind is None:
        raise click.BadParameter(f"namespace {namespace!r} declares no write_behind", param_hint="NAMESPACE")
    deadline = time.monotonic() + timeout_s
    applied = 0
    while (left := write_behind.pending()) > 0:
        failures = write_behind.failures
        applied += write_behind.flush()
        click.echo(f"applied {applied:,}, queued {write_behind.pending():,}", err=True)
        if write_behind.failures > failures:
            raise click.ClickException(
                f"the writer {write_behind.spec.writer} failed; {left:,} write(s) stay queued"
            )
        if time.monotonic() > deadline:
            raise click.ClickException(
                f"timed out with {left:,} write(s) queued (another flusher holds the lease?)"
            )
        if write_behind.pending() == left:
            time.sleep(0.5)  # another process's flusher holds the lease: wait for its turn to end
    click.echo(f"{namespace}: {applied:,} write(s) applied to {write_behind.spec.writer}; none queued")


_MISSING = object()


def _open(namespace: str, open_cache):
    try:
        return open_cache(namespace)
    except KeyError as exc:
        raise click.BadParameter(str(exc.args[0]), param_hint="NAMESPACE") from None
