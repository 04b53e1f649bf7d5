"""Project functions called by Custom Script steps in the tests."""

from __future__ import annotations

import time


def order_summary(context, currency: str, factor: int = 1):
    return {
        "order": context.inputs["order_id"],
        "currency": currency,
        "doubled": context.steps["numbers"]["output"]["count"] * factor,
        "execution": context.execution_id,
    }


def explode(context):
    raise RuntimeError("the ledger is closed")


def sleepy(context, seconds: float = 5):
    time.sleep(seconds)
    return "woke up"


def not_json(context):
    return {"when": object()}


# Every call of `counted`, in order: the parking tests check which steps really ran in which run.
CALLS: list[str] = []


def counted(context, label: str):
    CALLS.append(label)
    return {"label": label, "run": context.run_id, "execution": context.execution_id}


def echo(context, **arguments):
    """The rendered arguments and what the step saw of its trigger and execution."""
    return {"arguments": arguments, "execution": context.execution_id, "trigger": dict(context.trigger or {})}


# Attempts of `flaky` per execution: it fails its first `fail_times` attempts in each execution.
FLAKY_ATTEMPTS: dict[str, int] = {}


def flaky(context, fail_times: str = "0"):
    attempt = FLAKY_ATTEMPTS.get(context.execution_id, 0) + 1
    FLAKY_ATTEMPTS[context.execution_id] = attempt
    if attempt <= int(fail_times):
        raise RuntimeError(f"attempt {attempt} fails")
    return {"attempt": attempt}
