"""Junction's ETL library: pipeline specs, sources, vectorised transforms, quarantine and the runner.

The same building blocks serve YAML specs (`assets/pipelines/*.yaml`) and analysts' Python assets.
Every module here is imported when the code location loads (`load_definitions_from_package_module`
walks `assets/`), so none of them defines Dagster objects at module level or imports pandas or Great
Expectations outside a function; pyarrow and pydantic are cheap enough to import eagerly.

- `spec`: the pydantic model of a pipeline spec and its loader (`load_pipelines`).
- `sources`: file sources (CSV, JSON, JSON Lines, XML, Parquet) and the SQL source, all behind `Source`.
- `transforms`: select/rename/map/cast/cleanse/derive/filter/dedupe/python steps over Arrow.
- `quarantine`: rejected records with their source position, and the per-run row counts.
- `runner`: source + transforms -> clean Arrow tables, quarantine and counts (`run_pipeline`).
"""
