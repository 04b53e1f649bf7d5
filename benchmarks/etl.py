"""ETL benchmark: generated CSV rows through Junction's own pipeline into PostgreSQL, and dlt's load.

Generates N rows (10 columns: 3 ints, 2 floats, 2 timestamps, 3 strings; ~1% of the rows carry a
value that does not cast, plus padded/mixed-case strings, null tokens, duplicate ids and cancelled
orders) into a CSV file in a temp dir, writes a pipeline spec next to it (FileSource -> cast ->
cleanse -> filter -> dedupe, 5 Great Expectations checks, a PostgreSQL target loaded by `replace`),
and runs it the way the pipeline's assets do: `factory.stage` (read and transform through
`runner.iter_pipeline`, each clean batch streamed into the staging table's binary COPY as it is
produced; then, while that COPY commits and the quarantine is stored in a thread, GX validates the
same rows in memory) and then `SqlTarget.publish` (swap the staging table into place).
Each stage is timed from inside: the source and the transform steps are wrapped, nothing else is
changed. The staging COPY runs from the first clean batch to its commit, beside the reading, the
transforms and the validation, so the stage times add up to more than the wall time; the table shows
the overlap as a negative line, and end to end is wall time.

Then, in the same process and into the same database, dlt loads the same clean Arrow table with its
fastest PostgreSQL setting (`loader_file_format="csv"`, uncompressed files, COPY; `replace`), and
`ratio_vs_dlt` = Junction's load rows/s (stage + publish; the stage's COPY timed from the first batch
to the commit, waits for the reading included) / dlt's rows/s (its whole `pipeline.run`:
extract, normalize, load); `ratio_vs_dlt_load_step` divides by dlt's load step alone (its COPY of
files already written) for the stricter reading. Because Junction's COPY waits for the reading, both
are also given for the like-for-like load: Junction's stage + publish of the same in-memory clean Arrow
table dlt gets (`ratio_vs_dlt_same_input_x`, `ratio_vs_dlt_load_step_same_input_x`).

Timings exclude interpreter start-up and imports (great_expectations, dagster and dlt are imported
before anything is timed). Memory is the process's peak RSS from `resource.getrusage` (ru_maxrss),
read after the Junction run (before dlt starts) and again at the end.

    .venv/bin/pip install -e '.[bench]'   # dlt[postgres]
    .venv/bin/python benchmarks/etl.py [--rows 1000000] [--json results.json]
        [--url postgresql://postgres@127.0.0.1:5432/junction_bench_etl]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from assets.etl import factory, runner  # noqa: E402
from assets.etl.loads import SqlTarget, StagingStream  # noqa: E402
from assets.etl.quarantine import Batch, Quarantine, RowCounts  # noqa: E402
from assets.etl.sources import InputIdentity, Source  # noqa: E402
from assets.etl.spec import SqlTargetSpec, load_pipelines  # noqa: E402
from assets.etl.transforms import Step  # noqa: E402
from benchmarks.support import ensure_database  # noqa: E402

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/junction_bench_etl"
TABLE = "bench_orders"
DLT_DATASET = "bench_dlt"
CHUNK_ROWS = 100_000
BAD_SHARE = 0.002  # per castable column (5 of them): ~1% of the rows end up quarantined by the cast
STATUSES = ["pending", "paid", "shipped", "refunded"]
STEP_NAMES = ("cast", "cleanse", "filter", "dedupe")  # the spec's transforms, in order
COUNTRIES = ["us", "de", "fr", "gb", "nl", "es", "it", "pl", "se", "jp"]


# --- data ---------------------------------------------------------------------------------------------


def _with_bad(values: pa.Array, rng: np.random.Generator, bad: list[str]) -> pa.Array:
    """`values` as text, with BAD_SHARE of them replaced by text that does not cast back."""
    text = pc.cast(values, pa.string())
    mask = rng.random(len(text)) < BAD_SHARE
    junk = pa.array(rng.choice(bad, len(text)), pa.string())
    return pc.if_else(pa.array(mask), junk, text)


def generate_chunk(rng: np.random.Generator, first_id: int, rows: int) -> pa.Table:
    ids = np.arange(first_id, first_id + rows, dtype=np.int64)
    repeated = rng.random(rows) < 0.005  # ~0.5% repeat an earlier order id: dedupe drops them
    ids[repeated] = np.maximum(1, ids[repeated] - rng.integers(1, 1_000, repeated.sum()))
    customers = rng.integers(1, 100_000, rows)
    ordered = np.datetime64("2024-01-01T00:00:00") + rng.integers(0, 365 * 86_400, rows).astype(
        "timedelta64[s]"
    )
    shipped = ordered + rng.integers(3_600, 10 * 86_400, rows).astype("timedelta64[s]")
    status = rng.choice([*STATUSES, "cancelled"], rows, p=[0.2, 0.35, 0.3, 0.1, 0.05])
    # Cleanse material: padded and mixed-case statuses, null tokens for countries, a few bad emails.
    padded = rng.random(rows) < 0.05
    status = np.where(padded, np.char.add("  ", np.char.upper(status)), status)
    country = rng.choice(COUNTRIES, rows)
    country = np.where(rng.random(rows) < 0.01, rng.choice(["N/A", "-", ""], rows), country)
    email = np.char.add(np.char.add("customer", customers.astype(str)), "@example.com")
    email = np.where(rng.random(rows) < 0.001, "not an email", email)
    return pa.table(
        {
            "order_id": _with_bad(pa.array(ids), rng, ["n.a.", "12x", "#REF!"]),
            "customer_id": _with_bad(pa.array(customers), rng, ["unknown", "4.5"]),
            "quantity": _with_bad(pa.array(rng.integers(1, 20, rows)), rng, ["many", "-"]),
            "unit_price": _with_bad(pa.array(np.round(rng.uniform(1, 500, rows), 2)), rng, ["1,5", "$3"]),
            "discount": pa.array(np.round(rng.uniform(0, 0.3, rows), 3)).cast(pa.string()),
            "ordered_at": _with_bad(pa.array(ordered), rng, ["yesterday", "2024-13-45 99:00:00"]),
            "shipped_at": pc.cast(pa.array(shipped), pa.string()),
            "status": pa.array(status, pa.string()),
            "country": pa.array(country, pa.string()),
            "email": pa.array(email, pa.string()),
        }
    )


def generate_csv(path: Path, rows: int, seed: int = 7) -> None:
    rng = np.random.default_rng(seed)
    writer = None
    written = 0
    try:
        while written < rows:
            chunk = generate_chunk(rng, written + 1, min(CHUNK_ROWS, rows - written))
            if writer is None:
                writer = pa_csv.CSVWriter(str(path), chunk.schema)
            writer.write_table(chunk)
            written += chunk.num_rows
            print(f"\rgenerating {path.name}: {written:,}/{rows:,} rows", end="", file=sys.stderr)
    finally:
        if writer is not None:
            writer.close()
    print(f" ({path.stat().st_size / 2**20:.0f} MB)", file=sys.stderr)


def write_spec(directory: Path, csv_path: Path, url: str) -> Path:
    spec = {
        "name": TABLE,
        "source": {"format": "csv", "path": csv_path.name},
        "transforms": [
            {
                "cast": {
                    "order_id": "int64",
                    "customer_id": "int64",
                    "quantity": "int32",
                    "unit_price": "float64",
                    "discount": "float64",
                    "ordered_at": "timestamp[us]",
                    "shipped_at": "timestamp[us]",
                }
            },
            {"cleanse": {"trim": True, "case": "lower", "null_tokens": ["N/A", "-", ""]}},
            {"filter": {"field": "status", "op": "ne", "value": "cancelled"}},
            {"dedupe": {"keys": ["order_id"]}},
        ],
        "rules": [
            {
                "name": "status_known",
                "condition": {"field": "status", "op": "in", "value": STATUSES},
                "blocking": True,
            },
            {
                "name": "unit_price_range",
                "condition": {"field": "unit_price", "op": "between", "value": [0, 1000]},
                "blocking": True,
            },
            {
                "name": "email_shape",
                "condition": {"field": "email", "op": "matches", "value": r"^[^@\s]+@[^@\s]+\.[a-z]+$"},
                "severity": "warn",
                "mostly": 0.99,
            },
        ],
        "contract": {"columns": {"order_id": {"required": True, "unique": True}}},
        "target": {"kind": "sql", "url": url, "table": TABLE},
        "load": {"mode": "replace"},
    }
    path = directory / f"{TABLE}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# --- timing hooks -------------------------------------------------------------------------------------


@dataclass
class Timing:
    seconds: float = 0.0
    rows_in: int = 0
    cpu_seconds: float = (
        0.0  # this process's CPU in the stage's thread: steadier than wall time on a busy machine
    )


@contextmanager
def timed(timing: Timing, rows_in: int = 0) -> Iterator[None]:
    started, cpu_started = time.perf_counter(), time.thread_time()
    try:
        yield
    finally:
        timing.seconds += time.perf_counter() - started
        timing.cpu_seconds += time.thread_time() - cpu_started
        timing.rows_in += rows_in


class TimedSource(Source):
    """The pipeline's own source; only the time spent producing its batches is added up."""

    def __init__(self, inner: Source, timing: Timing):
        self.inner, self.timing = inner, timing

    @property
    def description(self) -> str:
        return self.inner.description

    def identity(self) -> InputIdentity:
        return self.inner.identity()

    def read(self, quarantine: Quarantine) -> Iterator[Batch]:
        batches = self.inner.read(quarantine)
        while True:
            with timed(self.timing):
                batch = next(batches, None)
            if batch is None:
                return
            self.timing.rows_in += batch.num_rows
            yield batch


class TimedStep(Step):
    """One of the spec's transform steps, timed around `apply` and `finish`."""

    def __init__(self, inner: Step, timing: Timing):
        super().__init__(inner.name)
        self.inner, self.timing = inner, timing

    def apply(self, batch: Batch, quarantine: Quarantine, counts: RowCounts) -> Batch:
        with timed(self.timing, batch.num_rows):
            return self.inner.apply(batch, quarantine, counts)

    def finish(self, quarantine: Quarantine, counts: RowCounts) -> list[Batch]:
        with timed(self.timing):
            return self.inner.finish(quarantine, counts)


class TimedStagingStream(StagingStream):
    """The target's staging stream; its COPY is timed from the first batch to the commit."""

    def __init__(self, target: SqlTarget, load_id: str, timing: Timing):
        super().__init__(target, load_id)
        self.timing = timing

    def _copy(self) -> None:
        cpu_started = time.thread_time()
        super()._copy()
        self.timing.seconds += self.seconds
        self.timing.cpu_seconds += time.thread_time() - cpu_started
        self.timing.rows_in += self.rows


class TimedTarget(SqlTarget):
    """The pipeline's SQL target, timing its staging (streamed, or `stage` when the stream gave up) and
    `write_quarantine`."""

    def __init__(self, spec: SqlTargetSpec, timings: dict[str, Timing]):
        super().__init__(spec)
        self.timings = timings

    def stage_stream(self, load_id: str) -> StagingStream | None:
        return TimedStagingStream(self, load_id, self.timings.setdefault("stage (COPY)", Timing()))

    def stage(self, table: pa.Table, load_id: str) -> None:
        with timed(self.timings.setdefault("stage (COPY)", Timing()), table.num_rows):
            super().stage(table, load_id)

    def write_quarantine(self, quarantine: Quarantine, load_id: str, run_id: str) -> None:
        with timed(self.timings.setdefault("quarantine", Timing()), len(quarantine)):
            super().write_quarantine(quarantine, load_id, run_id)


clean_tables: dict[str, pa.Table] = {}


@contextmanager
def timed_pipeline(timings: dict[str, Timing]) -> Iterator[None]:
    """Wrap the source `factory.stage` opens and the steps `runner.iter_pipeline` builds."""
    open_source, build_steps, validate = factory.open_source, runner.build_steps, factory.validate

    def timed_source(*args, **kwargs) -> Source:
        return TimedSource(open_source(*args, **kwargs), timings.setdefault("read (FileSource)", Timing()))

    def timed_steps(*args, **kwargs) -> list[Step]:
        steps = build_steps(*args, **kwargs)
        return [TimedStep(step, timings.setdefault(step.name.rpartition(".")[2], Timing())) for step in steps]

    def timed_validate(table: pa.Table, *args, **kwargs):
        clean_tables["clean"] = table  # the staged rows: dlt loads the same table
        with timed(timings.setdefault("validate (GX)", Timing()), table.num_rows):
            return validate(table, *args, **kwargs)

    with (
        mock.patch.object(factory, "open_source", timed_source),
        mock.patch.object(runner, "build_steps", timed_steps),
        mock.patch.object(factory, "validate", timed_validate),
    ):
        yield


# --- the runs -----------------------------------------------------------------------------------------


def run_junction(spec_path: Path, url: str) -> dict:
    pipeline = load_pipelines([spec_path])[TABLE]
    timings: dict[str, Timing] = {}
    log = logging.getLogger("benchmarks.etl")  # what the asset logs, on stderr
    log.setLevel(logging.INFO)
    log.addHandler(logging.StreamHandler(sys.stderr))
    load_average = os.getloadavg()[0]
    started = time.perf_counter()
    target = TimedTarget(SqlTargetSpec(kind="sql", url=url, table=TABLE), timings)
    try:
        with timed_pipeline(timings):
            metadata, outcomes = factory.stage(pipeline, target, uuid.uuid4().hex, log)
        blocking = [o.check.name for o in outcomes if not o.passed and o.check.blocking]
        if blocking:
            raise SystemExit(f"blocking checks failed, nothing published: {', '.join(blocking)}")
        with timed(timings.setdefault("publish (swap)", Timing())):
            outcome = target.publish(pipeline.spec.load.mode, pipeline.spec.load.keys)
        timings["publish (swap)"].rows_in = outcome.rows_published
    finally:
        target.dispose()
    total = time.perf_counter() - started
    clean = clean_tables["clean"]
    # The staging COPY runs from the first clean batch on, beside reading and transforming, then (with
    # the quarantine) in a thread beside the validation: the overlap is the summed stage times less
    # their wall time after the read, shown as a negative line so the table adds up.
    side_by_side = sum(timings[name].seconds for name in ("stage (COPY)", "quarantine", "validate (GX)"))
    stage_and_validate = metadata["seconds_stage_and_validate"]
    overlap = side_by_side - stage_and_validate
    accounted = sum(timing.seconds for timing in timings.values()) - overlap
    return {
        "timings": timings,
        "overlap_s": overlap,
        "load_average": load_average,
        "stage_and_validate_s": stage_and_validate,
        "unaccounted_s": total - accounted,
        "total_s": total,
        "metadata": metadata,
        "checks": outcomes,
        "clean": clean,
        "rows_published": outcome.rows_published,
    }


def run_junction_load(table: pa.Table, url: str) -> float:
    """Seconds for Junction's load alone (`SqlTarget.stage` + `publish` by swap) of an in-memory Arrow
    table: the same input dlt gets, into a table of its own."""
    target = SqlTarget(SqlTargetSpec(kind="sql", url=url, table=f"{TABLE}_same_input"), uuid.uuid4().hex)
    try:
        started = time.perf_counter()
        target.stage(table, uuid.uuid4().hex)
        outcome = target.publish("replace", [])
        seconds = time.perf_counter() - started
    finally:
        target.dispose()
    if outcome.rows_published != table.num_rows:
        raise SystemExit(f"junction loaded {outcome.rows_published:,} rows, expected {table.num_rows:,}")
    return seconds


def run_dlt(table: pa.Table, url: str, pipelines_dir: Path) -> dict:
    import dlt
    import sqlalchemy as sa

    # dlt insists on a password; with trust authentication the server ignores it.
    parsed = sa.engine.make_url(url)
    credentials = parsed.set(password=parsed.password or "unused").render_as_string(hide_password=False)

    # The fastest PostgreSQL setting: uncompressed CSV files, loaded by COPY.
    os.environ["NORMALIZE__DATA_WRITER__DISABLE_COMPRESSION"] = "true"
    os.environ["DATA_WRITER__DISABLE_COMPRESSION"] = "true"
    os.environ["RUNTIME__DLTHUB_TELEMETRY"] = "false"
    pipeline = dlt.pipeline(
        pipeline_name="junction_bench_etl",
        destination=dlt.destinations.postgres(credentials=credentials),
        dataset_name=DLT_DATASET,
        pipelines_dir=str(pipelines_dir),
    )
    started = time.perf_counter()
    info = pipeline.run(table, table_name=TABLE, write_disposition="replace", loader_file_format="csv")
    total = time.perf_counter() - started
    formats = {
        job.job_file_info.file_format
        for package in info.load_packages
        for job in package.jobs["completed_jobs"]
        if job.job_file_info.table_name == TABLE
    }
    if formats != {"csv"}:
        raise SystemExit(f"dlt loaded {TABLE} from {formats or 'no'} files, not csv")
    steps = {
        step.step: (step.finished_at - step.started_at).total_seconds()
        for step in pipeline.last_trace.steps
        if step.finished_at is not None
    }
    with pipeline.sql_client() as client:
        loaded = client.execute_sql(f"SELECT COUNT(*) FROM {client.make_qualified_table_name(TABLE)}")[0][0]
    if loaded != table.num_rows:
        raise SystemExit(f"dlt loaded {loaded:,} rows, expected {table.num_rows:,}")
    return {"total_s": total, "steps": steps, "rows": loaded}


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rate(rows: int, seconds: float) -> float:
    return rows / seconds if seconds > 0 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows to generate (default 1,000,000)")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"PostgreSQL URL (default {DEFAULT_URL})")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args()

    # Imported before anything is timed: a run's process pays these once, not per row.
    import dlt  # noqa: F401
    import great_expectations  # noqa: F401

    ensure_database(args.url)
    with tempfile.TemporaryDirectory(prefix="junction-bench-etl-") as tmp:
        directory = Path(tmp)
        csv_path = directory / "orders.csv"
        generate_csv(csv_path, args.rows)
        spec_path = write_spec(directory, csv_path, args.url)
        rss_before_mb = psutil.Process().memory_info().rss / 2**20

        print("junction: read -> transform -> stage -> validate -> publish ...", file=sys.stderr)
        junction = run_junction(spec_path, args.url)
        junction_peak_mb = max_rss_mb()

        print("dlt: the same clean table into the same database ...", file=sys.stderr)
        clean = junction["clean"]
        dlt_run = run_dlt(clean, args.url, directory / "dlt")
        print("junction: the load alone, of the same clean table ...", file=sys.stderr)
        same_input_s = run_junction_load(clean, args.url)
        overall_peak_mb = max_rss_mb()

    timings: dict[str, Timing] = junction["timings"]
    metadata = junction["metadata"]
    rows_read = metadata["rows_read"]
    clean_rows = clean.num_rows
    order = [
        "read (FileSource)",
        *STEP_NAMES,
        "stage (COPY)",
        "quarantine",
        "validate (GX)",
        "publish (swap)",
    ]
    load_before, load_after = junction["load_average"], os.getloadavg()[0]
    print(f"\n{'stage':<30} {'rows in':>10} {'seconds':>8} {'rows/s':>12} {'cpu s':>8}")
    for name in order:
        timing = timings[name]
        print(
            f"{name:<30} {timing.rows_in:>10,} {timing.seconds:>8.3f} {rate(timing.rows_in, timing.seconds):>12,.0f}"
            f" {timing.cpu_seconds:>8.3f}"
        )
    print(f"{'(overlap: stage beside the rest)':<30} {'':>10} {-junction['overlap_s']:>8.3f}")
    print(f"{'(concat, runner, metadata)':<30} {'':>10} {junction['unaccounted_s']:>8.3f}")
    print(
        f"{'junction end to end':<30} {rows_read:>10,} {junction['total_s']:>8.3f} {rate(rows_read, junction['total_s']):>12,.0f}"
    )

    junction_load_s = timings["stage (COPY)"].seconds + timings["publish (swap)"].seconds
    junction_load_rate = rate(clean_rows, junction_load_s)
    dlt_rate = rate(dlt_run["rows"], dlt_run["total_s"])
    dlt_load_step_s = dlt_run["steps"].get("load", 0.0)
    ratio = junction_load_rate / dlt_rate if dlt_rate else 0.0
    dlt_load_step_rate = rate(dlt_run["rows"], dlt_load_step_s)
    ratio_load_step = junction_load_rate / dlt_load_step_rate if dlt_load_step_rate else 0.0
    same_input_rate = rate(clean_rows, same_input_s)
    ratio_same = same_input_rate / dlt_rate if dlt_rate else 0.0
    ratio_load_step_same = same_input_rate / dlt_load_step_rate if dlt_load_step_rate else 0.0
    print(f"\n{'load of the clean table':<30} {'rows':>10} {'seconds':>8} {'rows/s':>12}")
    print(
        f"{'junction stage + publish':<30} {clean_rows:>10,} {junction_load_s:>8.3f} {junction_load_rate:>12,.0f}"
    )
    print(
        f"{'  same Arrow table as dlt':<30} {clean_rows:>10,} {same_input_s:>8.3f} {same_input_rate:>12,.0f}"
    )
    print(f"{'dlt run (csv, COPY)':<30} {dlt_run['rows']:>10,} {dlt_run['total_s']:>8.3f} {dlt_rate:>12,.0f}")
    for step in ("extract", "normalize", "load"):
        if step in dlt_run["steps"]:
            print(f"{'  dlt ' + step:<30} {'':>10} {dlt_run['steps'][step]:>8.3f}")
    print(f"\nratio_vs_dlt (junction load rows/s / dlt run rows/s): {ratio:.2f}x")
    print(f"ratio_vs_dlt_load_step (junction load rows/s / dlt load step rows/s): {ratio_load_step:.2f}x")
    print(
        f"same input (junction's load of dlt's Arrow table): {ratio_same:.2f}x dlt's run, "
        f"{ratio_load_step_same:.2f}x dlt's load step"
    )
    checks = junction["checks"]
    print(
        f"rows: {rows_read:,} read, {metadata['rows_filtered']:,} filtered, "
        f"{metadata['rows_quarantined']:,} quarantined, {clean_rows:,} published; checks: {sum(o.passed for o in checks)}/{len(checks)} "
        f"passed; peak RSS (getrusage ru_maxrss): {junction_peak_mb:,.0f} MB after junction "
        f"(RSS {rss_before_mb:,.0f} MB before it), {overall_peak_mb:,.0f} MB after dlt"
    )
    print(
        f"machine: {os.cpu_count()} CPUs, 1-minute load average {load_before:.1f} at the start of the "
        f"junction run, {load_after:.1f} at the end (cpu s: this process's CPU time in the stage's thread)"
    )

    if args.json:
        figures = {
            "rows_generated": args.rows,
            "rows_read": rows_read,
            "rows_published": junction["rows_published"],
            "rows_filtered": metadata["rows_filtered"],
            "rows_quarantined": metadata["rows_quarantined"],
            "checks_passed": sum(o.passed for o in checks),
            "checks_total": len(checks),
            **{
                f"{name.split(' ')[0]}_rows_per_s": round(
                    rate(timings[name].rows_in, timings[name].seconds), 1
                )
                for name in order
            },
            **{f"{name.split(' ')[0]}_s": round(timings[name].seconds, 3) for name in order},
            **{f"{name.split(' ')[0]}_cpu_s": round(timings[name].cpu_seconds, 3) for name in order},
            "load_average_1min_before": round(load_before, 2),
            "load_average_1min_after": round(load_after, 2),
            "stage_and_validate_wall_s": round(junction["stage_and_validate_s"], 3),
            "overlap_stage_validate_s": round(junction["overlap_s"], 3),
            "unaccounted_s": round(junction["unaccounted_s"], 3),
            "end_to_end_s": round(junction["total_s"], 3),
            "end_to_end_rows_per_s": round(rate(rows_read, junction["total_s"]), 1),
            "junction_load_s": round(junction_load_s, 3),
            "junction_load_rows_per_s": round(junction_load_rate, 1),
            "dlt_run_s": round(dlt_run["total_s"], 3),
            "dlt_load_step_s": round(dlt_load_step_s, 3),
            "dlt_rows_per_s": round(dlt_rate, 1),
            "dlt_load_step_rows_per_s": round(dlt_load_step_rate, 1),
            "ratio_vs_dlt_x": round(ratio, 3),
            "ratio_vs_dlt_load_step_x": round(ratio_load_step, 3),
            "junction_load_same_input_s": round(same_input_s, 3),
            "junction_load_same_input_rows_per_s": round(same_input_rate, 1),
            "ratio_vs_dlt_same_input_x": round(ratio_same, 3),
            "ratio_vs_dlt_load_step_same_input_x": round(ratio_load_step_same, 3),
            "rss_before_junction_mb": round(rss_before_mb, 1),
            "peak_rss_junction_mb": round(junction_peak_mb, 1),
            "peak_rss_overall_mb": round(overall_peak_mb, 1),
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
