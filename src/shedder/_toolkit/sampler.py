"""An adaptive sampler: keep everything while load is low, less and less as it rises."""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from shedder._core.checks import check_fraction, check_instance
from shedder._core.throttler import Throttler

__all__ = ["AdaptiveSampler", "SupportsLoad"]


@runtime_checkable
class SupportsLoad(Protocol):
    """Anything with a ``load`` figure from 0.0 (idle) to 1.0 (full), like the shedder queues."""

    @property
    def load(self) -> float: ...


LoadSource = Throttler | SupportsLoad | Callable[[], float]


class AdaptiveSampler:
    """Decides whether to keep an event (a trace, a log line, an optional task) given the load.

    The keep rate is ``base_rate`` while load <= ``threshold``, then falls linearly to
    ``min_rate`` at load 1.0 (and stays there above it). The load comes from ``follow`` when
    given, read at every decision: a :class:`~shedder.Throttler` (its ``stats().load``), a queue
    or anything with a ``load`` property, or a callable returning a float. Without ``follow``,
    feed it with :meth:`update`.

    Args:
        base_rate: probability of keeping an event at low load (0..1).
        min_rate: probability at full load (0..base_rate).
        threshold: load where the rate starts to fall (0 <= threshold < 1).
        rng: a ``random.Random`` for reproducible decisions.

    Thread-safe; a decision takes no lock beyond the followed source's own.
    """

    def __init__(
        self,
        base_rate: float = 1.0,
        min_rate: float = 0.01,
        threshold: float = 0.5,
        *,
        follow: LoadSource | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.base_rate = check_fraction("base_rate", base_rate)
        self.min_rate = check_fraction("min_rate", min_rate)
        if self.min_rate > self.base_rate:
            raise ValueError(f"min_rate must be <= base_rate ({base_rate}), got {min_rate}")
        self.threshold = check_fraction("threshold", threshold)
        if self.threshold == 1.0:
            raise ValueError("threshold must be < 1, got 1.0")
        self._read_load: Callable[[], float] | None
        if follow is None:
            self._read_load = None
        elif isinstance(follow, Throttler):
            throttler = follow
            self._read_load = lambda: throttler.stats().load
        elif isinstance(follow, SupportsLoad):
            source = follow
            self._read_load = lambda: source.load
        elif callable(follow):
            self._read_load = follow
        else:
            raise TypeError(
                "follow must be a Throttler, an object with a load property or a callable, "
                f"got {type(follow).__name__}"
            )
        self._load = 0.0
        self._random = (
            random.Random()
            if rng is None
            else check_instance("rng", rng, random.Random, "a random.Random or None")
        )
        self._lock = threading.Lock()  # random.Random is not documented as thread-safe
        self.kept_total = 0
        self.dropped_total = 0

    @property
    def load(self) -> float:
        """The load the next decision uses: the followed source's, or the last fed figure."""
        return self._read_load() if self._read_load is not None else self._load

    def update(self, load: float) -> None:
        """Feed the current load (0.0 to 1.0; values above 1 count as 1)."""
        if self._read_load is not None:
            raise RuntimeError("this sampler follows a source; update() is for manual feeding")
        if math.isnan(load) or load < 0:
            raise ValueError(f"load must be >= 0, got {load}")
        self._load = float(load)

    def rate(self, load: float | None = None) -> float:
        """The keep probability at ``load`` (default: the current load)."""
        load = self.load if load is None else load
        if load <= self.threshold:
            return self.base_rate
        if load >= 1.0:
            return self.min_rate
        fall = (load - self.threshold) / (1.0 - self.threshold)
        return self.base_rate - (self.base_rate - self.min_rate) * fall

    def sample(self) -> bool:
        """True to keep this event, with probability :meth:`rate` at the current load."""
        rate = self.rate()
        with self._lock:
            keep = rate >= 1.0 or (rate > 0.0 and self._random.random() < rate)
            if keep:
                self.kept_total += 1
            else:
                self.dropped_total += 1
        return keep

    __call__ = sample

    def __repr__(self) -> str:
        return (
            f"<AdaptiveSampler {self.base_rate}->{self.min_rate} above load {self.threshold},"
            f" now {self.rate():.3f}>"
        )
