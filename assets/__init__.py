"""Analysts' Python assets. Any module added in this package is loaded by `orchestration.definitions`
without touching it; YAML pipeline specs live in `pipelines/`."""
