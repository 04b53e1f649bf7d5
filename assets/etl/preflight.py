"""Checks of a valid spec against the machine it will run on: what `junction pipelines validate`
adds to the spec's own validation, so that a run does not start only to fail on its first line.

- A file source (or enrich lookup) whose path or glob matches no file: a **warning**, since files may
  arrive later (an error with `--strict`).
- A file source in a Python package that is not installed: an error.
- A SQL source, lookup or target URL whose SQLAlchemy dialect, or that dialect's driver, is not
  installed (`mysqlx://…`, `mysql://` without mysqlclient): an error naming what to install. A URL
  in an environment variable (`url_env`) is checked when the variable is set, else warned about.

The source's own opening code does the matching (`FileSource.files`), so the check and the run
cannot disagree about which files a glob names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from assets.etl.sources import FileSource
from assets.etl.spec import FileSourceSpec, LoadedPipeline, SqlSourceSpec, SqlTargetSpec
from orchestration.errors import JunctionError
from orchestration.kernel.spec_errors import SpecProblem


@dataclass(frozen=True)
class Preflight:
    errors: list[SpecProblem]
    warnings: list[SpecProblem]


def check_pipeline(pipeline: LoadedPipeline) -> Preflight:
    """Every problem the run would meet before reading a record, as errors and warnings."""
    errors: list[SpecProblem] = []
    warnings: list[SpecProblem] = []
    file = str(pipeline.file)
    spec = pipeline.spec
    places: list[tuple[str, object]] = [("source", spec.source)]
    places += [
        (f"transforms[{index}].enrich.lookup", step.enrich.lookup)
        for index, step in enumerate(spec.transforms)
        if step.enrich is not None
    ]
    for location, source in places:
        if isinstance(source, FileSourceSpec):
            problem = _file_problem(source, pipeline.base_dir)
            if problem is not None:
                is_error, reason = problem
                (errors if is_error else warnings).append(SpecProblem(f"{location}.path", reason, file))
        elif isinstance(source, SqlSourceSpec):
            _url_problems(location, source.url, source.url_env, file, errors, warnings)
    if isinstance(spec.target, SqlTargetSpec):
        _url_problems("target", spec.target.url, spec.target.url_env, file, errors, warnings)
    return Preflight(errors, warnings)


def _file_problem(spec: FileSourceSpec, base_dir: Path) -> tuple[bool, str] | None:
    """(is an error, reason), or None when the path names at least one file."""
    from orchestration.errors import ConfigurationError

    try:
        FileSource(spec, base_dir, batch_size=1).files()
    except ConfigurationError as exc:  # the package is not installed
        return True, str(exc)
    except JunctionError as exc:
        return False, f"{exc} (yet: a run now would fail)"
    return None


def _url_problems(
    location: str,
    url: str | None,
    url_env: str | None,
    file: str,
    errors: list[SpecProblem],
    warnings: list[SpecProblem],
) -> None:
    if url is None:
        url = os.environ.get(url_env or "")
        if not url:
            warnings.append(
                SpecProblem(f"{location}.url_env", f"environment variable {url_env} is not set here", file)
            )
            return
        location = f"{location}.url_env"
    else:
        location = f"{location}.url"
    reason = sqlalchemy_url_problem(url)
    if reason is not None:
        errors.append(SpecProblem(location, reason, file))


def sqlalchemy_url_problem(url: str) -> str | None:
    """Why SQLAlchemy could not connect with `url` on this machine (bad URL, no such dialect, its
    driver missing), or None. Loads the dialect and imports its driver; connects to nothing."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError:
        return "not a SQLAlchemy URL (dialect+driver://user@host/database)"
    try:
        dialect = parsed.get_dialect()
    except sa.exc.NoSuchModuleError:
        return (
            f"no SQLAlchemy dialect {parsed.drivername!r} is installed "
            f"(installed here: {', '.join(installed_dialects())})"
        )
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        return (
            f"the driver of {parsed.drivername!r} is not installed ({exc.name or exc}): install the "
            "DBAPI package SQLAlchemy's dialect documentation names for it"
        )
    return None


def installed_dialects() -> list[str]:
    """The dialects SQLAlchemy ships whose default driver imports here."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    found = []
    for name in ("postgresql", "sqlite", "mysql", "mssql", "oracle"):
        try:
            make_url(f"{name}://").get_dialect().import_dbapi()
        except (ImportError, sa.exc.NoSuchModuleError):
            continue
        found.append(name)
    return found
