"""Backup and restore of the embedded platform: the SQLite store and a real Dagster storage folder."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml
from click.testing import CliRunner

from orchestration.cli import cli
from orchestration.instance import generated_dagster_yaml
from orchestration.kernel.audit import append, query, verify_chain
from orchestration.kernel.backup import (
    MANIFEST_NAME,
    STORE_MEMBER,
    BackupError,
    create_backup,
    read_manifest,
    restore_backup,
    sha256_of,
)
from orchestration.platform_lock import hold_platform_lock
from orchestration.store import current_revision, heads, upgrade
from orchestration.store.db import create_store_engine


@dg.op
def say_hello() -> str:
    return "hello"


@dg.job
def tiny_job() -> None:
    say_hello()


@pytest.fixture
def embedded_store(junction_home: Path) -> Path:
    """The embedded default: a migrated SQLite store at $JUNCTION_HOME/platform.db."""
    upgrade(f"sqlite:///{junction_home / 'platform.db'}")
    return junction_home / "platform.db"


@pytest.fixture
def dagster_home(junction_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A DAGSTER_HOME with Junction's generated dagster.yaml (Dagster's SQLite storage under storage/)."""
    home = junction_home / "dagster"
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(generated_dagster_yaml(home), sort_keys=False))
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


def run_tiny_job(dagster_home: Path) -> str:
    """Execute a real run so Dagster writes runs.db, index.db, schedules.db and the run's event log."""
    instance = dg.DagsterInstance.from_config(str(dagster_home))
    try:
        result = tiny_job.execute_in_process(instance=instance)
        assert result.success
        return result.run_id
    finally:
        instance.dispose()


def run_is_visible(dagster_home: Path, run_id: str) -> bool:
    instance = dg.DagsterInstance.from_config(str(dagster_home))
    try:
        run = instance.get_run_by_id(run_id)
        return (
            run is not None and run.status == dg.DagsterRunStatus.SUCCESS and bool(instance.all_logs(run_id))
        )
    finally:
        instance.dispose()


def archive_members(archive: Path) -> list[str]:
    with tarfile.open(archive, "r:gz") as tar:
        return tar.getnames()


def test_create_while_running_backs_up_the_store_only(
    embedded_store: Path, dagster_home: Path, junction_home: Path, tmp_path: Path
) -> None:
    run_tiny_job(dagster_home)
    append("backup.test", actor="alice")
    lines: list[str] = []
    with hold_platform_lock(junction_home):
        result = create_backup(tmp_path / "running.tar.gz", progress=lines.append)
        with pytest.raises(BackupError, match="platform is running"):
            create_backup(tmp_path / "full.tar.gz", require_dagster=True)

    assert not result.dagster_included
    assert "platform is running" in result.dagster_skipped_reason
    assert archive_members(result.archive) == [MANIFEST_NAME, STORE_MEMBER]
    manifest = read_manifest(result.archive)
    assert manifest["dagster_included"] is False and "running" in manifest["dagster_skipped_reason"]
    assert manifest["alembic_revision"] in heads()
    assert any(STORE_MEMBER in line for line in lines)
    assert not (tmp_path / "full.tar.gz").exists()


def test_create_while_stopped_includes_dagster_storage(
    embedded_store: Path, dagster_home: Path, tmp_path: Path
) -> None:
    run_id = run_tiny_job(dagster_home)
    lines: list[str] = []
    result = create_backup(tmp_path, progress=lines.append)

    assert result.dagster_included and result.dagster_skipped_reason is None
    assert result.archive.parent == tmp_path and result.archive.name.startswith("junction-backup-")
    members = archive_members(result.archive)
    assert members[0] == MANIFEST_NAME
    for expected in (
        STORE_MEMBER,
        "dagster/storage/history/runs.db",
        "dagster/storage/history/runs/index.db",
        f"dagster/storage/history/runs/{run_id}.db",
        "dagster/storage/schedules/schedules.db",
    ):
        assert expected in members
        assert any(expected in line for line in lines)
    assert not [name for name in members if name.endswith(("-wal", "-shm"))]

    manifest = read_manifest(result.archive)
    assert manifest["junction_version"] and manifest["created_at"]
    assert sorted(file["path"] for file in manifest["files"]) == sorted(members[1:])
    with tarfile.open(result.archive, "r:gz") as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    for file in manifest["files"]:
        extracted = tmp_path / "extracted" / file["path"]
        assert sha256_of(extracted) == file["sha256"] and extracted.stat().st_size == file["size"]


def test_store_copy_is_consistent_while_writers_append(embedded_store: Path, tmp_path: Path) -> None:
    """The online copy is one snapshot: the chain in the archive verifies although appends go on."""
    append("first", actor="writer")
    stop = threading.Event()

    def keep_appending() -> None:
        engine = create_store_engine(f"sqlite:///{embedded_store}")
        try:
            while not stop.is_set():
                append("tick", actor="writer", engine=engine)
        finally:
            engine.dispose()

    writer = threading.Thread(target=keep_appending)
    writer.start()
    try:
        time.sleep(0.2)
        archive = create_backup(tmp_path / "online.tar.gz").archive
    finally:
        stop.set()
        writer.join(timeout=30)

    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    copy_engine = create_store_engine(f"sqlite:///{tmp_path / 'extracted' / STORE_MEMBER}", one_shot=True)
    try:
        copied = verify_chain(copy_engine)
    finally:
        copy_engine.dispose()
    assert copied.ok and copied.entries > 1
    assert verify_chain().entries >= copied.entries


def test_restore_round_trip(
    embedded_store: Path, dagster_home: Path, junction_home: Path, tmp_path: Path
) -> None:
    run_id = run_tiny_job(dagster_home)
    for n in range(3):
        append("before.backup", actor="alice", details={"n": n})
    backed_up = [record.entry_hash for record in query()]
    archive = create_backup(tmp_path / "backup.tar.gz").archive

    # Life goes on after the backup: more audit entries, and Dagster's storage is lost.
    append("after.backup", actor="bob")
    run_tiny_job(dagster_home)
    shutil.rmtree(dagster_home / "storage")
    assert not run_is_visible(dagster_home, run_id)

    with pytest.raises(BackupError, match="--force"):
        restore_backup(archive)
    lines: list[str] = []
    result = restore_backup(archive, force=True, progress=lines.append)

    assert result.dagster_restored and result.alembic_revision in heads()
    assert [record.entry_hash for record in query()] == backed_up
    assert verify_chain().ok
    assert run_is_visible(dagster_home, run_id)
    assert current_revision(f"sqlite:///{embedded_store}") in heads()
    assert any("moved" in line and "aside" in line for line in lines)
    leftovers = [
        path.name
        for path in junction_home.rglob("*")
        if "before-restore" in path.name or "restore-" in path.name
    ]
    assert leftovers == []
    # The restored store is live again for writers.
    append("after.restore", actor="carol")
    assert verify_chain().entries == 4


def _corrupt(archive: Path, member_name: str, destination: Path) -> Path:
    """A copy of `archive` whose `member_name` has one byte changed (the manifest left as it was)."""
    with tarfile.open(archive, "r:gz") as source, tarfile.open(destination, "w:gz") as target:
        for member in source:
            data = source.extractfile(member).read()
            if member.name == member_name:
                data = data[:-1] + bytes([data[-1] ^ 0xFF])
            member.size = len(data)
            target.addfile(member, io.BytesIO(data))
    return destination


def test_corrupted_archive_is_refused_and_nothing_changes(
    embedded_store: Path, dagster_home: Path, tmp_path: Path
) -> None:
    run_tiny_job(dagster_home)
    append("original", actor="alice")
    archive = create_backup(tmp_path / "backup.tar.gz").archive
    append("newer", actor="alice")
    corrupted = _corrupt(archive, "dagster/storage/history/runs.db", tmp_path / "corrupted.tar.gz")
    store_before = sha256_of(embedded_store)
    storage_before = sorted(
        (str(path), sha256_of(path)) for path in (dagster_home / "storage").rglob("*") if path.is_file()
    )

    with pytest.raises(BackupError, match="checksum mismatch for dagster/storage/history/runs.db"):
        restore_backup(corrupted, force=True)

    assert sha256_of(embedded_store) == store_before
    assert [record.action for record in query()] == ["newer", "original"]
    storage_after = sorted(
        (str(path), sha256_of(path)) for path in (dagster_home / "storage").rglob("*") if path.is_file()
    )
    assert storage_after == storage_before


def test_a_failed_restore_puts_the_previous_files_back(
    embedded_store: Path,
    dagster_home: Path,
    junction_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from orchestration.store import bootstrap

    run_id = run_tiny_job(dagster_home)
    archive = create_backup(tmp_path / "backup.tar.gz").archive
    append("newer", actor="alice")
    newer_run_id = run_tiny_job(dagster_home)

    def failing_migration(url=None, revision="head"):
        raise bootstrap.ConfigurationError("migration exploded")

    monkeypatch.setattr(bootstrap, "migrate_store", failing_migration)
    with pytest.raises(bootstrap.ConfigurationError, match="migration exploded"):
        restore_backup(archive, force=True)

    assert [record.action for record in query()] == ["newer"]
    assert run_is_visible(dagster_home, run_id) and run_is_visible(dagster_home, newer_run_id)
    assert [path.name for path in junction_home.rglob("*") if "before-restore" in path.name] == []


def test_restore_refuses_while_the_platform_runs(
    embedded_store: Path, dagster_home: Path, junction_home: Path, tmp_path: Path
) -> None:
    append("original", actor="alice")
    archive = create_backup(tmp_path / "backup.tar.gz").archive
    append("newer", actor="alice")
    with hold_platform_lock(junction_home), pytest.raises(BackupError, match="platform is running"):
        restore_backup(archive, force=True)
    assert [record.action for record in query()] == ["newer", "original"]


def test_store_only_archive_leaves_dagster_storage_alone(
    embedded_store: Path, dagster_home: Path, junction_home: Path, tmp_path: Path
) -> None:
    run_id = run_tiny_job(dagster_home)
    append("original", actor="alice")
    with hold_platform_lock(junction_home):
        archive = create_backup(tmp_path / "store-only.tar.gz").archive
    append("newer", actor="alice")

    result = restore_backup(archive, force=True)
    assert not result.dagster_restored
    assert [record.action for record in query()] == ["original"]
    assert run_is_visible(dagster_home, run_id)


def test_not_a_backup_is_refused(embedded_store: Path, tmp_path: Path) -> None:
    archive = tmp_path / "other.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("hello.txt")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(BackupError, match="not a Junction backup"):
        restore_backup(archive, force=True)
    (tmp_path / "garbage.tar.gz").write_bytes(b"not gzip at all")
    with pytest.raises(BackupError, match="unreadable archive"):
        restore_backup(tmp_path / "garbage.tar.gz", force=True)


def test_archive_from_a_newer_junction_is_refused(embedded_store: Path, tmp_path: Path) -> None:
    archive = create_backup(tmp_path / "backup.tar.gz").archive
    newer = tmp_path / "newer.tar.gz"
    with tarfile.open(archive, "r:gz") as source, tarfile.open(newer, "w:gz") as target:
        for member in source:
            data = source.extractfile(member).read()
            if member.name == MANIFEST_NAME:
                manifest = json.loads(data)
                manifest["alembic_revision"] = "9999_from_the_future"
                data = json.dumps(manifest).encode()
            member.size = len(data)
            target.addfile(member, io.BytesIO(data))
    before = sha256_of(embedded_store)
    with pytest.raises(BackupError, match="9999_from_the_future is unknown"):
        restore_backup(newer, force=True)
    assert sha256_of(embedded_store) == before


def test_create_without_a_store_is_refused(junction_home: Path, tmp_path: Path) -> None:
    with pytest.raises(BackupError, match="no platform store"):
        create_backup(tmp_path / "backup.tar.gz")


def test_existing_output_is_not_overwritten(embedded_store: Path, tmp_path: Path) -> None:
    (tmp_path / "taken.tar.gz").write_text("keep me")
    with pytest.raises(BackupError, match="already exists"):
        create_backup(tmp_path / "taken.tar.gz")
    assert (tmp_path / "taken.tar.gz").read_text() == "keep me"


def test_postgres_store_points_at_pg_dump(
    junction_home: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from orchestration.settings import reset_settings_cache

    monkeypatch.setenv("JUNCTION_DATABASE_URL", postgres_url)
    reset_settings_cache()
    with pytest.raises(BackupError, match="pg_dump"):
        create_backup(tmp_path / "pg.tar.gz")
    with pytest.raises(BackupError, match="pg_dump"):
        restore_backup(tmp_path / "pg.tar.gz", force=True)
    result = CliRunner().invoke(cli, ["backup", "create", "--output", str(tmp_path / "pg.tar.gz")])
    assert isinstance(result.exception, BackupError) and "pg_dump" in str(result.exception)
    assert not (tmp_path / "pg.tar.gz").exists()


def test_cli_create_and_restore(
    embedded_store: Path, dagster_home: Path, junction_home: Path, tmp_path: Path
) -> None:
    run_tiny_job(dagster_home)
    append("original", actor="alice")
    runner = CliRunner()

    with hold_platform_lock(junction_home):
        skipped = runner.invoke(cli, ["backup", "create", "--output", str(tmp_path / "a.tar.gz")])
        assert skipped.exit_code == 0, skipped.output
        assert "Dagster's storage was NOT backed up" in skipped.stderr and "running" in skipped.stderr
        refused = runner.invoke(cli, ["backup", "restore", str(tmp_path / "a.tar.gz"), "--force"])
        assert isinstance(refused.exception, BackupError)

    full = runner.invoke(cli, ["backup", "create", "--output", str(tmp_path / "b.tar.gz")])
    assert full.exit_code == 0, full.output
    assert "dagster/storage/history/runs.db" in full.output and "NOT backed up" not in full.output
    append("newer", actor="alice")

    restored = runner.invoke(cli, ["backup", "restore", str(tmp_path / "b.tar.gz"), "--force"])
    assert restored.exit_code == 0, restored.output
    assert "verified store/platform.db" in restored.output
    assert "restored the platform store and Dagster's storage" in restored.output
    assert [record.action for record in query()] == ["original"]
    manifest = json.loads(tarfile.open(tmp_path / "b.tar.gz", "r:gz").extractfile(MANIFEST_NAME).read())
    assert manifest["dagster_included"] is True
