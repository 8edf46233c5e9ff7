"""What the target app records for a benchmark (``SHEDDER_DEMO_RECORD``): see settings.py.

Two things, both read back through ``GET /bench/stats`` before the server is stopped:

- **The throttler's state over time**, sampled by a daemon thread every ``period`` seconds:
  the current limit, in flight, queued, CoDel's standing flag, the limit algorithm's own
  figures (Vegas: estimate, rtt_noload, probe phase) and refusals so far by reason. Read
  without the throttler's lock, from private attributes where there is no public one: a
  benchmark instrument, which shows ``None`` for what a refactored throttler no longer has.
- **Requests that reached the app after their client's deadline**: the generator stamps each
  request with its scheduled send time (``x-bench-scheduled``, ``time.monotonic()``, a clock
  every process on the host shares) and the client's timeout
  (``x-envoy-expected-rq-timeout-ms``); the app notes, as the request reaches it, whether that
  deadline has already passed. Work started after it is work nobody waits for.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

__all__ = ["Recorder"]

SCHEDULED_HEADER = "x-bench-scheduled"
DEADLINE_HEADER = "x-envoy-expected-rq-timeout-ms"


class Recorder:
    """Samples ``throttler`` every ``period`` s (from the first call to :meth:`start`) and counts
    requests that reach the app before and after their deadline."""

    def __init__(self, period: float) -> None:
        self.period = period
        self.throttler: Any = None
        self.samples: list[dict[str, Any]] = []
        self.started = 0
        self.late = 0
        self.unstamped = 0
        self.lateness: list[float] = []  # seconds past the deadline, of the late ones
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def watch(self, throttler: Any) -> None:
        """Sample ``throttler`` from now on (a daemon thread; the server's exit ends it)."""
        self.throttler = throttler
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="bench-recorder", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        next_at = time.monotonic()
        while True:
            # An instrument inside a benchmark target, not library code: sampling is the point.
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at += self.period
            sample = self._sample()
            with self._lock:
                self.samples.append(sample)

    def _sample(self) -> dict[str, Any]:
        t = self.throttler
        limit = t.limit_algorithm
        stats = t.stats()
        return {
            "t": round(time.monotonic(), 4),
            "limit": stats.max_concurrency,
            "in_flight": stats.in_flight,
            "queued": stats.queued,
            "standing": getattr(t.discipline, "standing", None),
            "admitted": stats.admitted_total,
            "shed": dict(stats.shed_total),
            "estimate": _rounded(getattr(limit, "estimate", None)),
            "rtt_noload_ms": _rounded(getattr(limit, "rtt_noload", None), 1000.0),
            "probe_phase": getattr(limit, "_probe_phase", None),
            # What deadline-aware admission works from: the pace of service while saturated
            # and the time kept for the work (Deadlines(margin="auto")).
            "release_gap_ms": _rounded(getattr(t, "_release_gap", None), 1000.0),
            "work_reserve_ms": _rounded(_work_reserve(t), 1000.0),
            "rounds_to_probe": getattr(limit, "_rounds_to_probe", None),
        }

    def arrived(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """A request reached the app (ASGI header pairs): was its deadline already past?"""
        scheduled = timeout_ms = None
        for name, value in headers:
            if name == b"x-bench-scheduled":
                scheduled = float(value)
            elif name == b"x-envoy-expected-rq-timeout-ms":
                timeout_ms = float(value)
        self._count(scheduled, timeout_ms)

    def arrived_wsgi(self, environ: dict[str, Any]) -> None:
        """The same for a WSGI request."""
        scheduled = environ.get("HTTP_X_BENCH_SCHEDULED")
        timeout_ms = environ.get("HTTP_X_ENVOY_EXPECTED_RQ_TIMEOUT_MS")
        self._count(
            None if scheduled is None else float(scheduled),
            None if timeout_ms is None else float(timeout_ms),
        )

    def _count(self, scheduled: float | None, timeout_ms: float | None) -> None:
        now = time.monotonic()
        with self._lock:
            self.started += 1
            if scheduled is None or timeout_ms is None:
                self.unstamped += 1
                return
            past = now - (scheduled + timeout_ms / 1000.0)
            if past > 0:
                self.late += 1
                self.lateness.append(past)

    def report(self) -> dict[str, Any]:
        """Everything recorded so far, JSON-ready (times in ``time.monotonic()`` seconds)."""
        with self._lock:
            lateness = sorted(self.lateness)
            return {
                "period": self.period,
                "started": self.started,
                "late": self.late,
                "unstamped": self.unstamped,
                "late_p50_ms": _rounded(lateness[len(lateness) // 2], 1000) if lateness else None,
                "late_max_ms": _rounded(lateness[-1], 1000) if lateness else None,
                "samples": list(self.samples),
            }


def _work_reserve(throttler: Any) -> float | None:
    """The auto margin, read without switching on its measurement (as ``_work_reserve()``
    would: a throttler without deadlines must not start measuring for the instrument)."""
    mean = getattr(throttler, "_mean_hold", None)
    deviation = getattr(throttler, "_hold_deviation", None)
    if not isinstance(mean, float) or not isinstance(deviation, float):
        return None
    return mean + 4.0 * deviation


def _rounded(value: Any, scale: float = 1.0) -> float | None:
    if not isinstance(value, (int, float)):
        return None
    return round(float(value) * scale, 3)
