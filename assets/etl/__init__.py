"""Junction's ETL library: specs, sources, vectorised transforms, quarantine, runner, checks, loads, assets.

The same building blocks serve YAML specs (`assets/pipelines/*.yaml`) and analysts' Python assets.
Every module here is imported when the code location loads (`load_definitions_from_package_module`
walks `assets/`), so none of them defines Dagster objects at module level or imports pandas or Great
Expectations outside a function; pyarrow and pydantic are cheap enough to import eagerly.

- `spec`: the pydantic model of a pipeline spec and its loader (`load_pipelines`).
- `sources`: file sources (CSV, JSON, JSON Lines, XML, Parquet) and the SQL source, all behind `Source`.
- `transforms`: select/rename/map/cast/cleanse/derive/filter/dedupe/python steps over Arrow.
- `quarantine`: rejected records with their source position, and the per-run row counts.
- `runner`: source + transforms -> clean Arrow tables, quarantine and counts (`run_pipeline`).
- `checks`: rules and contract as Great Expectations expectations (kernel/schema where GX cannot),
  validated once per run over the staged rows; quality score and markdown summary.
- `loads`: staging and publishing into PostgreSQL/SQLite tables (COPY, executemany) and Parquet/CSV
  files: replace by swap, append by load id, merge by key; quarantine next to the target.
- `factory`: `pipeline_definitions` turns every spec into a staged asset (with check specs), a published
  asset, a job and a schedule; merged in `orchestration/definitions.py`.
- `report`: the quality report of a run, built from what Dagster recorded (metadata, check
  evaluations); text, JSON and a self-contained HTML page (Jinja2 and pygal, imported when drawing).
"""
