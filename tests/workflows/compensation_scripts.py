"""Project functions called by the Sync and compensation tests' Custom Script steps."""

from __future__ import annotations

# Every call, in order, with its arguments: which steps and compensations ran, and with what.
CALLS: list[tuple[str, dict]] = []


def record(context, label: str, **arguments):
    CALLS.append((label, arguments))
    return {"label": label, **arguments}


def fail(context, message: str = "the ledger is closed"):
    CALLS.append(("fail", {"message": message}))
    raise RuntimeError(message)
