"""The adaptive sampler: its ramp, and following a throttler or a queue by itself."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shedder import AdaptiveSampler, BlockingQueue, Throttler


def test_rate_is_base_below_threshold_and_min_at_full_load() -> None:
    sampler = AdaptiveSampler(base_rate=0.8, min_rate=0.1, threshold=0.5)
    assert sampler.rate(0.0) == sampler.rate(0.5) == 0.8
    assert sampler.rate(0.75) == pytest.approx(0.45)  # halfway down the ramp
    assert sampler.rate(1.0) == sampler.rate(3.0) == 0.1


@given(
    base=st.floats(0, 1),
    low=st.floats(0, 1),
    threshold=st.floats(0, 0.99),
    loads=st.lists(st.floats(0, 2), min_size=2, max_size=20),
)
def test_rate_never_rises_with_load_and_stays_in_bounds(
    base: float, low: float, threshold: float, loads: list[float]
) -> None:
    base, low = max(base, low), min(base, low)
    sampler = AdaptiveSampler(base_rate=base, min_rate=low, threshold=threshold)
    rates = [sampler.rate(load) for load in sorted(loads)]
    assert all(later <= earlier + 1e-12 for earlier, later in itertools.pairwise(rates))
    assert all(low - 1e-12 <= rate <= base + 1e-12 for rate in rates)


def test_sample_keeps_about_rate_of_events() -> None:
    sampler = AdaptiveSampler(base_rate=1.0, min_rate=0.0, threshold=0.0, rng=random.Random(3))
    sampler.update(0.75)  # rate 0.25
    kept = sum(sampler.sample() for _ in range(4000))
    assert 850 < kept < 1150
    assert (sampler.kept_total, sampler.dropped_total) == (kept, 4000 - kept)


def test_extreme_rates_are_exact() -> None:
    sampler = AdaptiveSampler(base_rate=1.0, min_rate=0.0, threshold=0.5)
    assert all(sampler() for _ in range(100))
    sampler.update(1.0)
    assert not any(sampler() for _ in range(100))


def test_follows_a_throttler_by_itself() -> None:
    throttler = Throttler(max_concurrency=2, max_queue=2)
    sampler = AdaptiveSampler(base_rate=1.0, min_rate=0.0, threshold=0.0, follow=throttler)
    assert sampler.rate() == 1.0
    with throttler, throttler:  # 2 of 4 places taken: load 0.5
        assert sampler.load == 0.5
        assert sampler.rate() == pytest.approx(0.5)
    assert sampler.rate() == 1.0


def test_follows_a_queue_by_itself() -> None:
    queue = BlockingQueue[int](4)
    sampler = AdaptiveSampler(base_rate=1.0, min_rate=0.2, threshold=0.5, follow=queue)
    rates = []
    for value in range(4):
        queue.put(value)
        rates.append(sampler.rate())
    assert rates == pytest.approx([1.0, 1.0, 0.6, 0.2])


def test_follows_a_callable() -> None:
    load = [0.0]
    sampler = AdaptiveSampler(base_rate=1.0, min_rate=0.0, threshold=0.0, follow=lambda: load[0])
    load[0] = 0.9
    assert sampler.rate() == pytest.approx(0.1)
    with pytest.raises(RuntimeError, match="follows a source"):
        sampler.update(0.1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base_rate": 1.5}, "base_rate must be in \\[0, 1\\], got 1.5"),
        ({"min_rate": -0.1}, "min_rate must be in \\[0, 1\\], got -0.1"),
        ({"base_rate": 0.2, "min_rate": 0.5}, "min_rate must be <= base_rate"),
        ({"threshold": 1.0}, "threshold must be < 1"),
    ],
)
def test_bad_configuration_names_the_parameter(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdaptiveSampler(**kwargs)


def test_bad_source_and_bad_load_are_refused() -> None:
    with pytest.raises(TypeError, match="follow must be"):
        AdaptiveSampler(follow=42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="load must be >= 0"):
        AdaptiveSampler().update(-1)
