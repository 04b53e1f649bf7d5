"""The runner: a spec's source through its transforms, giving clean Arrow tables, quarantine and counts.

This is what the asset factory's staged asset calls (next slice), and what an analyst calls from a
plain `@asset`, with a `PipelineSpec` built in Python and, if the data is already in hand, any
`Source` such as `ArrowTableSource`::

    spec = PipelineSpec.model_validate({
        "source": {"format": "jsonl", "path": "/data/events/*.jsonl"},
        "transforms": [{"cast": {"amount": "decimal(12,2)"}}, {"filter": {"field": "amount", "op": "gt", "value": 0}}],
    })
    result = run_pipeline(spec)
    result.to_table(), result.quarantine.to_table(), result.counts.as_metadata()

Batches stream: each batch read goes through every step before the next is read, so memory is bounded
by the batch size, except for the steps that document holding data (``dedupe`` with ``keep: last``).
At the end the steps release what they held (`Step.finish`), in order, through the steps after them,
and `RowCounts.check` proves ``read == loaded + filtered + quarantined``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from assets.etl.drift import SchemaDrift, SchemaDriftStep
from assets.etl.loads import PublishOutcome, StagingStream, Target, load_steps
from assets.etl.quarantine import Batch, Quarantine, RowCounts
from assets.etl.sources import READ_STEP, ArrowTableSource, InputIdentity, Source, open_source
from assets.etl.spec import LoadedPipeline, PipelineSpec
from assets.etl.state import IncrementalStep, IncrementalWindow
from assets.etl.transforms import Step, build_steps
from orchestration.errors import JunctionError

__all__ = [
    "ArrowTableSource",
    "PipelineResult",
    "input_identity",
    "iter_pipeline",
    "load_result",
    "lookup_opener",
    "run_pipeline",
]  # ArrowTableSource re-exported


@dataclass
class PipelineResult:
    """The clean batches (in source order), what was rejected, and how every row read was accounted for."""

    tables: list[pa.Table]
    quarantine: Quarantine
    counts: RowCounts
    identity: InputIdentity
    seconds: dict[str, float] = field(default_factory=dict)
    drift: SchemaDrift | None = None  # when run against a target that already exists
    schema: pa.Schema | None = None  # of an empty result: the target's (see `to_table`)
    step_reports: dict[str, dict[str, Any]] = field(default_factory=dict)  # enrich: lookup and matches
    # With `stage_while_reading`: the target's staging stream, fed every clean table; its `finish`
    # tells whether the staging place holds them all (else stage `to_table()` as usual).
    staging: StagingStream | None = None
    # An incremental read: the window (cursor, before, start, end), the largest cursor value read
    # (`after`, what the publish commits) and the records in the window.
    incremental: dict[str, Any] | None = None

    def to_table(self) -> pa.Table:
        """Every clean row in one table; batches whose inferred types differ are promoted (int -> double)."""
        if not self.tables:
            return self.schema.empty_table() if self.schema is not None else pa.table({})
        try:
            return pa.concat_tables(self.tables, promote_options="permissive")
        except pa.ArrowException as exc:
            raise JunctionError(
                f"the batches do not fit one table (cast the field in the spec): {exc}"
            ) from None


def _run_steps(
    batch: Batch, steps: list[Step], start: int, quarantine: Quarantine, counts: RowCounts
) -> Batch | None:
    for step in steps[start:]:
        batch = step.apply(batch, quarantine, counts)
        if batch.num_rows == 0:
            return None
    return batch


def lookup_opener(
    spec: PipelineSpec, base_dir: Path, upstream: Mapping[str, LoadedPipeline] | None = None
) -> Callable[[Any], Source]:
    """How the spec's enrich steps open their lookups: like its source (same folder, same upstream)."""
    return functools.partial(open_source, base_dir=base_dir, batch_size=spec.batch_size, upstream=upstream)


def input_identity(spec: PipelineSpec, source: Source, open_lookup: Callable[[Any], Source]) -> InputIdentity:
    """The source's identity, plus each enrich lookup's: a changed lookup changes the load id too."""
    identity = source.identity()
    lookups = [step.enrich.lookup for step in spec.transforms if step.enrich is not None]
    if not lookups:
        return identity
    parts = [part for lookup in lookups for part in open_lookup(lookup).identity().parts]
    return InputIdentity(identity.kind, (*identity.parts, ("lookups",), *parts))


def iter_pipeline(
    spec: PipelineSpec,
    source: Source,
    quarantine: Quarantine,
    counts: RowCounts,
    *,
    before: Sequence[Step] = (),
    after: Sequence[Step] = (),
    open_lookup: Callable[[Any], Source] | None = None,
    step_reports: dict[str, dict[str, Any]] | None = None,
) -> Iterator[pa.Table]:
    """Stream the clean tables; `quarantine` and `counts` fill as it goes (counts are final at the end).

    `before`: steps run ahead of the spec's transforms, on the records as read (the incremental
    window). `after`: steps run after the spec's transforms (the load's: drift policy, merge-key dedupe).
    `open_lookup` opens enrich lookups (default: relative to the working directory); `step_reports`,
    when given, receives what steps report about themselves at the end (enrich: lookup and matches).
    """
    steps = [
        *before,
        *build_steps(spec.transforms, open_lookup=open_lookup or lookup_opener(spec, Path.cwd())),
        *after,
    ]
    for batch in source.read(quarantine):
        counts.read += batch.num_rows
        out = _run_steps(batch, steps, 0, quarantine, counts)
        if out is not None:
            counts.loaded += out.num_rows
            yield out.table
    for index, step in enumerate(steps):
        for held in step.finish(quarantine, counts):
            out = _run_steps(held, steps, index + 1, quarantine, counts)
            if out is not None:
                counts.loaded += out.num_rows
                yield out.table
    # Malformed records were read too: they count on both sides of the invariant.
    by_step = quarantine.count_by_step()
    counts.read += by_step.get(READ_STEP, 0)
    counts.quarantined = by_step
    counts.check()
    if counts.read == 0 and not spec.source.allow_empty:
        problem = source.empty_input_problem()
        if problem:
            raise JunctionError(
                f"read no records from {source.description}: {problem} "
                "(set source.allow_empty: true if an empty read is expected)"
            )
    if step_reports is not None:
        step_reports.update({step.name: report for step in steps if (report := step.report()) is not None})


def run_pipeline(
    pipeline: LoadedPipeline | PipelineSpec,
    *,
    base_dir: Path | None = None,
    source: Source | None = None,
    target: Target | None = None,
    stage_while_reading: bool = False,
    window: IncrementalWindow | None = None,
) -> PipelineResult:
    """Read, transform and collect. Relative file paths resolve against the spec's folder (`base_dir`).

    With a `target`, the load's steps run too: the contract's drift policy against the target's
    current schema (`result.drift`) and, for a merge, one row per key (the last). With
    `stage_while_reading` too, each clean table also goes to the target's staging stream as it is
    produced (`result.staging`, when the target has one); a failed run rolls that stream back.
    With an incremental `window` (`state.IncrementalWindow`), only its records are kept, and
    `result.incremental` tells the largest cursor value read.
    """
    upstream: Mapping[str, LoadedPipeline] | None = None
    if isinstance(pipeline, LoadedPipeline):
        spec, base_dir, upstream = pipeline.spec, base_dir or pipeline.base_dir, pipeline.upstream
    else:
        spec = pipeline
    base_dir = base_dir or Path.cwd()
    if source is None:
        source = open_source(spec.source, base_dir, spec.batch_size, upstream, window)
    before = [] if window is None else [IncrementalStep(window)]
    open_lookup = lookup_opener(spec, base_dir, upstream)
    identity = input_identity(spec, source, open_lookup)
    quarantine, counts = Quarantine(), RowCounts()
    after = (
        []
        if target is None
        else load_steps(target, spec.contract.drift, spec.load.mode, spec.load.keys, spec.load.deletes)
    )
    staging = target.stage_stream(identity.load_id) if target is not None and stage_while_reading else None
    started = time.perf_counter()
    step_reports: dict[str, dict[str, Any]] = {}
    tables = []
    try:
        for table in iter_pipeline(
            spec,
            source,
            quarantine,
            counts,
            before=before,
            after=after,
            open_lookup=open_lookup,
            step_reports=step_reports,
        ):
            tables.append(table)
            if staging is not None:
                staging.put(table)
    except BaseException:
        if staging is not None:
            staging.abort()
        raise
    elapsed = time.perf_counter() - started
    drift = next((step.drift for step in after if isinstance(step, SchemaDriftStep)), None)
    schema = target.current_schema() if target is not None and not tables else None
    return PipelineResult(
        tables,
        quarantine,
        counts,
        identity,
        {"read_and_transform": elapsed},
        drift,
        schema,
        step_reports,
        staging,
        before[0].summary() if before else None,
    )


def load_result(
    result: PipelineResult,
    target: Target,
    *,
    mode: str = "append",
    keys: list[str] | None = None,
    run_id: str,
    table: pa.Table | None = None,
) -> PublishOutcome:
    """Stage the result's rows (or `table`, made from them), store its quarantine next to the target
    and publish, in that order; the load id is the input's, so re-running an append adds nothing.

    For a plain `@asset` that checks the rows itself before loading; the pipeline assets split the
    same calls over a staged and a published asset so that blocking checks sit between them.
    """
    load_id = result.identity.load_id
    target.stage(result.to_table() if table is None else table, load_id)
    target.write_quarantine(result.quarantine, load_id, run_id)
    return target.publish(mode, keys or [])
