"""Client-side limits on extra load: a retry budget and adaptive throttling.

Framework-free and thread-safe: one instance may be shared by many clients, sync or async.
Each keeps counts over a sliding window; every lock is held for a few additions only, never
across I/O or an ``await``.
"""

from __future__ import annotations

import math
import random as _random
import threading
import time
from collections import deque
from collections.abc import Callable

from shedder._core.checks import check_callable, check_number, check_seconds, shown

__all__ = ["AdaptiveThrottle", "ClientThrottled", "RetryBudget"]

_SLICES = 10  # a window is kept as this many slices: counts expire a slice at a time
_MIN_WINDOW = 0.001
_MAX_WINDOW = 366 * 86_400
# Ratios and rates beyond this mean "no limit" and would overflow the arithmetic: say so.
_MAX_FIGURE = 1e12


class _SlidingCounts:
    """Counts of a few kinds of events over the last ``window`` seconds (not locked)."""

    __slots__ = ("_clock", "_kinds", "_slice", "_slices")

    def __init__(self, window: float, kinds: int, clock: Callable[[], float]) -> None:
        self._slice = window / _SLICES
        self._kinds = kinds
        self._clock = clock
        # [slice number, count of kind 0, count of kind 1, ...], oldest first.
        self._slices: deque[list[int]] = deque()

    def _current(self) -> list[int]:
        now_slice = math.floor(self._clock() / self._slice)
        while self._slices and self._slices[0][0] <= now_slice - _SLICES:
            self._slices.popleft()
        if not self._slices or self._slices[-1][0] != now_slice:
            self._slices.append([now_slice] + [0] * self._kinds)
        return self._slices[-1]

    def add(self, kind: int) -> None:
        self._current()[kind + 1] += 1

    def totals(self) -> list[int]:
        self._current()
        return [sum(counts[kind + 1] for counts in self._slices) for kind in range(self._kinds)]


class _Windowed:
    """A lock and two counts over a sliding window: what budgets and throttles share."""

    def __init__(self, window: float, clock: Callable[[], float]) -> None:
        window = check_seconds("window", window)
        # The clock is divided by a tenth of the window: a subnormal window (1e-320) would
        # overflow that on first use; a millisecond is finer than any budget needs, and a
        # window of more than a year would make the allowance infinite.
        if not _MIN_WINDOW <= window <= _MAX_WINDOW:
            raise ValueError(
                f"window must be between {_MIN_WINDOW} and {_MAX_WINDOW} seconds,"
                f" got {shown(window)}"
            )
        check_callable("clock", clock)
        self.window = window
        self._lock = threading.Lock()
        self._counts = _SlidingCounts(window, 2, clock)


class RetryBudget(_Windowed):
    """Caps retries at ``ratio`` of recent requests plus ``min_retries_per_second``.

    Over the last ``window`` seconds, retries may number at most
    ``ratio * requests + min_retries_per_second * window``, where ``requests`` counts first
    attempts only (so retries add at most ``ratio`` to the load a server sees, once traffic is
    large enough for the floor not to matter). This is the retry budget of Finagle and Linkerd
    (defaults 20 %, 10/s, 10 s). Thread-safe; share one instance between clients that talk to
    the same service so that together they cannot multiply its load.

    ``clock`` returns monotonic seconds (injectable for tests).
    """

    _REQUEST, _RETRY = 0, 1

    def __init__(
        self,
        ratio: float = 0.2,
        min_retries_per_second: float = 10.0,
        window: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        ratio = check_number("ratio", ratio, 0.0, _MAX_FIGURE)
        min_retries_per_second = check_number(
            "min_retries_per_second", min_retries_per_second, 0.0, _MAX_FIGURE
        )
        super().__init__(window, clock)
        self.ratio = ratio
        self.min_retries_per_second = min_retries_per_second

    def deposit(self) -> None:
        """Counts a first attempt: each one earns ``ratio`` of a retry."""
        with self._lock:
            self._counts.add(self._REQUEST)

    def try_withdraw(self) -> bool:
        """Spends one retry if the budget allows it; False means: do not retry."""
        with self._lock:
            if self._balance() < 1:
                return False
            self._counts.add(self._RETRY)
            return True

    def balance(self) -> float:
        """How many retries the budget allows right now (may be fractional)."""
        with self._lock:
            return self._balance()

    def _balance(self) -> float:
        requests, retries = self._counts.totals()
        allowed = self.ratio * requests + self.min_retries_per_second * self.window
        return max(0.0, allowed - retries)

    def __repr__(self) -> str:
        return (
            f"RetryBudget(ratio={self.ratio}, min_retries_per_second="
            f"{self.min_retries_per_second}, window={self.window})"
        )


class ClientThrottled(Exception):
    """A request was refused by the client itself, without being sent (adaptive throttling).

    The server has been refusing most recent requests; ``probability`` is the chance with
    which this client currently refuses locally, from ``requests`` and ``accepts`` counted
    over the throttle's window.
    """

    def __init__(self, probability: float, requests: int, accepts: int) -> None:
        super().__init__(probability, requests, accepts)
        self.probability = probability
        self.requests = requests
        self.accepts = accepts

    def __str__(self) -> str:
        return (
            f"request refused locally by adaptive throttling: the server accepted {self.accepts} "
            f"of the last {self.requests} requests (refusing with probability "
            f"{self.probability:.2f})"
        )


class AdaptiveThrottle(_Windowed):
    """Client-side adaptive throttling, from Google's SRE book ("Handling Overload").

    Over the last ``window`` seconds the client counts ``requests`` (every attempt, including
    those it refused itself) and ``accepts`` (attempts the server answered with something other
    than a refusal). A new attempt is refused locally with probability
    ``max(0, (requests - k * accepts) / (requests + 1))``: while the server accepts at least
    one in ``k`` requests nothing is refused; beyond that, the client stops sending work the
    server would refuse anyway. ``k`` >= 1 (default 2): lower is more aggressive.
    Thread-safe and shareable. ``clock`` (monotonic seconds) and ``random`` (uniform in
    [0, 1)) are injectable for tests.
    """

    _REQUEST, _ACCEPT = 0, 1

    def __init__(
        self,
        k: float = 2.0,
        window: float = 120.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = _random.random,
    ) -> None:
        k = check_number("k", k, 1.0, _MAX_FIGURE)
        super().__init__(window, clock)
        self.k = k
        self._random = check_callable("random", random)

    def reject_probability(self) -> float:
        """The current chance that :meth:`admit` refuses, in [0, 1)."""
        with self._lock:
            return self._probability(*self._counts.totals())

    def _probability(self, requests: int, accepts: int) -> float:
        return max(0.0, (requests - self.k * accepts) / (requests + 1))

    def admit(self) -> None:
        """Counts an attempt, or refuses it with :class:`ClientThrottled` (also counted)."""
        with self._lock:
            requests, accepts = self._counts.totals()
            probability = self._probability(requests, accepts)
            self._counts.add(self._REQUEST)
        # Draw outside the lock: ``random`` is user code.
        if probability > 0 and self._random() < probability:
            raise ClientThrottled(probability, requests + 1, accepts)

    def record_accepted(self) -> None:
        """Counts an attempt the server accepted (answered, not refused)."""
        with self._lock:
            self._counts.add(self._ACCEPT)

    def __repr__(self) -> str:
        return f"AdaptiveThrottle(k={self.k}, window={self.window})"
