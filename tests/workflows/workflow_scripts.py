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
