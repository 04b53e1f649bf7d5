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

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from assets.etl.drift import SchemaDrift, SchemaDriftStep
from assets.etl.loads import PublishOutcome, Target, load_steps
from assets.etl.quarantine import Batch, Quarantine, RowCounts
from assets.etl.sources import READ_STEP, ArrowTableSource, InputIdentity, Source, open_source
from assets.etl.spec import LoadedPipeline, PipelineSpec
from assets.etl.transforms import Step, build_steps
from orchestration.errors import JunctionError

__all__ = [
    "ArrowTableSource",
    "PipelineResult",
    "iter_pipeline",
    "load_result",
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


def iter_pipeline(
    spec: PipelineSpec,
    source: Source,
    quarantine: Quarantine,
    counts: RowCounts,
    after: Sequence[Step] = (),
) -> Iterator[pa.Table]:
    """Stream the clean tables; `quarantine` and `counts` fill as it goes (counts are final at the end).

    `after`: steps run after the spec's transforms (the load's: drift policy, merge-key dedupe).
    """
    steps = [*build_steps(spec.transforms), *after]
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


def run_pipeline(
    pipeline: LoadedPipeline | PipelineSpec,
    *,
    base_dir: Path | None = None,
    source: Source | None = None,
    target: Target | None = None,
) -> PipelineResult:
    """Read, transform and collect. Relative file paths resolve against the spec's folder (`base_dir`).

    With a `target`, the load's steps run too: the contract's drift policy against the target's
    current schema (`result.drift`) and, for a merge, one row per key (the last).
    """
    if isinstance(pipeline, LoadedPipeline):
        spec, base_dir = pipeline.spec, base_dir or pipeline.base_dir
    else:
        spec = pipeline
    if source is None:
        source = open_source(spec.source, base_dir or Path.cwd(), spec.batch_size)
    identity = source.identity()
    quarantine, counts = Quarantine(), RowCounts()
    after = [] if target is None else load_steps(target, spec.contract.drift, spec.load.mode, spec.load.keys)
    started = time.perf_counter()
    tables = list(iter_pipeline(spec, source, quarantine, counts, after))
    elapsed = time.perf_counter() - started
    drift = next((step.drift for step in after if isinstance(step, SchemaDriftStep)), None)
    schema = target.current_schema() if target is not None and not tables else None
    return PipelineResult(
        tables, quarantine, counts, identity, {"read_and_transform": elapsed}, drift, schema
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
