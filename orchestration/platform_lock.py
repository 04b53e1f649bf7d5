"""The running platform holds an exclusive lock on `$JUNCTION_HOME/platform.lock`.

Commands that must not run beside it (restoring a backup of Dagster's SQLite storage) check it.
An OS lock (flock) dies with its process, so a crashed platform never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from orchestration.errors import ConfigurationError


def lock_path(home: Path) -> Path:
    return home / "platform.lock"


@contextmanager
def hold_platform_lock(home: Path) -> Iterator[None]:
    """Held by `junction dev` for as long as the platform runs."""
    home.mkdir(parents=True, exist_ok=True)
    handle = open(lock_path(home), "a+")  # noqa: SIM115 - kept open while the lock is held
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise ConfigurationError(
                f"the platform is already running from {home} (pid {owner}); stop it first"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()


def platform_running(home: Path) -> bool:
    """True while a platform process holds the lock for `home`."""
    path = lock_path(home)
    if not path.exists():
        return False
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False
