"""Adaptive batch sizing on a simulated consumer with a deterministic clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shedder import AdaptiveBatchSizer


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_batches(
    sizer: AdaptiveBatchSizer, clock: FakeClock, per_item: float, batches: int
) -> list[tuple[int, float]]:
    """Process ``batches`` batches where each item costs ``per_item`` seconds (plus 5 ms)."""
    history = []
    for _ in range(batches):
        size = sizer.size
        with sizer.measure(size):
            clock.now += 0.005 + size * per_item
        history.append((size, 0.005 + size * per_item))
    return history


def test_grows_with_slack_and_settles_under_the_budget() -> None:
    clock = FakeClock()
    sizer = AdaptiveBatchSizer(1.0, min_size=1, max_size=10_000, clock=clock)
    history = run_batches(sizer, clock, per_item=0.002, batches=30)
    sizes = [size for size, _ in history]
    assert sizes[:4] == [1, 2, 4, 8]  # at most doubling per batch
    final_size, final_elapsed = history[-1]
    assert 0.6 <= final_elapsed <= 1.0  # near the 80 % target, never over the budget
    assert all(size == final_size for size, _ in history[-5:])  # converged


def test_shrinks_at_once_when_processing_slows_down() -> None:
    clock = FakeClock()
    sizer = AdaptiveBatchSizer(1.0, max_size=10_000, clock=clock)
    run_batches(sizer, clock, per_item=0.002, batches=30)
    settled = sizer.size
    slow = run_batches(sizer, clock, per_item=0.006, batches=6)
    assert slow[0][1] > 1.0  # the first slow batch overran the budget...
    assert slow[1][0] < settled / 2  # ...so the next one is cut at once
    assert all(elapsed <= 1.0 for _, elapsed in slow[1:])  # and stays within it


def test_stays_within_bounds() -> None:
    clock = FakeClock()
    fast = AdaptiveBatchSizer(1.0, min_size=5, max_size=50, clock=clock)
    run_batches(fast, clock, per_item=0.000001, batches=20)
    assert fast.size == 50
    slow = AdaptiveBatchSizer(1.0, min_size=5, max_size=50, initial=50, clock=clock)
    run_batches(slow, clock, per_item=1.0, batches=3)
    assert slow.size == 5


@given(
    costs=st.lists(st.floats(1e-6, 0.5), min_size=1, max_size=40),
    low=st.integers(1, 20),
    span=st.integers(0, 500),
)
def test_size_always_within_bounds_and_converges_for_steady_cost(
    costs: list[float], low: int, span: int
) -> None:
    clock = FakeClock()
    sizer = AdaptiveBatchSizer(2.0, min_size=low, max_size=low + span, clock=clock)
    for cost in costs:
        run_batches(sizer, clock, per_item=cost, batches=1)
        assert low <= sizer.size <= low + span
    steady = run_batches(sizer, clock, per_item=costs[-1], batches=25)
    size, elapsed = steady[-1]
    # Within budget unless the minimum size alone exceeds it; and no longer moving.
    assert elapsed <= 2.0 or size == low
    assert abs(steady[-2][0] - size) <= max(1, size // 100)


def test_empty_batches_change_nothing() -> None:
    sizer = AdaptiveBatchSizer(1.0, initial=10)
    assert sizer.record(0, 5.0) == 10
    assert sizer.seconds_per_item is None


def test_measure_records_a_failing_batch() -> None:
    clock = FakeClock()
    sizer = AdaptiveBatchSizer(1.0, initial=100, clock=clock)

    def failing_batch() -> None:
        with sizer.measure(100):
            clock.now += 2.0
            raise RuntimeError("batch failed")

    with pytest.raises(RuntimeError):
        failing_batch()
    assert sizer.size == 40  # 0.02 s per item, aiming at 0.8 s


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget": 0}, "budget must be > 0"),
        ({"budget": 1, "min_size": 0}, "min_size must be >= 1, got 0"),
        ({"budget": 1, "min_size": 5, "max_size": 4}, "max_size must be >= 5, got 4"),
        ({"budget": 1, "initial": 2000}, "initial must be <= max_size"),
        ({"budget": 1, "target": 1.5}, "target must be in"),
        ({"budget": 1, "max_growth": 1}, "max_growth must be > 1"),
    ],
)
def test_bad_configuration_names_the_parameter(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdaptiveBatchSizer(**kwargs)  # type: ignore[arg-type]
