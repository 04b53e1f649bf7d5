"""The kernel's circuit breaker: opening at an error ratio over a rolling window once enough calls
were seen, refusing while open, a bounded number of half-open probes, reopening for longer on a
failed probe, closing after successful ones, and old outcomes leaving the window."""

from __future__ import annotations

import threading

import pytest

from orchestration.kernel.breaker import BreakerOpen, BreakerPolicy, Breakers, BreakerSpec, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, transitions: list | None = None, **policy) -> CircuitBreaker:
    defaults = {"error_ratio": 0.5, "min_requests": 10, "window_s": 10.0, "buckets": 10, "open_for_s": 5.0}
    return CircuitBreaker(
        "orders-api",
        BreakerPolicy(**{**defaults, **policy}),
        on_transition=transitions.append if transitions is not None else None,
        clock=clock,
    )


def test_it_opens_at_the_error_ratio_only_once_enough_calls_were_seen():
    clock, moves = Clock(), []
    b = breaker(clock, moves)
    for _ in range(4):
        assert b.allow()
        b.record(False)
    assert b.state == "closed", "4 failures of 4 calls, but fewer than min_requests"
    for _ in range(5):
        b.record(True)
    assert b.state == "closed", "4 of 9"
    b.record(False)
    assert b.state == "open", "5 of 10 = the ratio"
    assert [(m.old, m.new) for m in moves] == [("closed", "open")]
    assert moves[0].reason == "5 of 10 calls failed in 10 s"
    assert not b.allow() and b.refused == 1
    assert b.retry_after_s() == pytest.approx(5.0)
    clock.now += 2
    assert b.retry_after_s() == pytest.approx(3.0)


def test_half_open_lets_a_bounded_number_of_probes_and_closes_after_successes():
    clock, moves = Clock(), []
    b = breaker(clock, moves, half_open_probes=2, close_after=2)
    for _ in range(10):
        b.record(False)
    clock.now += 5
    assert b.allow() and b.allow(), "two probes"
    assert b.state == "half_open"
    assert not b.allow(), "a third while two are in flight is refused"
    b.record(True)
    assert b.state == "half_open"
    b.record(True)
    assert b.state == "closed"
    assert b.to_json()["window_calls"] == 0, "the window starts empty after closing"
    assert [(m.old, m.new) for m in moves] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]


def test_a_failed_probe_opens_it_again_for_longer_up_to_the_ceiling():
    clock = Clock()
    b = breaker(clock, open_for_s=5.0, max_open_for_s=12.0)
    for _ in range(10):
        b.record(False)
    for expected in (10.0, 12.0, 12.0):
        clock.now += 100
        assert b.allow()
        b.record(False)
        assert b.state == "open" and b.retry_after_s() == pytest.approx(expected)
    clock.now += 12
    assert b.allow()
    for _ in range(2):
        b.record(True)
        if b.state == "half_open":
            assert b.allow()
    assert b.state == "closed"
    for _ in range(10):
        b.record(False)
    assert b.retry_after_s() == pytest.approx(5.0), "closing resets the open time"


def test_old_outcomes_leave_the_rolling_window():
    clock = Clock()
    b = breaker(clock)
    for _ in range(9):
        b.record(False)
    clock.now += 10.5  # the window moved past those failures
    b.record(False)
    assert b.state == "closed" and b.to_json()["window_failures"] == 1
    for _ in range(9):
        b.record(False)
    assert b.state == "open"


def test_release_returns_a_probe_slot_and_call_wraps_a_function():
    clock = Clock()
    b = breaker(clock, half_open_probes=1)
    for _ in range(10):
        b.record(False)
    with pytest.raises(BreakerOpen, match="circuit 'orders-api' is open; retry in 5.0 s"):
        b.call(lambda: 1)
    clock.now += 5
    assert b.allow()
    assert not b.allow()
    b.release()
    assert b.call(lambda: "ok") == "ok"
    with pytest.raises(ZeroDivisionError):
        b.call(lambda: 1 / 0)
    assert b.state == "open"
    clock.now += 10
    assert b.call(lambda: 503, is_failure=lambda status: status >= 500) == 503
    assert b.state == "open", "a result judged bad is a failed probe"


def test_the_spec_reads_durations_and_breakers_are_one_per_name():
    policy = BreakerSpec(window="30s", open_for="2s", max_open_for="1m", min_requests=5).policy()
    assert (policy.window_s, policy.open_for_s, policy.max_open_for_s, policy.min_requests) == (30, 2, 60, 5)
    with pytest.raises(ValueError, match="error_ratio"):
        BreakerSpec(error_ratio=0)
    named = Breakers(policy)
    assert named["http://a"] is named["http://a"] and named["http://a"] is not named["http://b"]
    assert [entry["name"] for entry in named.to_json()] == ["http://a", "http://b"]


def test_concurrent_callers_keep_the_counts_whole():
    b = CircuitBreaker("busy", BreakerPolicy(min_requests=1_000_000, window_s=60, buckets=60))

    def calls() -> None:
        for n in range(5000):
            if b.allow():
                b.record(n % 10 != 0)

    threads = [threading.Thread(target=calls) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    figures = b.to_json()
    assert (figures["window_calls"], figures["window_failures"]) == (20_000, 2_000)


def test_a_retry_budget_lets_retries_add_a_share_of_the_first_attempts_over_its_window():
    from orchestration.kernel.breaker import RetryBudget, RetryBudgetSpec

    clock = Clock()
    budget = RetryBudget(RetryBudgetSpec(ratio=0.2, min_per_second=0.1, window="10s"), clock=clock)
    # The floor: 0.1 a second over 10 s is one retry with no traffic at all.
    assert budget.try_retry() is True
    assert budget.try_retry() is False
    for _ in range(50):
        budget.request()
    allowed = sum(budget.try_retry() for _ in range(100))
    assert allowed == 10, "1 (the floor) + 0.2 x 50 first attempts, minus the one already taken"
    assert budget.exhausted == 1 + 90
    clock.now += 10.5  # the window moves on: its attempts and retries are forgotten
    assert budget.to_json()["window_retries"] == 0
    assert budget.try_retry() is True
