"""Bad configuration gives a one-line clear error and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support import free_port

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def run_junction(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("JUNCTION_") and k != "DAGSTER_HOME"}
    clean["JUNCTION_HOME"] = str(tmp_path / "home")
    clean.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "orchestration.cli", *args],
        env=clean,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0]


def test_invalid_setting(tmp_path: Path):
    result = run_junction(tmp_path, "dev", "--port", "1", env={"JUNCTION_GATEWAY_PREFIX": "/"})
    assert_one_line_error(result, "invalid setting", "JUNCTION_GATEWAY_PREFIX")
    assert result.returncode == 2


def test_unreachable_database_url(tmp_path: Path):
    port = free_port()
    result = run_junction(
        tmp_path,
        "db",
        "upgrade",
        env={"JUNCTION_DATABASE_URL": f"postgresql://junction:secret@127.0.0.1:{port}/nowhere"},
    )
    assert_one_line_error(result, "platform store", "is unreachable", "***")
    assert "secret" not in result.stderr


def test_malformed_workspace_file(tmp_path: Path):
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text("load_from:\n  - python_modul: orchestration.definitions\n")
    port = free_port()
    result = run_junction(tmp_path, "dev", "--port", str(port), "--workspace", str(workspace))
    assert_one_line_error(result, str(workspace))

    workspace.write_text("load_from: [\n")
    result = run_junction(tmp_path, "dev", "--port", str(port), "--workspace", str(workspace))
    assert_one_line_error(result, str(workspace), "invalid YAML")


def test_port_in_use(tmp_path: Path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = run_junction(tmp_path, "dev", "--port", str(port))
    assert_one_line_error(result, f"port {port}", "already in use")


def test_unreachable_dagster_storage(tmp_path: Path):
    home = tmp_path / "dagster-home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        "storage:\n  postgres:\n    postgres_url: postgresql://dagster@127.0.0.1:1/dagster\n"
    )
    port = free_port()
    result = run_junction(tmp_path, "dev", "--port", str(port), env={"DAGSTER_HOME": str(home)})
    assert_one_line_error(result, "Dagster instance", str(home))


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["dev"],
        ["gateway"],
        ["db"],
        ["keys"],
        ["audit"],
        ["backup"],
        ["notifications"],
        ["notifications", "outbox"],
    ],
)
def test_help_everywhere(tmp_path: Path, command: list[str]):
    result = run_junction(tmp_path, *command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


def test_a_broken_stream_declaration_stops_the_start_naming_the_file(tmp_path: Path):
    streams = tmp_path / "streams"
    streams.mkdir()
    (streams / "orders.yaml").write_text("name: orders\nretention: {max_count: lots}\n")
    result = run_junction(
        tmp_path, "dev", "--port", str(free_port()), env={"JUNCTION_STREAMS_DIR": str(streams)}
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert f"{streams / 'orders.yaml'}: retention.max_count:" in result.stderr
