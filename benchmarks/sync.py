"""Sync benchmark: a paged REST API into PostgreSQL with merge, Junction against dlt's `rest_api` source.

A local upstream (a `ThreadingHTTPServer` in its own process, so it shares no interpreter lock with
the readers) serves N JSON records (id, name, status, amount, updated_at, a nested address) in pages
of 1,000 (`?page=1..`, `total_pages` in the body, bearer auth, `?since=` keeping the records updated at
or after it, as the test upstream and most APIs do). Pages are encoded with orjson per request.

1. Junction: a pipeline spec (`kind: rest`, page-number paginator, `data_selector: data`, bearer token
   from an environment variable, incremental on `updated_at`, merge by `id` into PostgreSQL) is loaded
   and its Dagster job runs in process (`execute_in_process` on an ephemeral instance), the way
   `junction pipelines run` and the tests run it. Timed: the job, end to end (read, flatten, type,
   stage by COPY, checks, merge publish with the cursor state). Figures from the run's metadata.
2. dlt: `rest_api_source` with the same client (bearer, page-number paginator with `total_path`,
   data selector) and `write_disposition=merge` on `id`, into the same database; `pipeline.run`
   timed whole (extract, normalize, load) in the same process.
3. Incremental: 1% of the records (a seeded sample) get a later `updated_at` and a new name; Junction
   runs again from its committed cursor. Reported: requests made, pages read (and their share of a
   full read), rows written (new + updated, from the merge's counts), seconds.

    .venv/bin/pip install -e '.[bench]'   # dlt[postgres]
    .venv/bin/python benchmarks/sync.py [--records 100000] [--json results.json]
        [--url postgresql://postgres@127.0.0.1:5432/junction_bench_sync]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import orjson
import sqlalchemy as sa
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.support import ensure_database, free_port  # noqa: E402

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/junction_bench_sync"
NAME = "bench_records"
PAGE_SIZE = 1_000
TOKEN = "bench-sync-token"
TOKEN_ENV = "BENCH_SYNC_TOKEN"
DLT_DATASET = "bench_dlt_sync"
EPOCH = datetime(2024, 1, 1, tzinfo=UTC)
STATUSES = ("active", "trial", "paused", "closed")
CITIES = ("Lisbon", "Oslo", "Austin", "Osaka", "Lagos", "Quito")


# --- the upstream (its own process) -------------------------------------------------------------------


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def make_records(count: int) -> list[dict[str, Any]]:
    return [
        {
            "id": index,
            "name": f"account {index}",
            "status": STATUSES[index % len(STATUSES)],
            "amount": round(index * 1.37 % 10_000, 2),
            "updated_at": iso(EPOCH + timedelta(seconds=index)),
            "address": {"city": CITIES[index % len(CITIES)], "zip": f"{index % 100_000:05d}"},
        }
        for index in range(1, count + 1)
    ]


def serve(port: int, count: int) -> None:
    """Answer until killed: GET /records (paged, filtered by since), POST /change?fraction=&seed=."""
    records = make_records(count)
    by_since: dict[str | None, list[dict[str, Any]]] = {}  # the filtered list per `since`, as an index would

    def window(since: str | None) -> list[dict[str, Any]]:
        if since not in by_since:
            by_since[since] = [r for r in records if since is None or r["updated_at"] >= since]
        return by_since[since]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real APIs and both clients use

        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path == "/health":
                return self._send(200, b'{"ok":true}')
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self._send(401, b'{"error":"unauthorized"}')
            query = parse_qs(url.query)
            page = int(query.get("page", ["1"])[0])
            size = int(query.get("page_size", [str(PAGE_SIZE)])[0])
            selected = window(query.get("since", [None])[0])
            total_pages = max(1, -(-len(selected) // size))
            chunk = selected[(page - 1) * size : page * size]
            body = {"data": chunk, "page": page, "total_pages": total_pages, "total": len(selected)}
            self._send(200, orjson.dumps(body))

        def do_POST(self) -> None:
            query = parse_qs(urlsplit(self.path).query)
            fraction = float(query.get("fraction", ["0.01"])[0])
            rng = random.Random(int(query.get("seed", ["11"])[0]))
            changed = rng.sample(records, round(len(records) * fraction))
            later = iso(EPOCH + timedelta(days=3_650))
            for record in changed:
                record["name"] += " (renamed)"
                record["updated_at"] = later
            records.sort(key=lambda r: r["id"])
            by_since.clear()
            self._send(200, orjson.dumps({"changed": len(changed)}))

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


def start_upstream(count: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), "--records", str(count)],
        stdout=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return process, base
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("the upstream did not start in 60 s")


# --- Junction -----------------------------------------------------------------------------------------


def drop_tables(url: str) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(sa.text(f"DROP SCHEMA IF EXISTS {DLT_DATASET} CASCADE"))
            for table in sa.inspect(connection).get_table_names():
                if table.startswith(NAME) or table.startswith("_junction"):
                    connection.execute(sa.text(f'DROP TABLE IF EXISTS "{table}" CASCADE'))
    finally:
        engine.dispose()


def write_spec(folder: Path, base: str, url: str) -> Path:
    spec = {
        "description": "Benchmark: a paged REST API merged into PostgreSQL",
        "source": {
            "kind": "rest",
            "base_url": base,
            "path": "/records",
            "params": {"since": "{{ incremental.start }}", "page_size": PAGE_SIZE},
            "auth": {"type": "bearer", "token_env": TOKEN_ENV},
            "paginator": {"type": "page_number", "page_param": "page", "total_pages_path": "total_pages"},
            "data_selector": "data",
        },
        "incremental": {"cursor": "updated_at", "initial": "2000-01-01T00:00:00Z"},
        "target": {"kind": "sql", "url": url, "table": NAME},
        "load": {"mode": "merge", "keys": ["id"]},
    }
    path = folder / f"{NAME}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_junction(spec_path: Path) -> dict[str, Any]:
    import dagster as dg

    from assets.etl.factory import build_pipeline
    from assets.etl.spec import load_pipelines

    job = build_pipeline(load_pipelines([spec_path])[NAME]).resolve_job_def(f"{NAME}_pipeline")
    with dg.DagsterInstance.ephemeral() as instance:
        started = time.perf_counter()
        result = job.execute_in_process(instance=instance, raise_on_error=False)
        seconds = time.perf_counter() - started
    if not result.success:
        failure = next((e for e in result.all_events if e.is_step_failure), None)
        raise SystemExit(f"the Junction run failed: {failure.message if failure else 'see the log'}")
    metadata: dict[str, Any] = {}
    for node in (f"{NAME}_staged", NAME):
        for materialization in result.asset_materializations_for_node(node):
            metadata.update({key: value.value for key, value in materialization.metadata.items()})
    return {"seconds": seconds, **metadata}


# --- dlt ------------------------------------------------------------------------------------------------


def run_dlt(base: str, url: str, pipelines_dir: Path) -> dict[str, Any]:
    import dlt
    from dlt.sources.rest_api import rest_api_source

    parsed = sa.engine.make_url(url)
    credentials = parsed.set(password=parsed.password or "unused").render_as_string(hide_password=False)
    source = rest_api_source(
        {
            "client": {
                "base_url": base,
                "auth": {"type": "bearer", "token": TOKEN},
                "paginator": {"type": "page_number", "base_page": 1, "total_path": "total_pages"},
            },
            "resources": [
                {
                    "name": NAME,
                    "primary_key": "id",
                    "write_disposition": "merge",
                    "endpoint": {
                        "path": "records",
                        "params": {"page_size": PAGE_SIZE},
                        "data_selector": "data",
                    },
                }
            ],
        }
    )
    pipeline = dlt.pipeline(
        pipeline_name="junction_bench_sync",
        destination=dlt.destinations.postgres(credentials=credentials),
        dataset_name=DLT_DATASET,
        pipelines_dir=str(pipelines_dir),
    )
    started = time.perf_counter()
    pipeline.run(source)
    seconds = time.perf_counter() - started
    steps = {
        step.step: (step.finished_at - step.started_at).total_seconds()
        for step in pipeline.last_trace.steps
        if step.finished_at is not None
    }
    with pipeline.sql_client() as client:
        loaded = client.execute_sql(f"SELECT COUNT(*) FROM {client.make_qualified_table_name(NAME)}")[0][0]
    return {"seconds": seconds, "steps": steps, "rows": loaded}


# --- main ---------------------------------------------------------------------------------------------


def rate(count: float, seconds: float) -> float:
    return count / seconds if seconds else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=100_000, help="Records the upstream serves")
    parser.add_argument("--url", default=DEFAULT_URL, help="PostgreSQL database (created when missing)")
    parser.add_argument(
        "--changed", type=float, default=0.01, help="Share of records changed before the re-run"
    )
    parser.add_argument("--json", type=Path, help="Write the figures as a flat JSON object")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the upstream process
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, args.records)

    logging.disable(logging.WARNING)
    os.environ[TOKEN_ENV] = TOKEN
    os.environ["RUNTIME__DLTHUB_TELEMETRY"] = "false"
    import dagster  # noqa: F401  (imports before any clock starts)
    import dlt  # noqa: F401

    from assets.etl.factory import build_pipeline  # noqa: F401

    ensure_database(args.url)
    drop_tables(args.url)
    process, base = start_upstream(args.records)
    full_pages = -(-args.records // PAGE_SIZE)
    try:
        with tempfile.TemporaryDirectory(prefix="junction-bench-sync-") as tmp:
            folder = Path(tmp)
            spec_path = write_spec(folder, base, args.url)
            print(f"Junction: {args.records:,} records in {full_pages} pages ...", file=sys.stderr)
            first = run_junction(spec_path)
            print("dlt rest_api: the same upstream into the same database ...", file=sys.stderr)
            dlt_run = run_dlt(base, args.url, folder / "dlt")
            changed = httpx.post(f"{base}/change", params={"fraction": args.changed}).json()["changed"]
            print(f"Junction: incremental re-run after {changed:,} records changed ...", file=sys.stderr)
            second = run_junction(spec_path)
    finally:
        process.kill()
        process.wait()

    first_rows = first.get("rows_new", 0) + first.get("rows_updated", 0)
    if first_rows != args.records or dlt_run["rows"] != args.records:
        raise SystemExit(
            f"loaded {first_rows:,} (Junction) and {dlt_run['rows']:,} (dlt) of {args.records:,}"
        )
    written = second.get("rows_new", 0) + second.get("rows_updated", 0)
    junction_rate = rate(args.records, first["seconds"])
    dlt_rate = rate(args.records, dlt_run["seconds"])
    pages_pct = 100.0 * second.get("source_pages_read", 0) / full_pages

    print(
        f"\n{'run':<34} {'records':>9} {'requests':>9} {'pages':>6} {'written':>8} {'s':>7} {'records/s':>10}"
    )
    print(
        f"{'Junction full sync (merge)':<34} {args.records:>9,} {first.get('source_requests_made', 0):>9} "
        f"{first.get('source_pages_read', 0):>6} {first_rows:>8,} {first['seconds']:>7.2f} {junction_rate:>10,.0f}"
    )
    print(
        f"{'dlt rest_api (merge)':<34} {dlt_run['rows']:>9,} {'':>9} {'':>6} {dlt_run['rows']:>8,} "
        f"{dlt_run['seconds']:>7.2f} {dlt_rate:>10,.0f}"
    )
    for step in ("extract", "normalize", "load"):
        if step in dlt_run["steps"]:
            print(f"{'  dlt ' + step:<34} {'':>9} {'':>9} {'':>6} {'':>8} {dlt_run['steps'][step]:>7.2f}")
    print(
        f"{f'Junction re-run, {changed:,} changed':<34} {second.get('rows_read', 0):>9,} "
        f"{second.get('source_requests_made', 0):>9} {second.get('source_pages_read', 0):>6} {written:>8,} "
        f"{second['seconds']:>7.2f}"
    )
    ratio = junction_rate / dlt_rate if dlt_rate else 0.0
    print(
        f"\nratio_vs_dlt {ratio:.2f}x; re-run read {pages_pct:.1f}% of the pages and wrote {written:,} rows "
        f"for {changed:,} changed records"
    )
    figures = {
        "records": args.records,
        "end_to_end_s": round(first["seconds"], 3),
        "end_to_end_records_per_s": round(junction_rate),
        "dlt_s": round(dlt_run["seconds"], 3),
        "dlt_records_per_s": round(dlt_rate),
        "ratio_vs_dlt": round(ratio, 2),
        "incremental_changed_records": changed,
        "incremental_requests_made": second.get("source_requests_made", 0),
        "incremental_pages_read_pct": round(pages_pct, 2),
        "incremental_rows_written": written,
        "incremental_s": round(second["seconds"], 3),
    }
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
