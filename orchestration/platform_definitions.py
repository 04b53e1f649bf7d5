"""Dagster definitions that look after the platform itself, visible in the UI like any other."""

from datetime import UTC, datetime, timedelta

import dagster as dg

from resources.platform_store import PlatformStoreResource


@dg.op(description="Re-hash the whole audit log and check every entry links to the one before it.")
def verify_audit_chain(
    context: dg.OpExecutionContext, platform_store: PlatformStoreResource
) -> dg.Output[int]:
    from orchestration.kernel.audit import verify_chain

    result = verify_chain(engine=platform_store.engine())
    metadata = {
        "entries": dg.MetadataValue.int(result.entries),
        "head_hash": dg.MetadataValue.text(result.head_hash or "(empty)"),
        "intact": dg.MetadataValue.bool(result.ok),
    }
    if not result.ok:
        raise dg.Failure(
            description=f"audit log tampered at entry {result.first_bad_id}: {result.reason}",
            metadata={**metadata, "first_bad_id": dg.MetadataValue.int(result.first_bad_id or 0)},
        )
    context.log.info("audit log intact: %s entries", result.entries)
    return dg.Output(result.entries, metadata=metadata)


@dg.job(
    description="Verifies the hash chain of the platform's audit log (also `junction audit verify`).",
    tags={"junction/kind": "platform"},
)
def audit_log_verification() -> None:
    verify_audit_chain()


audit_log_verification_schedule = dg.ScheduleDefinition(
    job=audit_log_verification,
    cron_schedule="0 3 * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Nightly audit log verification.",
)


@dg.asset(
    group_name="platform",
    description="Who did what on the platform in the last 24 hours, from the audit log.",
    kinds={"python"},
)
def audit_activity(platform_store: PlatformStoreResource) -> dg.MaterializeResult:
    from orchestration.kernel.audit import query

    since = datetime.now(UTC) - timedelta(days=1)
    counts: dict[tuple[str, str], int] = {}
    entries = query(since=since, limit=100_000, engine=platform_store.engine())
    for entry in entries:
        counts[(entry.action, entry.actor)] = counts.get((entry.action, entry.actor), 0) + 1
    rows = [
        dg.TableRecord({"action": action, "actor": actor, "entries": count})
        for (action, actor), count in sorted(counts.items(), key=lambda item: -item[1])
    ]
    schema = dg.TableSchema(
        columns=[
            dg.TableColumn("action", "string"),
            dg.TableColumn("actor", "string"),
            dg.TableColumn("entries", "int"),
        ]
    )
    return dg.MaterializeResult(
        metadata={
            "entries_24h": dg.MetadataValue.int(len(entries)),
            "actors_24h": dg.MetadataValue.int(len({actor for _, actor in counts})),
            "by_action_and_actor": dg.MetadataValue.table(rows, schema=schema),
        }
    )


platform_definitions = dg.Definitions(
    assets=[audit_activity],
    jobs=[audit_log_verification],
    schedules=[audit_log_verification_schedule],
    resources={"platform_store": PlatformStoreResource()},
)
