"""A simulated database: ``pool`` connections, each busy exactly ``hold`` seconds per query.

Queries take the connection that frees first, in arrival order (FIFO), so the database serves
exactly ``pool / hold`` queries per second however late the caller's timer wakes it.

Why not ``async with Semaphore(pool): await asyncio.sleep(hold)``: asyncio's epoll selector
rounds every wait *up* to the next millisecond, so that sleep lasts 20.5 ms on average for 20,
and the connection is held until the task runs again. Measured here, that caps the "400 req/s"
app at 392 req/s with no HTTP at all, about 385 behind uvicorn: 2-4% of capacity lost to timer
granularity would be charged to whatever sits in front of the app. Booking connections by the
clock keeps the modelled capacity at exactly P/S; a late wake-up only delays that one answer.
"""

from __future__ import annotations

import asyncio
import heapq
import threading
import time
from collections.abc import Callable

__all__ = ["SimulatedDatabase"]


class SimulatedDatabase:
    """``pool`` connections held ``hold`` seconds per query; usable from threads and tasks.

    ``slowdown(elapsed)``, if given, multiplies the hold of a query that starts ``elapsed``
    seconds after the first query was booked: capacity that changes mid-run.
    """

    def __init__(
        self, pool: int, hold: float, slowdown: Callable[[float], float] | None = None
    ) -> None:
        if pool < 1:
            raise ValueError(f"pool must be >= 1, got {pool}")
        if not hold > 0:
            raise ValueError(f"hold must be > 0 seconds, got {hold}")
        self.pool = pool
        self.hold = hold
        self._free_at = [0.0] * pool  # a heap of the times each connection frees
        self._lock = threading.Lock()
        self._slowdown = slowdown
        self._epoch: float | None = None  # when the first query was booked

    def book(self) -> float:
        """Reserve the connection that frees first; return when this query will be done.

        The time is on the :func:`time.monotonic` clock (asyncio's default loop clock).
        """
        now = time.monotonic()
        with self._lock:
            start = max(now, self._free_at[0])
            hold = self.hold
            if self._slowdown is not None:
                if self._epoch is None:
                    self._epoch = now
                hold *= self._slowdown(start - self._epoch)
            done = start + hold
            heapq.heapreplace(self._free_at, done)
        return done

    def backlog(self) -> float:
        """Seconds until a query booked now would start (0.0 while a connection is free)."""
        with self._lock:
            return max(0.0, self._free_at[0] - time.monotonic())

    def query(self) -> None:
        """Run one query from a thread: block until it is done."""
        done = self.book()
        while (left := done - time.monotonic()) > 0:
            time.sleep(left)

    async def query_async(self) -> None:
        """Run one query from a task: await until it is done.

        Never earlier: uvloop computes timers from a loop time cached at the start of each
        iteration, so under CPU pressure a sleep can end before the monotonic deadline
        (measured: queries of 13-19 ms for 20 on a loaded host), and the answer would leave
        before its connection frees.
        """
        done = self.book()
        for _ in range(64):  # each early wake is bounded by a loop iteration: retry, bounded
            left = done - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(left)
