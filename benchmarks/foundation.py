"""Foundation benchmark: how long `junction dev` takes to serve, and what the running platform weighs.

Starts the platform twice on a fresh JUNCTION_HOME (cold: migrations, generated DAGSTER_HOME, admin
key; warm: the same home again), measures the time from process start until the Dagster UI answers
and /gateway/health reports the code location loaded, then the memory of every process of the
platform (RSS and PSS). `dagster dev` is measured the same way as the peer.

    .venv/bin/python benchmarks/foundation.py [--runs 3] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent

from support import free_port, platform_env, platform_ready, wait_for  # noqa: E402  (benchmarks/ is on sys.path)


def tree_memory(pid: int) -> tuple[float, float, int]:
    """RSS and PSS (MB) summed over the process and its descendants, and the process count."""
    root = psutil.Process(pid)
    processes = [root, *root.children(recursive=True)]
    rss = pss = 0
    for process in processes:
        info = process.memory_full_info()
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
    return rss / 2**20, pss / 2**20, len(processes)


def start_and_measure(command: list[str], env: dict[str, str], port: int, ready) -> dict:
    started = time.perf_counter()
    process = subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(lambda: ready(port), process=process)
        ready_s = time.perf_counter() - started
        time.sleep(5)  # let the daemon's first loops and the code server settle before weighing
        rss, pss, count = tree_memory(process.pid)
        return {"ready_s": ready_s, "rss_mb": rss, "pss_mb": pss, "processes": count}
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def junction_ready(port: int) -> bool:
    return platform_ready(f"http://127.0.0.1:{port}")


def dagster_dev_ready(port: int) -> bool:
    query = "{ workspaceOrError { ... on Workspace { locationEntries { loadStatus } } } }"
    try:
        response = httpx.post(f"http://127.0.0.1:{port}/graphql", json={"query": query}, timeout=5)
    except httpx.HTTPError:
        return False
    entries = response.json()["data"]["workspaceOrError"]["locationEntries"]
    return bool(entries) and all(entry["loadStatus"] == "LOADED" for entry in entries)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="warm starts to average (default 3)")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args()

    base_env = platform_env()
    junction = [sys.executable, "-m", "orchestration.cli", "dev", "--port"]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**base_env, "JUNCTION_HOME": str(Path(tmp) / "home")}
        print("cold start of junction dev ...", file=sys.stderr)
        port = free_port()
        cold = start_and_measure([*junction, str(port)], env, port, junction_ready)
        warm = []
        for index in range(args.runs):
            print(f"warm start {index + 1}/{args.runs} ...", file=sys.stderr)
            port = free_port()
            warm.append(start_and_measure([*junction, str(port)], env, port, junction_ready))

        dagster_home = Path(tmp) / "dagster-dev-home"
        dagster_home.mkdir()
        peer_env = {**base_env, "DAGSTER_HOME": str(dagster_home)}
        print("dagster dev (peer) ...", file=sys.stderr)
        port = free_port()
        peer = start_and_measure(
            [sys.executable, "-m", "dagster", "dev", "-w", "workspace.yaml", "-p", str(port)],
            peer_env,
            port,
            dagster_dev_ready,
        )

    warm_ready = statistics.median(run["ready_s"] for run in warm)
    warm_rss = statistics.median(run["rss_mb"] for run in warm)
    warm_pss = statistics.median(run["pss_mb"] for run in warm)
    rows = [
        ("junction dev, cold", cold["ready_s"], cold["rss_mb"], cold["pss_mb"], cold["processes"]),
        (f"junction dev, warm (median of {args.runs})", warm_ready, warm_rss, warm_pss, warm[0]["processes"]),
        ("dagster dev (peer)", peer["ready_s"], peer["rss_mb"], peer["pss_mb"], peer["processes"]),
    ]
    print(f"\n{'start':<36} {'ready s':>8} {'RSS MB':>8} {'PSS MB':>8} {'procs':>6}")
    for name, ready_s, rss, pss, count in rows:
        print(f"{name:<36} {ready_s:>8.2f} {rss:>8.0f} {pss:>8.0f} {count:>6}")
    ratio = warm_ready / peer["ready_s"]
    print(
        f"\nwarm start vs dagster dev: {ratio:.2f}x   memory (PSS) vs dagster dev: {warm_pss / peer['pss_mb']:.2f}x"
    )

    if args.json:
        figures = {
            "cold_start_s": round(cold["ready_s"], 3),
            "warm_start_s": round(warm_ready, 3),
            "dagster_dev_start_s": round(peer["ready_s"], 3),
            "ratio_warm_start_vs_dagster_dev_x": round(ratio, 3),
            "platform_rss_mb": round(warm_rss, 1),
            "platform_pss_mb": round(warm_pss, 1),
            "dagster_dev_pss_mb": round(peer["pss_mb"], 1),
            "ratio_pss_vs_dagster_dev_x": round(warm_pss / peer["pss_mb"], 3),
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
