"""Alert rules: one evaluation of 1,000 rules over a store of 10,000 runs (time and memory), and run
failure → first notification received on a running platform (`junction dev` with its daemon).

Part 1 builds a Dagster instance (SQLite, in a temporary folder) with 10,000 runs in its run storage
(2,000 failed over 50 jobs) and 300 materialized assets, and 1,000 rules over them: 400 run_failure
(one per job and tag mix), 300 freshness, 200 quality_score and 100 quarantine_share. It times the
first evaluation (every alert new, every group notified into an outbox) and the steady state (the
same evaluation with nothing new to send), with tracemalloc's peak for each.

Part 2 starts the platform with an alert rule on a job that fails and `group_wait: 0s`, launches the
job `--failures` times one after the other, and times each run's failure (its end in run storage) to
the outbox line naming it. The sensor evaluates every 30 s, so the figure is dominated by where in
that interval the failure falls: expect a p50 near 15–20 s and a p95 near 30–35 s.

Goals (issue 15): evaluation < 2 s; failure → notification p50 < 30 s. No peer is measured: the
Alertmanager peer needs Prometheus and Go binaries this machine does not have.

    python benchmarks/alerts.py [--rules 1000] [--runs 10000] [--failures 5] [--skip-platform] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import tracemalloc
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.support import pct, platform_env, project_copy, running_platform  # noqa: E402

FAILING_JOB = "bench_failing_job"
FAILING_MODULE = f'''
import dagster as dg


@dg.op
def bench_fail() -> None:
    raise RuntimeError("benchmark failure")


@dg.job(name="{FAILING_JOB}")
def bench_failing_job():
    bench_fail()
'''


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rules_file(path: Path, rule_count: int) -> None:
    lines = ["defaults: {group_wait: 0s, group_interval: 5m, repeat_interval: 4h}", "rules:"]
    kinds = [("run_failure", 0.4), ("freshness", 0.3), ("quality_score", 0.2), ("quarantine_share", 0.1)]
    number = 0
    for kind, share in kinds:
        for index in range(int(rule_count * share)):
            if kind == "run_failure":
                signal = f"{{kind: run_failure, job: job_{index % 50}, window: 1h}}"
            elif kind == "freshness":
                signal = f"{{kind: freshness, asset: asset_{index % 300}, within: {1 + index % 3}h}}"
            else:
                signal = f"{{kind: {kind}, pipeline: pipe_{index % 100}}}"
            lines += [f"  rule_{number}:", f"    signal: {signal}", "    channels: [bench]"]
            number += 1
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def evaluation_figures(args, folder: Path) -> dict[str, float]:
    folder.mkdir(parents=True)
    os.environ["JUNCTION_HOME"] = str(folder / "home")
    channels = folder / "channels.yaml"
    channels.write_text("channels:\n  bench: {kind: outbox}\n", encoding="utf-8")
    os.environ["JUNCTION_CHANNELS_FILE"] = str(channels)
    alerts = folder / "alerts.yaml"
    rules_file(alerts, args.rules)

    import dagster as dg

    from orchestration.settings import reset_settings_cache
    from orchestration.store.bootstrap import migrate_store
    from sensors.alerts.evaluation import evaluate_rules
    from sensors.alerts.rules import load_alert_rules
    from sensors.alerts.signals import SignalContext

    reset_settings_cache()
    migrate_store()
    rules = load_alert_rules(alerts)
    figures: dict[str, float] = {"rules_count": len(rules.rules), "runs_count": args.runs}
    (folder / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(folder / "dagster")) as instance:
        log(f"writing {args.runs:,} runs and 300 materializations")
        for index in range(args.runs):
            failed = index % 5 == 0
            status = dg.DagsterRunStatus.FAILURE if failed else dg.DagsterRunStatus.SUCCESS
            instance.add_run(
                dg.DagsterRun(job_name=f"job_{index % 50}", run_id=str(uuid.uuid4()), status=status)
            )
        for index in range(300):
            instance.report_runless_asset_event(dg.AssetMaterialization(f"asset_{index}"))
        for index in range(100):
            metadata = {
                "quality_score_rows": 0.5 + index / 200,
                "quality_score_checks": 1.0,
                "rows_read": 100,
            }
            metadata["rows_quarantined"] = index % 20
            instance.report_runless_asset_event(
                dg.AssetMaterialization(f"pipe_{index}_staged", metadata=metadata)
            )

        def timed(now: datetime) -> tuple[float, float, object]:
            tracemalloc.start()
            started = time.perf_counter()
            result = evaluate_rules(rules, SignalContext(instance=instance, now=now))
            seconds = time.perf_counter() - started
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            return seconds, peak / 2**20, result

        now = datetime.now(UTC)
        log("first evaluation (every alert new, every group notified)")
        first_s, first_mb, first = timed(now)
        figures.update(first_evaluation_s=first_s, first_evaluation_peak_mb=first_mb)
        figures["alerts_firing_count"] = first.firing
        figures["notifications_sent_count"] = len(first.sent)
        steady = []
        for repeat in range(3):
            log(f"steady evaluation {repeat + 1}/3")
            seconds, peak_mb, result = timed(now + timedelta(seconds=30 * (repeat + 1)))
            assert not result.sent, "a steady evaluation sent notifications"
            steady.append((seconds, peak_mb))
        figures["evaluation_s"] = sorted(seconds for seconds, _ in steady)[1]
        figures["evaluation_peak_mb"] = max(peak for _, peak in steady)
    return figures


def failure_to_notification(args, folder: Path) -> dict[str, float]:
    folder.mkdir(parents=True)
    project = project_copy(folder, {"bench_failing_job.py": FAILING_MODULE})
    alerts = folder / "alerts.yaml"
    alerts.write_text(
        "defaults: {group_wait: 0s, group_interval: 1s, repeat_interval: 4h}\n"
        "rules:\n"
        "  bench_failures:\n"
        f"    signal: {{kind: run_failure, job: {FAILING_JOB}, window: 10m}}\n"
        "    group_by: [rule, run_id]\n"
        "    summary: 'run {{{{ labels.run_id }}}} failed'\n"
        "    channels: [alerts]\n",
        encoding="utf-8",
    )
    env = platform_env()
    home = folder / "platform-home"
    env.update(JUNCTION_HOME=str(home), JUNCTION_ALERTS_FILE=str(alerts), PYTHONPATH=str(project))
    outbox = home / "outbox" / "alerts.jsonl"
    delays: list[float] = []
    with running_platform(env, project) as (base, _):
        key = (home / "admin.key").read_text().strip()
        with httpx.Client(base_url=f"{base}/gateway", headers={"X-API-Key": key}, timeout=60) as api:
            for index in range(args.failures):
                response = api.post(f"/v1/jobs/{FAILING_JOB}/runs", json={})
                response.raise_for_status()
                run_id = response.json()["run_id"]
                deadline = time.time() + 180
                while True:
                    run = api.get(f"/v1/runs/{run_id}").json()
                    if run["status"] == "FAILURE":
                        break
                    if time.time() > deadline:
                        raise SystemExit(f"run {run_id} did not fail within 180 s: {run['status']}")
                    time.sleep(0.2)
                failed_at = datetime.fromisoformat(run["ended_at"]).timestamp()
                while True:
                    lines = outbox.read_text(encoding="utf-8").splitlines() if outbox.exists() else []
                    found = [json.loads(line) for line in lines if run_id in line]
                    if found:
                        received = datetime.fromisoformat(found[0]["time"]).timestamp()
                        break
                    if time.time() > deadline + 120:
                        raise SystemExit(f"no notification for run {run_id} within 5 minutes")
                    time.sleep(0.2)
                delays.append(received - failed_at)
                log(f"failure {index + 1}/{args.failures}: notified {delays[-1]:.1f} s after the run failed")
    return {
        "failure_to_notification_p50_s": pct(delays, 50),
        "failure_to_notification_p95_s": pct(delays, 95),
        "failures_count": len(delays),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rules", type=int, default=1000, help="Rules in the evaluation (default 1000).")
    parser.add_argument("--runs", type=int, default=10_000, help="Runs in the store (default 10000).")
    parser.add_argument("--failures", type=int, default=5, help="Failing runs on the platform (default 5).")
    parser.add_argument("--skip-platform", action="store_true", help="Only the evaluation (no junction dev).")
    parser.add_argument("--json", type=Path, help="Write the figures as one flat JSON object here.")
    args = parser.parse_args()
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        figures.update(evaluation_figures(args, Path(folder) / "evaluation"))
        if not args.skip_platform:
            figures.update(failure_to_notification(args, Path(folder) / "platform"))
    print(
        f"\nAlert evaluation: {figures['rules_count']:,.0f} rules over {figures['runs_count']:,.0f} runs (SQLite)\n"
    )
    print(f"{'measure':<44} {'value':>10} {'goal':>8}")
    rows = [
        ("first evaluation (all new, notifying)", f"{figures['first_evaluation_s']:.2f} s", ""),
        ("  its peak Python memory", f"{figures['first_evaluation_peak_mb']:.1f} MB", ""),
        (
            "  alerts firing / notifications sent",
            f"{figures['alerts_firing_count']:.0f} / {figures['notifications_sent_count']:.0f}",
            "",
        ),
        ("steady evaluation (median of 3)", f"{figures['evaluation_s']:.2f} s", "< 2 s"),
        ("  its peak Python memory", f"{figures['evaluation_peak_mb']:.1f} MB", ""),
    ]
    if "failure_to_notification_p50_s" in figures:
        rows += [
            (
                f"run failure → notification p50 ({figures['failures_count']:.0f} runs)",
                f"{figures['failure_to_notification_p50_s']:.1f} s",
                "< 30 s",
            ),
            ("run failure → notification p95", f"{figures['failure_to_notification_p95_s']:.1f} s", ""),
        ]
    for name, value, goal in rows:
        print(f"{name:<44} {value:>10} {goal:>8}")
    if args.json:
        args.json.write_text(json.dumps({k: round(v, 4) for k, v in figures.items()}, indent=2))


if __name__ == "__main__":
    main()
