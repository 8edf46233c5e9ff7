"""Concurrency limit algorithms: how many slots a throttler offers, learned from latency.

Pass one as ``Throttler(max_concurrency=VegasLimit())``. The throttler reads ``limit`` on every
admission and calls :meth:`Limit.update` with each completed request's slot time (``rtt``),
inside the critical section it already holds: the algorithms are a few float operations and
never block, so adapting costs no extra lock. Queue timeouts are not fed in as drops: they mean
more arrivals than the service takes, which a lower limit cannot fix (it would only shed more).
``dropped=True`` is for callers that know a request failed for congestion (a backend timeout).

The algorithms follow the published ones (TCP Vegas and AIMD congestion control, and
Netflix's concurrency-limits Gradient2), written anew with their published defaults except where
noted: a web handler's right limit is often single digits, so minimum limits default to 1.
"""

from __future__ import annotations

import math
import random

from .checks import check_bool, check_fraction, check_instance, check_int, check_seconds

__all__ = ["AIMDLimit", "FixedLimit", "Gradient2Limit", "Limit", "VegasLimit"]


# A concurrency limit is computed in floating point (estimates, gradients): past a million
# slots nothing here means anything, and 10**400 would overflow the arithmetic.
MAX_LIMIT = 1_000_000
_MAX_WINDOW = 1_000_000_000  # samples or rounds


def _check_limits(initial: int, min_limit: int, max_limit: int) -> None:
    for name, value in (("initial", initial), ("min_limit", min_limit), ("max_limit", max_limit)):
        check_int(name, value, 1, MAX_LIMIT)
    if max_limit < min_limit:
        raise ValueError(f"max_limit must be >= min_limit ({min_limit}), got {max_limit}")
    if not min_limit <= initial <= max_limit:
        raise ValueError(f"initial must be in [{min_limit}, {max_limit}], got {initial}")


def _log10_root(limit: float) -> int:
    """Vegas's step: max(1, floor(log10(limit))), growing as sqrt past 1000."""
    whole = int(limit)
    return max(1, int(math.log10(whole))) if whole < 1000 else int(math.sqrt(whole))


class Limit:
    """Base class of limit algorithms: the current ``limit`` and how it learns.

    Samples are gathered over one round (about ``limit`` completions, the time every slot takes
    to turn over once, like a TCP round trip) and the algorithm runs once per round on the
    round's mean RTT (over the samples that were not drops; 0.0 if none), its highest in-flight
    count and whether anything was dropped: reacting to every sample overshoots, because a change
    of limit shows in latency only a round later.

    Subclasses override :meth:`_adjust`. One instance belongs to one throttler, which calls
    :meth:`update` under its lock; do not share an instance between throttlers.
    """

    def __init__(self, initial: int) -> None:
        self.limit = initial
        """The current concurrency limit (int >= 1)."""
        self._round_samples = 0
        self._round_rtt_samples = 0
        self._round_rtt = 0.0
        self._round_in_flight = 0
        self._round_dropped = False

    def update(self, rtt: float, in_flight: int, dropped: bool) -> int:
        """Learn from one sample and return the (possibly new) limit.

        ``rtt`` is the seconds the request held its slot (or waited, for a drop), ``in_flight``
        the requests in flight when it finished, ``dropped`` True for a request that failed for
        congestion (the throttler itself never reports queue timeouts as drops).
        """
        self._round_samples += 1
        self._round_in_flight = max(self._round_in_flight, in_flight)
        if dropped:
            # A drop's time is a queue wait, not a service time: it counts, but not as latency.
            self._round_dropped = True
        else:
            self._round_rtt_samples += 1
            self._round_rtt += rtt
        if self._round_samples >= self.limit:
            measured = self._round_rtt_samples
            mean_rtt = self._round_rtt / measured if measured else 0.0
            self.limit = max(1, self._adjust(mean_rtt, self._round_in_flight, self._round_dropped))
            self._round_samples = self._round_rtt_samples = self._round_in_flight = 0
            self._round_rtt = 0.0
            self._round_dropped = False
        return self.limit

    def _adjust(self, rtt: float, in_flight: int, dropped: bool) -> int:
        """One round's decision: the new limit from its mean RTT, peak in-flight and drops."""
        return self.limit

    def __repr__(self) -> str:
        return f"{type(self).__name__}(limit={self.limit})"


class FixedLimit(Limit):
    """A constant limit: the behaviour of ``Throttler(max_concurrency=n)``."""

    def __init__(self, limit: int) -> None:
        super().__init__(check_int("limit", limit, 1, MAX_LIMIT))


class AIMDLimit(Limit):
    """Loss-based: +1 while busy and healthy, multiply by ``backoff_ratio`` on a drop.

    A request whose slot time exceeds ``timeout`` seconds counts as a drop. The limit grows only
    while at least half of it is in use, so an idle service does not inflate it.
    """

    def __init__(
        self,
        initial: int = 10,
        *,
        min_limit: int = 1,
        max_limit: int = 200,
        backoff_ratio: float = 0.9,
        timeout: float = 5.0,
    ) -> None:
        _check_limits(initial, min_limit, max_limit)
        self.min_limit, self.max_limit = min_limit, max_limit
        self.backoff_ratio = check_fraction("backoff_ratio", backoff_ratio, 0.5, 1.0)
        if self.backoff_ratio == 1.0:
            raise ValueError(f"backoff_ratio must be in [0.5, 1.0), got {backoff_ratio!r}")
        self.timeout = check_seconds("timeout", timeout)
        if self.timeout == 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        super().__init__(initial)

    def _adjust(self, rtt: float, in_flight: int, dropped: bool) -> int:
        limit = self.limit
        if dropped or rtt > self.timeout:
            limit = min(limit - 1, int(limit * self.backoff_ratio))
        elif in_flight * 2 >= limit:
            limit += 1
        return max(self.min_limit, min(self.max_limit, limit))


class VegasLimit(Limit):
    """Delay-based, after TCP Vegas: estimate the queue from the no-load RTT and keep it small.

    Once per round, ``queue = limit * (1 - rtt_noload / rtt)`` from the round's mean RTT. With
    ``step = max(1, floor(log10(limit)))``: no queue (<= step) grows the limit by 6*step; a queue
    under 3*step grows it by step; a queue over 6*step (or a drop) shrinks it by step; in between
    it holds. The limit does not grow while under half of it is in use.

    ``rtt_noload`` is the smallest *round mean* RTT seen: the same statistic it is compared
    with (as Netflix's concurrency-limits feeds Vegas a windowed average). Not the smallest
    single RTT: one fast request (a readiness probe through the throttler, a cached answer, a
    404) would make every later round look queued, ``queue ~ limit``, and shrink the limit a
    step per round to where the hold band begins (6 below 100), below the service's real
    concurrency, until the next probe seconds later (measured: 11-20% refused at 0.9x from a
    cold start, issue 13). A standing queue hides the true no-load RTT, and a service may
    become slower for good, so every ``probe_interval`` rounds (jittered to 50-100%) the limit
    drops to ``probe_limit`` until in-flight work drains, and the mean RTT of the next
    ``2 * probe_limit`` requests admitted after the drain becomes the new ``rtt_noload`` (as
    Envoy's adaptive concurrency filter measures its minimum RTT, with a mean instead of a
    minimum for the same reason). Then the limit is restored.

    With ``startup_probe`` (the default), a first round that shows queueing (its mean RTT over
    1.5x its second-smallest) ends in a probe: a service started under load queues its first
    requests behind each other (their mean was 33 ms for a 20 ms service at 4x on the
    benchmark), and that is no no-load RTT. Envoy's filter also begins with a minimum-RTT
    measurement; probing only on evidence spares a service started at ordinary load the dip
    (measured: up to 18 requests refused in its 0.2 s at 0.9x).
    """

    def __init__(
        self,
        initial: int = 20,
        *,
        min_limit: int = 1,
        max_limit: int = 1000,
        smoothing: float = 1.0,
        probe_interval: int = 250,
        probe_limit: int = 3,
        startup_probe: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        _check_limits(initial, min_limit, max_limit)
        self.min_limit, self.max_limit = min_limit, max_limit
        self.smoothing = check_fraction("smoothing", smoothing, 0.0, 1.0)
        check_bool("startup_probe", startup_probe)
        check_int("probe_interval", probe_interval, 1, _MAX_WINDOW)
        check_int("probe_limit", probe_limit, 1, MAX_LIMIT)
        self.probe_interval = probe_interval
        self.probe_limit = probe_limit
        self._rng = (
            random.Random()
            if rng is None
            else check_instance("rng", rng, random.Random, "a random.Random or None")
        )
        self.estimate = float(initial)
        self.rtt_noload = 0.0
        self._rounds_to_probe = self._next_probe()
        self._startup_check = startup_probe
        # The first round's two smallest RTTs: the second is what its requests take without
        # queueing, even if one request (a health check, a cached answer) was much faster.
        self._round_low = self._round_low2 = math.inf
        self._probe_phase = 0  # 0: not probing, 1: draining, 2: measuring
        self._probe_left = 0
        self._probe_skip = 0
        self._probe_sum = 0.0
        self._probe_samples = 0
        super().__init__(initial)

    def _next_probe(self) -> int:
        return max(1, round(self.probe_interval * self._rng.uniform(0.5, 1.0)))

    def update(self, rtt: float, in_flight: int, dropped: bool) -> int:
        if self._probe_phase:
            return self._probe(rtt, in_flight)
        if self._startup_check and not dropped and 0 < rtt < self._round_low2:
            if rtt < self._round_low:
                self._round_low, self._round_low2 = rtt, self._round_low
            else:
                self._round_low2 = rtt
        return super().update(rtt, in_flight, dropped)

    def _probe(self, rtt: float, in_flight: int) -> int:
        if self._probe_phase == 1:
            if in_flight <= self.probe_limit:  # drained: what is admitted now never queues
                self._probe_phase = 2
                self._probe_left = 2 * self.probe_limit
                # The others still in flight were admitted before the drain and may have
                # queued behind it: their times say nothing about no-load latency.
                self._probe_skip = in_flight - 1
                self._probe_sum = 0.0
                self._probe_samples = 0
            return self.limit
        if self._probe_skip > 0:
            self._probe_skip -= 1
            return self.limit
        if rtt > 0:
            self._probe_sum += rtt
            self._probe_samples += 1
        self._probe_left -= 1
        if self._probe_left <= 0:
            if self._probe_samples:
                self.rtt_noload = self._probe_sum / self._probe_samples
            self._probe_phase = 0
            self.limit = max(self.min_limit, int(self.estimate))
        return self.limit

    def _adjust(self, rtt: float, in_flight: int, dropped: bool) -> int:
        low = self._round_low2 if self._round_low2 < math.inf else self._round_low
        self._round_low = self._round_low2 = math.inf
        if rtt > 0 and (rtt < self.rtt_noload or self.rtt_noload == 0.0):
            self.rtt_noload = rtt
        if not dropped and (rtt <= 0 or self.rtt_noload <= 0):
            return self.limit
        self._rounds_to_probe -= 1
        startup, self._startup_check = self._startup_check, False
        if self._rounds_to_probe <= 0 or (startup and rtt > 1.5 * low):
            self._rounds_to_probe = self._next_probe()
            self._probe_phase = 1
            return max(1, min(self.probe_limit, self.limit))
        estimate = self.estimate
        step = _log10_root(estimate)
        queue = math.ceil(estimate * (1 - self.rtt_noload / rtt)) if rtt > 0 else 0
        if dropped:
            target = estimate - step
        elif in_flight * 2 < estimate:
            return self.limit  # app-limited: no evidence either way
        elif queue <= step:
            target = estimate + 6 * step
        elif queue < 3 * step:
            target = estimate + step
        elif queue > 6 * step:
            target = estimate - step
        else:
            return self.limit
        target = max(self.min_limit, min(self.max_limit, target))
        self.estimate = (1 - self.smoothing) * estimate + self.smoothing * target
        return max(self.min_limit, int(self.estimate))


class Gradient2Limit(Limit):
    """Gradient of long-term over short-term RTT (Netflix's Gradient2).

    ``gradient = clamp(long_rtt / rtt, 0.5, 1)`` and
    ``limit <- (1 - smoothing) * limit + smoothing * (limit * gradient + queue_size)``, where
    ``long_rtt`` is an exponential average over ``long_window`` samples that is pulled down
    quickly once latency recovers. The limit does not grow while under half of it is in use.
    """

    def __init__(
        self,
        initial: int = 20,
        *,
        min_limit: int = 1,
        max_limit: int = 200,
        smoothing: float = 0.2,
        queue_size: int = 4,
        long_window: int = 600,
    ) -> None:
        _check_limits(initial, min_limit, max_limit)
        self.min_limit, self.max_limit = min_limit, max_limit
        self.smoothing = check_fraction("smoothing", smoothing, 0.0, 1.0)
        self.queue_size = check_int("queue_size", queue_size, 0, MAX_LIMIT)
        check_int("long_window", long_window, 1, _MAX_WINDOW)
        self._factor = 2.0 / (long_window + 1)
        self._warmup = 10
        self._samples = 0
        self.long_rtt = 0.0
        self.estimate = float(initial)
        super().__init__(initial)

    def _adjust(self, rtt: float, in_flight: int, dropped: bool) -> int:
        if rtt <= 0:
            return self.limit
        if self._samples < self._warmup:  # plain mean until the average means something
            self._samples += 1
            self.long_rtt += (rtt - self.long_rtt) / self._samples
        else:
            self.long_rtt += (rtt - self.long_rtt) * self._factor
        if self.long_rtt / rtt > 2:
            # Latency is back to normal after a long overload: let the baseline follow fast.
            self.long_rtt *= 0.9
        if in_flight < self.estimate / 2:
            return self.limit
        gradient = max(0.5, min(1.0, self.long_rtt / rtt))
        target = self.estimate * gradient + self.queue_size
        target = self.estimate * (1 - self.smoothing) + target * self.smoothing
        self.estimate = max(self.min_limit, min(self.max_limit, target))
        return int(self.estimate)
