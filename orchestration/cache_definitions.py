"""The cache in the Dagster UI: the `cache_statistics` asset (its metadata is the cache's view, plotted
over materializations) and one `cache_warming__<namespace>` asset per namespace declaring `warm`, with
a schedule when the namespace names one (`warm.schedule`: warm before that time)."""

from pathlib import Path

import dagster as dg

from resources.cache import CacheResource, NamespaceSpec, load_namespaces
from resources.platform_store import PlatformStoreResource

# The asset sums the processes that reported within this window: the gateway's, which lives long,
# and the run workers' of the last hour, which have ended.
STATISTICS_WINDOW_S = 3600.0


@dg.asset(
    group_name="platform",
    description=(
        "The multi-layer cache per namespace and layer: hits, misses, hit rate, p50/p99 latency, bytes, "
        "evictions, compression, loads and lock waits, summed over the processes of the last hour "
        "(as `junction cache stats` and GET /gateway/v1/caches show them)."
    ),
    kinds={"python"},
)
def cache_statistics(platform_store: PlatformStoreResource) -> dg.MaterializeResult:
    from resources.cache.reporting import stored_figures

    figures = stored_figures(platform_store.engine(), live_within_s=STATISTICS_WINDOW_S)
    columns = {
        "namespace": "string",
        "layer": "string",
        "hits": "int",
        "misses": "int",
        "hit_rate": "float",
        "hit_p50_us": "float",
        "hit_p99_us": "float",
        "bytes": "int",
        "evictions": "int",
    }
    rows = [
        dg.TableRecord(
            {
                "namespace": name,
                "layer": layer,
                "hits": values["hits"],
                "misses": values["misses"],
                # Table cells cannot be null: -1 stands for "not read yet".
                "hit_rate": -1.0 if values["hit_rate"] is None else values["hit_rate"],
                "hit_p50_us": values["hit_p50_us"] or 0.0,
                "hit_p99_us": values["hit_p99_us"] or 0.0,
                "bytes": values["bytes"],
                "evictions": values["evictions"],
            }
        )
        for name, merged in figures.items()
        for layer, values in merged["layers"].items()
    ]
    metadata: dict[str, dg.MetadataValue] = {
        "namespaces": dg.MetadataValue.int(len(figures)),
        "by_layer": dg.MetadataValue.table(
            rows, schema=dg.TableSchema(columns=[dg.TableColumn(n, kind) for n, kind in columns.items()])
        ),
    }
    # One number per namespace and figure: Dagster plots numeric metadata across materializations.
    for name, merged in figures.items():
        metadata[f"{name}/gets"] = dg.MetadataValue.int(merged["gets"])
        metadata[f"{name}/hit_rate"] = dg.MetadataValue.float(merged["hit_rate"] or 0.0)
        metadata[f"{name}/loader_calls"] = dg.MetadataValue.int(merged["loader_calls"])
        metadata[f"{name}/processes"] = dg.MetadataValue.int(merged["processes"])
        if merged["compression_ratio"] is not None:
            metadata[f"{name}/compression_ratio"] = dg.MetadataValue.float(merged["compression_ratio"])
        memory = merged["layers"].get("memory")
        if memory and memory["hit_p99_us"] is not None:
            metadata[f"{name}/memory_hit_p99_us"] = dg.MetadataValue.float(memory["hit_p99_us"])
    return dg.MaterializeResult(metadata=metadata)


cache_statistics_job = dg.define_asset_job(
    "cache_statistics_job",
    selection=[cache_statistics],
    description="Refreshes the cache_statistics asset.",
    tags={"junction/kind": "platform"},
)

cache_statistics_schedule = dg.ScheduleDefinition(
    job=cache_statistics_job,
    cron_schedule="*/15 * * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="The cache's figures every 15 minutes (the asset's metadata in the UI).",
)


def warming_asset(namespace: str, spec: NamespaceSpec) -> dg.AssetsDefinition:
    @dg.asset(
        name=f"cache_warming__{namespace}",
        group_name="platform",
        description=(
            f"Loads the {spec.warm.top} most read keys of cache namespace {namespace!r} through "
            f"{spec.warm.loader} (also `junction cache warm {namespace}`)."
        ),
        kinds={"python"},
    )
    def warm_namespace(context: dg.AssetExecutionContext, cache: CacheResource) -> dg.MaterializeResult:
        from resources.cache.warming import warm

        result = warm(cache.namespace(namespace))
        for error in result.errors:
            context.log.warning("not warmed: %s", error)
        metadata = {
            "candidates": dg.MetadataValue.int(result.candidates),
            "loaded": dg.MetadataValue.int(result.loaded),
            "failed": dg.MetadataValue.int(result.failed),
            "seconds": dg.MetadataValue.float(result.seconds),
        }
        if result.candidates and not result.loaded:
            raise dg.Failure(description=f"no key of {namespace} could be loaded", metadata=metadata)
        return dg.MaterializeResult(metadata=metadata)

    return warm_namespace


def cache_definitions(caches_file: str | Path) -> dg.Definitions:
    """The statistics asset and its schedule, and a warming asset (and schedule) per warmed namespace.
    Reading `caches_file` here makes a bad file fail the code location, in the kernel's format."""
    assets: list = [cache_statistics]
    jobs: list = [cache_statistics_job]
    schedules: list = [cache_statistics_schedule]
    for name, spec in sorted(load_namespaces(caches_file).items()):
        if spec.warm is None:
            continue
        asset = warming_asset(name, spec)
        assets.append(asset)
        if spec.warm.schedule is not None:
            job = dg.define_asset_job(
                f"cache_warming__{name}_job", selection=[asset], tags={"junction/kind": "platform"}
            )
            jobs.append(job)
            schedules.append(
                dg.ScheduleDefinition(
                    job=job,
                    cron_schedule=spec.warm.schedule,
                    default_status=dg.DefaultScheduleStatus.RUNNING,
                    description=f"Warms cache namespace {name} before its busy time.",
                )
            )
    return dg.Definitions(assets=assets, jobs=jobs, schedules=schedules)
