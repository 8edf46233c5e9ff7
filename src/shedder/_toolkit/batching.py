"""Adaptive batch sizing: the largest batches that still finish within a time budget."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from time import monotonic

from shedder._core.checks import (
    check_callable,
    check_fraction,
    check_int,
    check_number,
    check_seconds,
    shown,
)

__all__ = ["MAX_BATCH_SIZE", "AdaptiveBatchSizer"]

MAX_BATCH_SIZE = 2**31 - 1
"""The largest batch size :class:`AdaptiveBatchSizer` accepts (the sizes are computed in
floating point; anything near this is already far more than one batch should hold)."""
_MAX_GROWTH = 1e6


class AdaptiveBatchSizer:
    """Chooses the next batch size from how long the previous batches took.

    It estimates the time per item (a moving average that follows slowdowns at once and
    speed-ups gradually) and aims each batch at ``target`` x ``budget`` seconds: when a batch
    nears or passes the budget the next one shrinks in proportion; with slack it grows, by at
    most ``max_growth`` times per batch. Always within ``[min_size, max_size]``. This is the
    loop behind backpressured consumers: ask the broker for :attr:`size` items, process them,
    :meth:`record` how long it took.

    Args:
        budget: seconds a batch may take (e.g. well under a consumer's poll or lease timeout).
        min_size, max_size: bounds of the batch size (1 <= min_size <= max_size).
        initial: the first size (default ``min_size``).
        target: fraction of the budget to aim at, leaving headroom for noise (0 < target <= 1).
        max_growth: largest factor by which one batch may exceed the previous one (> 1).
        smoothing: weight of the newest observation in the average, when it is faster (0..1].
        clock: ``time.monotonic`` or a fake, for :meth:`measure`.

    Thread-safe.
    """

    def __init__(
        self,
        budget: float,
        *,
        min_size: int = 1,
        max_size: int = 1000,
        initial: int | None = None,
        target: float = 0.8,
        max_growth: float = 2.0,
        smoothing: float = 0.3,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        self.budget = check_seconds("budget", budget, positive=True, finite=True)
        self.min_size = check_int("min_size", min_size, 1, MAX_BATCH_SIZE)
        self.max_size = check_int("max_size", max_size, min_size, MAX_BATCH_SIZE)
        start = min_size if initial is None else check_int("initial", initial, min_size)
        if start > max_size:
            raise ValueError(f"initial must be <= max_size ({max_size}), got {shown(start)}")
        self.target = check_fraction("target", target)
        if self.target == 0:
            raise ValueError(f"target must be > 0, got {shown(target)}")
        self.max_growth = check_number("max_growth", max_growth, 1.0, _MAX_GROWTH)
        if self.max_growth == 1:
            raise ValueError(f"max_growth must be > 1, got {shown(max_growth)}")
        self.smoothing = check_fraction("smoothing", smoothing)
        if self.smoothing == 0:
            raise ValueError(f"smoothing must be > 0, got {shown(smoothing)}")
        self._clock = check_callable("clock", clock)
        self._size = start
        self._per_item: float | None = None  # estimated seconds per item
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        """How many items to fetch for the next batch."""
        return self._size

    @property
    def seconds_per_item(self) -> float | None:
        """The current estimate, or None before the first non-empty batch."""
        return self._per_item

    def record(self, size: int, elapsed: float) -> int:
        """Report that a batch of ``size`` items took ``elapsed`` seconds; returns the next size.

        Empty batches carry no information and leave the size alone.
        """
        check_int("size", size, 0)
        check_seconds("elapsed", elapsed)
        with self._lock:
            if size == 0:
                return self._size
            observed = elapsed / size
            if self._per_item is None or observed >= self._per_item:
                # Slower: believe it at once, the budget is at stake.
                self._per_item = observed
            else:
                self._per_item += self.smoothing * (observed - self._per_item)
            if self._per_item <= 0:
                ideal = float(self.max_size)
            else:
                ideal = self.target * self.budget / self._per_item
            ideal = min(ideal, self._size * self.max_growth)
            self._size = max(self.min_size, min(self.max_size, math.floor(ideal)))
            return self._size

    @contextmanager
    def measure(self, size: int) -> Iterator[None]:
        """Time the ``with`` block as processing a batch of ``size`` items and :meth:`record`
        it (also when the block raises: a failing batch still took that long)."""
        started = self._clock()
        try:
            yield
        finally:
            self.record(size, max(self._clock() - started, 0.0))

    def __repr__(self) -> str:
        return f"<AdaptiveBatchSizer size={self._size} in [{self.min_size}, {self.max_size}]>"
