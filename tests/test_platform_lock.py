from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestration.errors import ConfigurationError
from orchestration.platform_lock import hold_platform_lock, platform_running


def test_lock_is_seen_while_held_and_released_after(tmp_path: Path):
    assert not platform_running(tmp_path)
    with hold_platform_lock(tmp_path):
        assert platform_running(tmp_path)
        with pytest.raises(ConfigurationError, match="already running"):
            with hold_platform_lock(tmp_path):
                pass
    assert not platform_running(tmp_path)


def test_a_killed_platform_leaves_no_stale_lock(tmp_path: Path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, pathlib; from orchestration.platform_lock import hold_platform_lock\n"
            f"with hold_platform_lock(pathlib.Path({str(tmp_path)!r})):\n    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    assert platform_running(tmp_path)
    holder.kill()
    holder.wait()
    time.sleep(0.1)
    assert not platform_running(tmp_path)
