"""`junction cache`: the declared namespaces, figures across processes, a value, invalidation by key
or tag, warming, and draining a write-behind queue.

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


@cache.command()
@click.argument("namespace", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def stats(namespace: str | None, as_json: bool) -> None:
    """Hits, misses, latencies, bytes and loads per namespace and layer, summed over the processes
    that reported in the last minute (every process using the cache reports every 5 s)."""
    from orchestration.settings import get_settings
    from orchestration.store.bootstrap import migrate_store
    from orchestration.store.db import get_engine
    from resources.cache import load_namespaces
    from resources.cache.reporting import stored_figures

    if namespace is not None and namespace not in load_namespaces():
        raise click.BadParameter(f"no cache namespace {namespace!r}", param_hint="NAMESPACE")
    migrate_store()
    figures = stored_figures(get_engine(get_settings().store_url), namespace)
    if as_json:
        click.echo(json.dumps(figures, indent=2))
        return
    if not figures:
        click.echo("no process reported cache figures in the last minute")
        return
    rows = []
    for name, merged in figures.items():
        for layer, values in merged["layers"].items():
            rows.append(
                (
                    name,
                    layer,
                    f"{values['hits']:,}",
                    f"{values['misses']:,}",
                    "-" if values["hit_rate"] is None else f"{values['hit_rate']:.1%}",
                    "-" if values["hit_p50_us"] is None else f"{values['hit_p50_us']:,.1f}",
                    "-" if values["hit_p99_us"] is None else f"{values['hit_p99_us']:,.1f}",
                    f"{values['bytes']:,}" if layer == "memory" else "-",
                    f"{values['evictions']:,}" if layer == "memory" else "-",
                )
            )
        rows.append(
            (
                name,
                "(all)",
                f"{merged['hits']:,}",
                f"{merged['gets'] - merged['hits']:,}",
                "-" if merged["hit_rate"] is None else f"{merged['hit_rate']:.1%}",
                "",
                "",
                f"loads {merged['loader_calls']:,} ({merged['loader_seconds']:.2f} s)",
                f"{merged['processes']} process(es)",
            )
        )
    headers = ("namespace", "layer", "hits", "misses", "hit rate", "p50 µs", "p99 µs", "bytes", "evictions")
    click.echo(render_table(headers, rows))


@cache.command()
@click.argument("namespace")
@click.option("--top", type=click.IntRange(min=1), help="How many of the most read keys (default: warm.top).")
@click.option(
    "--concurrency",
    type=click.IntRange(min=1, max=256),
    help="Keys loaded at once (default: warm.concurrency).",
)
def warm(namespace: str, top: int | None, concurrency: int | None) -> None:
    """Load NAMESPACE's most read keys through its warm loader into every layer (exit 1 if any failed)."""
    from orchestration.store.bootstrap import migrate_store
    from resources.cache import open_cache
    from resources.cache.warming import NothingToWarm
    from resources.cache.warming import warm as warm_namespace

    migrate_store()
    opened = _open(namespace, open_cache)
    with click.progressbar(
        length=top or 1, label=f"warming {namespace}", file=click.get_text_stream("stderr")
    ) as bar:

        def progress(done: int, total: int) -> None:
            bar.length = total
            bar.update(done - bar.pos)

        try:
            result = warm_namespace(opened, top=top, progress=progress, concurrency=concurrency)
        except NothingToWarm as exc:
            raise click.BadParameter(str(exc), param_hint="NAMESPACE") from None
    click.echo(
        f"{namespace}: warmed {result.loaded:,} of {result.candidates:,} most read key(s) in {result.seconds} s"
        + (f"; {result.failed:,} failed" if result.failed else "")
    )
    for error in result.errors:
        click.echo(f"  {error}", err=True)
    if result.failed:
        raise SystemExit(1)


_MISSING = object()


def _open(namespace: str, open_cache):
    try:
        return open_cache(namespace)
    except KeyError as exc:
        raise click.BadParameter(str(exc.args[0]), param_hint="NAMESPACE") from None
