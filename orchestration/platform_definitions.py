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


@dg.asset(
    group_name="platform",
    description=(
        "Statistics of every workflow by execution (not by run): outcomes, success rate, wall and "
        "active durations, executions waiting and on what, step failures and retries "
        "(as `junction workflows stats` and GET /gateway/v1/workflows compute them)."
    ),
    kinds={"python"},
)
def workflow_statistics(
    context: dg.AssetExecutionContext, platform_store: PlatformStoreResource
) -> dg.MaterializeResult:
    from orchestration.settings import get_settings
    from orchestration.workflows import stats

    step_types = stats.step_types_of(get_settings().workflows_dir)
    report = stats.build_report(
        stats.runs_from_instance(context.instance),
        step_types,
        workflows=sorted(step_types),
        engine=platform_store.engine(),
    )
    columns = {
        "workflow": "string",
        "executions": "int",
        "succeeded": "int",
        "failed": "int",
        "running": "int",
        "waiting": "int",
        "success_rate": "float",
        "wall_p50_s": "float",
        "wall_p95_s": "float",
        "active_p50_s": "float",
        "active_p95_s": "float",
        "waiting_on": "string",
        "step_failures": "string",
        "step_retries": "int",
    }
    rows = [
        dg.TableRecord(
            {
                "workflow": item.workflow,
                "executions": item.executions,
                "succeeded": item.by_status["succeeded"],
                "failed": item.by_status["failed"] + item.by_status["canceled"],
                "running": item.by_status["running"],
                "waiting": item.waiting,
                # Table cells cannot be null: -1 stands for "nothing finished yet".
                "success_rate": -1.0 if item.success_rate is None else item.success_rate,
                "wall_p50_s": item.wall_p50_s or 0.0,
                "wall_p95_s": item.wall_p95_s or 0.0,
                "active_p50_s": item.active_p50_s or 0.0,
                "active_p95_s": item.active_p95_s or 0.0,
                "waiting_on": ", ".join(f"{w.step_id} ({w.kind}): {w.executions}" for w in item.waiting_on),
                "step_failures": ", ".join(
                    f"{step.step_id}: {step.failures + step.failed_and_continued}"
                    for step in item.steps
                    if step.failures or step.failed_and_continued
                ),
                "step_retries": sum(step.retries for step in item.steps),
            }
        )
        for item in report.stats.values()
    ]
    schema = dg.TableSchema(columns=[dg.TableColumn(name, kind) for name, kind in columns.items()])
    return dg.MaterializeResult(
        metadata={
            "workflows": dg.MetadataValue.int(len(rows)),
            "executions": dg.MetadataValue.int(sum(item.executions for item in report.stats.values())),
            "waiting": dg.MetadataValue.int(sum(item.waiting for item in report.stats.values())),
            "by_workflow": dg.MetadataValue.table(rows, schema=schema),
        }
    )


workflow_statistics_job = dg.define_asset_job(
    "workflow_statistics_job",
    selection=[workflow_statistics],
    description="Refreshes the workflow_statistics asset.",
    tags={"junction/kind": "platform"},
)

workflow_statistics_schedule = dg.ScheduleDefinition(
    job=workflow_statistics_job,
    cron_schedule="0 * * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Hourly workflow statistics (the asset's metadata in the UI).",
)


platform_definitions = dg.Definitions(
    assets=[audit_activity, workflow_statistics],
    jobs=[audit_log_verification, workflow_statistics_job],
    schedules=[audit_log_verification_schedule, workflow_statistics_schedule],
    resources={"platform_store": PlatformStoreResource()},
)
