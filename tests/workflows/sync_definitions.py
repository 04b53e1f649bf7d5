"""A code location for the Sync and compensation tests: the workflows and pipelines of the folders the
settings name (`JUNCTION_WORKFLOWS_DIR`, `JUNCTION_PIPELINES_DIR`), read on every load."""

from __future__ import annotations

import dagster as dg


def definitions() -> dg.Definitions:
    from assets.etl.factory import pipeline_definitions
    from orchestration.settings import get_settings
    from orchestration.workflows.factory import workflow_definitions

    settings = get_settings()
    return dg.Definitions.merge(
        workflow_definitions(settings.workflows_dir), pipeline_definitions(settings.pipelines_dir)
    )
