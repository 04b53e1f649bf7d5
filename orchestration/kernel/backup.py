"""Backup and restore of the embedded default: the SQLite platform store and Dagster's SQLite storage.

The archive is a `.tar.gz`:

* `manifest.json` (first): format, created_at, junction_version, alembic_revision, whether Dagster's
  storage is included (and why not), and every file with its sha256 and size;
* `store/platform.db`: the platform store, copied online with SQLite's backup API, so the copy is
  consistent even while the platform writes;
* `dagster/storage/...`: everything under `$DAGSTER_HOME/storage` (runs.db, the per-run event logs and
  index.db under history/, schedules.db, compute logs, IO manager outputs). SQLite files are copied
  with the backup API too (that folds in their WAL); `-wal`/`-shm`/`-journal` files are left out.

Dagster's storage is only backed up while the platform is stopped: Dagster keeps many SQLite files
whose contents depend on each other (a run in runs.db, its events in <run_id>.db), so copying them
one by one while runs progress yields a set that never existed together. While we copy or restore
them we hold the platform lock ourselves, so `junction dev` cannot start halfway through.

Restore checks every checksum before it writes anything, moves the current files aside (renamed),
puts the archive's files in place, migrates the store to head, and only then deletes the files it
moved aside; on any failure it puts them back.

A PostgreSQL platform store is backed up with PostgreSQL's own tools (`pg_dump`), not here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy.engine import make_url

from orchestration import __version__
from orchestration.errors import JunctionError
from orchestration.platform_lock import hold_platform_lock, platform_running
from orchestration.settings import JunctionSettings, get_settings

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
STORE_MEMBER = "store/platform.db"
DAGSTER_PREFIX = "dagster/storage"
SQLITE_HEADER = b"SQLite format 3\x00"
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")
RUNNING_SKIP_REASON = (
    "the platform is running: Dagster's SQLite files are only consistent with each other while it is "
    "stopped (stop `junction dev` and run the backup again to include them)"
)

Progress = Callable[[str], None]


class BackupError(JunctionError):
    """A backup or restore that cannot be done as asked; nothing was changed."""


@dataclass(frozen=True)
class BackupFile:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class BackupResult:
    archive: Path
    files: tuple[BackupFile, ...]
    dagster_included: bool
    dagster_skipped_reason: str | None


@dataclass(frozen=True)
class RestoreResult:
    archive: Path
    files: tuple[BackupFile, ...]
    dagster_restored: bool
    alembic_revision: str


def _quiet(_line: str) -> None:
    """The default progress callback: say nothing."""


def sqlite_store_path(settings: JunctionSettings) -> Path:
    """The platform store's file, or BackupError pointing at pg_dump when the store is not SQLite."""
    url = make_url(settings.store_url)
    if url.get_backend_name() != "sqlite":
        raise BackupError(
            f"the platform store is {url.get_backend_name()} ({url.render_as_string(hide_password=True)}): "
            "`junction backup` covers the embedded SQLite store only; back PostgreSQL up with pg_dump "
            '(pg_dump --format=custom --file=junction-store.dump "$JUNCTION_DATABASE_URL") and restore '
            "it with pg_restore"
        )
    if not url.database or url.database == ":memory:":
        raise BackupError("the platform store is an in-memory SQLite database: there is nothing to back up")
    return Path(url.database).expanduser().resolve()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_sqlite_file(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(len(SQLITE_HEADER)) == SQLITE_HEADER


def copy_sqlite_online(source: Path, destination: Path) -> None:
    """A consistent copy of a live SQLite database (committed transactions, WAL included)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    source_connection = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    try:
        target_connection = sqlite3.connect(destination)
        try:
            # One step (pages=-1): the whole copy reads one snapshot of the source.
            source_connection.backup(target_connection, pages=-1)
            # A single file in the archive: the copy need not stay in WAL mode's two-file layout.
            target_connection.execute("PRAGMA journal_mode=DELETE")
        finally:
            target_connection.close()
    finally:
        source_connection.close()


def alembic_revision_of(database: Path) -> str:
    """The store revision recorded in a SQLite file, read without writing to it (its hash must hold)."""
    from orchestration.store.migrate import VERSION_TABLE

    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        row = connection.execute(f"SELECT version_num FROM {VERSION_TABLE}").fetchone()
    except sqlite3.OperationalError:  # no version table: never migrated
        row = None
    finally:
        connection.close()
    return row[0] if row else "base"


def _dagster_storage(settings: JunctionSettings) -> Path:
    return settings.dagster_home / "storage"


def _is_side_file(path: Path) -> bool:
    return path.name.endswith(SQLITE_SIDE_FILES)


def _dagster_files(storage: Path) -> Iterator[Path]:
    for path in sorted(storage.rglob("*")):
        if path.is_file() and not path.is_symlink() and not _is_side_file(path):
            yield path


def default_archive_path(settings: JunctionSettings, now: datetime) -> Path:
    return settings.home_dir / "backups" / f"junction-backup-{now.strftime('%Y%m%dT%H%M%SZ')}.tar.gz"


def create_backup(
    output: Path | None = None,
    *,
    require_dagster: bool = False,
    settings: JunctionSettings | None = None,
    progress: Progress = _quiet,
) -> BackupResult:
    """Write a backup archive; Dagster's storage is included only while the platform is stopped.

    While the platform runs the store alone is backed up (the result says why Dagster's storage was
    skipped), or, with `require_dagster`, BackupError is raised instead.
    """
    settings = settings or get_settings()
    store_path = sqlite_store_path(settings)
    if not store_path.is_file():
        raise BackupError(f"no platform store at {store_path}: nothing to back up")
    now = datetime.now(UTC)
    archive = Path(output).expanduser() if output else default_archive_path(settings, now)
    if archive.is_dir():
        archive = archive / default_archive_path(settings, now).name
    if archive.exists():
        raise BackupError(f"{archive} already exists: choose another --output")

    running = platform_running(settings.home_dir)
    if running and require_dagster:
        raise BackupError(f"cannot include Dagster's storage: {RUNNING_SKIP_REASON}")
    storage = _dagster_storage(settings)
    include_dagster = not running
    skipped_reason = RUNNING_SKIP_REASON if running else None

    archive.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".junction-backup-", dir=archive.parent) as staging_name:
        staging = Path(staging_name)
        files: list[BackupFile] = []

        def stage(member: str, source: Path) -> None:
            target = staging / member
            target.parent.mkdir(parents=True, exist_ok=True)
            if is_sqlite_file(source):
                copy_sqlite_online(source, target)
            else:
                shutil.copy2(source, target)
            entry = BackupFile(path=member, sha256=sha256_of(target), size=target.stat().st_size)
            files.append(entry)
            progress(f"  {member} ({entry.size:,} bytes)")

        copy_sqlite_online(store_path, staging / STORE_MEMBER)
        revision = alembic_revision_of(staging / STORE_MEMBER)
        entry = BackupFile(
            STORE_MEMBER, sha256_of(staging / STORE_MEMBER), (staging / STORE_MEMBER).stat().st_size
        )
        files.append(entry)
        progress(f"  {STORE_MEMBER} ({entry.size:,} bytes, online copy)")

        if include_dagster:
            # Hold the platform lock so `junction dev` cannot start while Dagster's files are read.
            with hold_platform_lock(settings.home_dir):
                if storage.is_dir():
                    for path in _dagster_files(storage):
                        stage(f"{DAGSTER_PREFIX}/{path.relative_to(storage).as_posix()}", path)
                else:
                    skipped_reason = f"there is no Dagster storage at {storage}"
                    include_dagster = False
        manifest = {
            "format": MANIFEST_FORMAT,
            "created_at": now.isoformat(),
            "junction_version": __version__,
            "alembic_revision": revision,
            "dagster_included": include_dagster,
            "dagster_skipped_reason": skipped_reason,
            "files": [file.__dict__ for file in files],
        }
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        partial = archive.with_name(f".{archive.name}.partial")
        with tarfile.open(partial, "w:gz") as tar:
            tar.add(staging / MANIFEST_NAME, arcname=MANIFEST_NAME)
            for file in files:
                tar.add(staging / file.path, arcname=file.path)
        partial.replace(archive)
    return BackupResult(
        archive=archive,
        files=tuple(files),
        dagster_included=include_dagster,
        dagster_skipped_reason=skipped_reason,
    )


def _safe_member_path(name: str) -> str:
    """Refuse absolute paths and `..`: an archive must not write outside the restore folder."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise BackupError(f"archive member {name!r} has an unsafe path")
    return path.as_posix()


def read_manifest(archive: Path) -> dict[str, Any]:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            member = tar.getmember(MANIFEST_NAME)
            handle = tar.extractfile(member)
            if handle is None:
                raise BackupError(f"{archive}: {MANIFEST_NAME} is not a file")
            manifest = json.loads(handle.read())
    except KeyError:
        raise BackupError(f"{archive}: not a Junction backup (no {MANIFEST_NAME})") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BackupError(f"{archive}: unreadable archive ({exc})") from None
    except json.JSONDecodeError as exc:
        raise BackupError(f"{archive}: {MANIFEST_NAME} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise BackupError(f"{archive}: unsupported backup format {manifest.get('format')!r}")
    return manifest


def _extract_verified(
    archive: Path, manifest: dict[str, Any], staging: Path, progress: Progress
) -> list[BackupFile]:
    """Extract into `staging` and check every file against the manifest (sizes, sha256, nothing extra)."""
    expected = {
        _safe_member_path(item["path"]): BackupFile(item["path"], item["sha256"], int(item["size"]))
        for item in manifest.get("files", [])
    }
    if STORE_MEMBER not in expected:
        raise BackupError(f"{archive}: the manifest lists no {STORE_MEMBER}")
    seen: set[str] = set()
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = _safe_member_path(member.name)
                if name == MANIFEST_NAME:
                    continue
                if name not in expected:
                    raise BackupError(f"{archive}: {name} is not listed in the manifest")
                if not member.isfile():
                    raise BackupError(f"{archive}: {name} is not a regular file")
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                with open(target, "wb") as handle:
                    shutil.copyfileobj(source, handle)
                seen.add(name)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BackupError(f"{archive}: unreadable archive ({exc}); nothing was changed") from None
    missing = sorted(set(expected) - seen)
    if missing:
        raise BackupError(f"{archive}: files listed in the manifest are missing: {', '.join(missing)}")
    for name, file in expected.items():
        size = (staging / name).stat().st_size
        if size != file.size or sha256_of(staging / name) != file.sha256:
            raise BackupError(
                f"{archive}: checksum mismatch for {name}: the archive is corrupted; nothing was changed"
            )
        progress(f"  verified {name} ({size:,} bytes)")
    return list(expected.values())


@contextmanager
def _moved_aside(paths: list[Path], suffix: str) -> Iterator[list[tuple[Path, Path]]]:
    """Rename existing `paths` to `<path><suffix>`; put them back if the block fails, delete them if not.

    On failure every path is cleared first, not only those moved: a `-wal` file the block created
    beside a new database must not end up beside the old one (SQLite would replay it into it).
    """
    moved: list[tuple[Path, Path]] = []
    try:
        for path in paths:
            if path.exists():
                aside = path.with_name(path.name + suffix)
                path.rename(aside)
                moved.append((path, aside))
        yield moved
    except BaseException:
        for path in paths:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        for original, aside in reversed(moved):
            aside.rename(original)
        raise
    for _original, aside in moved:
        if aside.is_dir():
            shutil.rmtree(aside)
        else:
            aside.unlink()


def restore_backup(
    archive: Path,
    *,
    force: bool = False,
    settings: JunctionSettings | None = None,
    progress: Progress = _quiet,
) -> RestoreResult:
    """Replace the store (and Dagster's storage, if the archive has it) with the archive's copies.

    Refused while the platform runs, for a PostgreSQL store, for a corrupted archive, and, without
    `force`, when there is current data it would replace.
    """
    from alembic.script import ScriptDirectory

    from orchestration.store import heads
    from orchestration.store.bootstrap import migrate_store
    from orchestration.store.db import dispose_engines
    from orchestration.store.migrate import alembic_config

    settings = settings or get_settings()
    archive = Path(archive).expanduser().resolve()
    store_path = sqlite_store_path(settings)
    if not archive.is_file():
        raise BackupError(f"no backup archive at {archive}")
    if platform_running(settings.home_dir):
        raise BackupError("the platform is running: stop `junction dev` before restoring a backup")
    manifest = read_manifest(archive)
    revision = manifest.get("alembic_revision") or "base"
    known = {
        script.revision
        for script in ScriptDirectory.from_config(alembic_config("sqlite://")).walk_revisions()
    }
    if revision != "base" and revision not in known:
        raise BackupError(
            f"{archive}: store revision {revision} is unknown to this Junction (head {', '.join(heads())}); "
            "restore it with the Junction version that made it"
        )
    dagster_included = bool(manifest.get("dagster_included"))
    storage = _dagster_storage(settings)
    replaced = [store_path] if store_path.exists() else []
    if dagster_included and storage.exists() and any(storage.iterdir()):
        replaced.append(storage)
    if replaced and not force:
        raise BackupError(
            f"restoring replaces {' and '.join(str(path) for path in replaced)}: pass --force to go ahead"
        )

    settings.home_dir.mkdir(parents=True, exist_ok=True)
    with (
        hold_platform_lock(settings.home_dir),
        tempfile.TemporaryDirectory(prefix=".junction-restore-", dir=settings.home_dir) as staging_name,
    ):
        staging = Path(staging_name)
        progress(f"verifying {archive.name}")
        files = _extract_verified(archive, manifest, staging, progress)
        # Pooled connections would keep reading the old file (and its WAL) after the swap.
        dispose_engines()
        suffix = f".before-restore-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%fZ')}"
        store_side_files = [store_path.with_name(store_path.name + side) for side in SQLITE_SIDE_FILES]
        to_move = [store_path, *store_side_files] + ([storage] if dagster_included else [])
        with _moved_aside(to_move, suffix) as moved:
            for original, aside in moved:
                progress(f"  moved {original} aside to {aside.name}")
            store_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(staging / STORE_MEMBER, store_path)
            progress(f"  restored {store_path}")
            if dagster_included:
                storage.parent.mkdir(parents=True, exist_ok=True)
                staged_storage = staging / DAGSTER_PREFIX
                if staged_storage.is_dir():
                    shutil.move(staged_storage, storage)
                else:
                    storage.mkdir()
                progress(f"  restored {storage}")
            try:
                revision_now = migrate_store(settings.store_url)
            finally:
                dispose_engines()
            progress(f"  platform store migrated to {revision_now}")
    return RestoreResult(
        archive=archive, files=tuple(files), dagster_restored=dagster_included, alembic_revision=revision_now
    )


__all__ = [
    "BackupError",
    "BackupFile",
    "BackupResult",
    "RestoreResult",
    "create_backup",
    "read_manifest",
    "restore_backup",
]
