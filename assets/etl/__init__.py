"""Junction's ETL library: specs, sources, vectorised transforms, quarantine, runner, checks, loads, assets.

The same building blocks serve YAML specs (`assets/pipelines/*.yaml`) and analysts' Python assets.
Every module here is imported when the code location loads (`load_definitions_from_package_module`
walks `assets/`), so none of them defines Dagster objects at module level or imports pandas or Great
Expectations outside a function; pyarrow and pydantic are cheap enough to import eagerly.

- `spec`: the pydantic model of a pipeline spec and its loader (`load_pipelines`).
- `sources`: file sources (CSV, JSON, JSON Lines, XML, Parquet), the SQL source and other pipelines'
  published assets, all behind `Source`.
- `transforms`: select/rename/map/cast/cleanse/derive/filter/dedupe/enrich/aggregate/python steps over Arrow.
- `quarantine`: rejected records with their source position, and the per-run row counts.
- `runner`: source + transforms -> clean Arrow tables, quarantine and counts (`run_pipeline`).
- `checks`: rules and contract as Great Expectations expectations (kernel/schema where GX cannot),
  validated once per run over the staged rows; quality score and markdown summary.
- `drift`: the contract's schema drift policy against the target's current schema (a transform step).
- `loads`: staging and publishing into PostgreSQL/SQLite tables (COPY, executemany) and Parquet/CSV
  files: replace by swap, append by load id, merge by key; quarantine next to the target.
- `factory`: `pipeline_definitions` turns every spec into a staged asset (with check specs), a published
  asset, a job and a schedule; merged in `orchestration/definitions.py`.
- `report`: the quality report of a run, built from what Dagster recorded (metadata, check
  evaluations); text, JSON and a self-contained HTML page (Jinja2 and pygal, imported when drawing).
"""

from __future__ import annotations

import importlib
from typing import Any

# The analysts' API: one name for each thing a plain `@asset` does (see `assets/analyst_example.py`).
# Resolved on first use (PEP 562), so importing one submodule - the CLI's `spec` - stays cheap.
_EXPORTS = {
    # describe: the same pydantic models as a YAML spec
    "PipelineSpec": "spec",
    "FileSourceSpec": "spec",
    "SqlSourceSpec": "spec",
    "FileTargetSpec": "spec",
    "SqlTargetSpec": "spec",
    # read + transform (+ the target's drift policy): clean Arrow rows, quarantine, counts
    "run_pipeline": "runner",
    "ArrowTableSource": "runner",
    # rules and contract as checks, validated once over the rows
    "quality_checks": "checks",
    "validate": "checks",
    "summary_markdown": "checks",
    "asset_check_specs": "factory",
    "asset_check_results": "factory",
    # load: stage, store the quarantine, publish
    "open_target": "loads",
    "load_result": "runner",
    "target_base_dir": "factory",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
