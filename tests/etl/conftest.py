"""Fixtures of the ETL tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def pipelines_dir(junction_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty JUNCTION_PIPELINES_DIR of the test's own (specs and their inputs go here)."""
    from orchestration.settings import reset_settings_cache

    folder = tmp_path / "pipelines"
    folder.mkdir()
    monkeypatch.setenv("JUNCTION_PIPELINES_DIR", str(folder))
    reset_settings_cache()
    return folder
