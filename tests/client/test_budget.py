"""Retry budget and adaptive throttling: the arithmetic, the sliding window, thread safety."""

from __future__ import annotations

import re
import threading

import pytest

from shedder._client.budget import AdaptiveThrottle, ClientThrottled, RetryBudget


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def withdrawals(budget: RetryBudget, limit: int = 10_000) -> int:
    """How many retries the budget grants right now."""
    granted = 0
    while granted < limit and budget.try_withdraw():
        granted += 1
    return granted


# --- retry budget ----------------------------------------------------------------------------


def test_budget_grants_ratio_of_requests() -> None:
    budget = RetryBudget(ratio=0.2, min_retries_per_second=0, clock=FakeClock())
    for _ in range(10):
        budget.deposit()
    assert budget.balance() == pytest.approx(2.0)
    assert withdrawals(budget) == 2
    assert budget.balance() == pytest.approx(0.0)


def test_budget_floor_grants_retries_without_requests() -> None:
    budget = RetryBudget(ratio=0.2, min_retries_per_second=1.0, window=10, clock=FakeClock())
    assert withdrawals(budget) == 10  # 1/s over a 10 s window


def test_spent_budget_refills_as_the_window_slides() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.0, min_retries_per_second=0.5, window=10, clock=clock)
    assert withdrawals(budget) == 5
    assert not budget.try_withdraw()
    clock.advance(5)  # the retries are still inside the window
    assert not budget.try_withdraw()
    clock.advance(5.01)  # ... and now they have left it
    assert withdrawals(budget) == 5


def test_old_requests_stop_earning_retries() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.5, min_retries_per_second=0, window=10, clock=clock)
    for _ in range(10):
        budget.deposit()
    clock.advance(10.01)
    assert budget.balance() == 0.0
    assert not budget.try_withdraw()


def test_budget_is_thread_safe() -> None:
    budget = RetryBudget(ratio=0.0, min_retries_per_second=50, window=10)  # 500 retries
    granted: list[int] = []
    start = threading.Barrier(8)

    def spend() -> None:
        start.wait()
        granted.append(withdrawals(budget, limit=200))

    threads = [threading.Thread(target=spend) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(granted) == 500


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ratio": -0.1}, "ratio must be in [0, 1e+12], got -0.1"),
        (
            {"min_retries_per_second": float("inf")},
            "min_retries_per_second must be in [0, 1e+12], got inf",
        ),
        ({"window": 0}, "window must be between 0.001 and 31622400 seconds, got 0"),
    ],
)
def test_budget_rejects_bad_values(options: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        RetryBudget(**options)


# --- adaptive throttling ---------------------------------------------------------------------


def run(throttle: AdaptiveThrottle, requests: int, accepts: int) -> None:
    """Records ``requests`` attempts of which ``accepts`` were accepted (none refused locally)."""
    for index in range(requests):
        throttle.admit()
        if index < accepts:
            throttle.record_accepted()


@pytest.mark.parametrize(
    ("k", "requests", "accepts", "expected"),
    [
        (2.0, 0, 0, 0.0),
        (2.0, 10, 10, 0.0),
        (2.0, 10, 5, 0.0),  # one accept in k: nothing refused yet
        (2.0, 10, 4, (10 - 8) / 11),
        (2.0, 10, 0, 10 / 11),
        (1.0, 10, 9, 1 / 11),
        (1.5, 20, 4, (20 - 6) / 21),
    ],
)
def test_reject_probability_follows_the_sre_formula(
    k: float, requests: int, accepts: int, expected: float
) -> None:
    # random() -> 0.999..: nothing is refused while we fill the counts.
    throttle = AdaptiveThrottle(k=k, clock=FakeClock(), random=lambda: 0.999999)
    run(throttle, requests, accepts)
    assert throttle.reject_probability() == pytest.approx(expected)


class Draw:
    """An injectable random() whose next value the test sets."""

    def __init__(self) -> None:
        self.value = 0.999999

    def __call__(self) -> float:
        return self.value


def test_throttle_refuses_with_that_probability() -> None:
    draw = Draw()
    throttle = AdaptiveThrottle(clock=FakeClock(), random=draw)
    run(throttle, 10, 4)  # p = 2/11 ~ 0.18
    draw.value = 0.17
    with pytest.raises(ClientThrottled) as info:
        throttle.admit()  # draw 0.17 < 0.18 is refused
    assert info.value.probability == pytest.approx(2 / 11)
    assert (info.value.requests, info.value.accepts) == (11, 4)
    assert "refused locally" in str(info.value)
    # The refused attempt counted as a request: p = (11 - 8) / 12 now.
    assert throttle.reject_probability() == pytest.approx(3 / 12)


def test_throttle_admits_above_the_probability() -> None:
    draw = Draw()
    throttle = AdaptiveThrottle(clock=FakeClock(), random=draw)
    run(throttle, 10, 4)
    draw.value = 0.19
    throttle.admit()  # 0.19 >= 2/11: admitted, and counted
    assert throttle.reject_probability() == pytest.approx((11 - 8) / 12)


def test_throttle_forgets_after_its_window() -> None:
    clock = FakeClock()
    throttle = AdaptiveThrottle(window=60, clock=clock, random=lambda: 0.999999)
    run(throttle, 50, 0)
    assert throttle.reject_probability() > 0.9
    clock.advance(60.01)
    assert throttle.reject_probability() == 0.0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"k": 0.5}, "k must be in [1, 1e+12], got 0.5"),
        ({"window": -1.0}, "window must be >= 0 seconds, got -1.0"),
    ],
)
def test_throttle_rejects_bad_values(options: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        AdaptiveThrottle(**options)
