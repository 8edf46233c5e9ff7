"""Waiters: one blocked thread or one awaiting task, woken with an outcome.

Shared by the throttler and the toolkit's queues. A waiter is settled (granted, or refused with
a reason) by whichever thread decides, under that structure's own lock; the waiter then wakes,
on its own thread or event loop, and reads its outcome.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Hashable
from typing import Final, Literal

__all__ = ["_GRANTED", "_AsyncWaiter", "_Outcome", "_ThreadWaiter", "_resolve"]

_GRANTED: Final = "granted"
_Outcome = (
    Literal[
        "granted", "overloaded", "queue_full", "queue_timeout", "deadline_exceeded", "cancelled"
    ]
    | None
)


class _ThreadWaiter:
    """A waiting thread: blocks on a lock that the deciding thread releases."""

    __slots__ = ("flow", "granted_at", "lock", "outcome", "rank", "since")

    def __init__(self) -> None:
        self.outcome: _Outcome = None
        # Where it stands in a WaiterQueue (set when queued there).
        self.rank = 0
        self.flow: Hashable = None
        self.since = 0.0
        self.granted_at = 0.0  # time.monotonic() of a grant (the throttler's)
        self.lock = threading.Lock()
        self.lock.acquire()

    @property
    def granted(self) -> bool:
        return self.outcome == _GRANTED

    def grant(self) -> bool:
        """Hand the waiter a slot (or an item); False if it can never run."""
        return self.wake(_GRANTED)

    def wake(self, outcome: _Outcome) -> bool:
        """Settle the wait (a grant or a refusal) and wake the thread; always succeeds."""
        self.outcome = outcome
        self.lock.release()
        return True


class _AsyncWaiter:
    """A waiting task: awaits a future of its own loop, resolved from whichever thread decides."""

    __slots__ = ("flow", "future", "granted_at", "loop", "outcome", "rank", "since", "thread_id")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.outcome: _Outcome = None
        self.rank = 0
        self.flow: Hashable = None
        self.since = 0.0
        self.granted_at = 0.0  # time.monotonic() of a grant (the throttler's)
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.thread_id = threading.get_ident()

    @property
    def granted(self) -> bool:
        return self.outcome == _GRANTED

    def grant(self) -> bool:
        """Hand the waiter a slot (or an item); False if it can never run."""
        return self.wake(_GRANTED)

    def wake(self, outcome: _Outcome) -> bool:
        """Settle the wait and wake the task; False if its loop is closed (it can never run)."""
        if threading.get_ident() == self.thread_id:
            # On the loop's own thread: resolving directly is safe and saves a wake-up.
            _resolve(self.future)
        else:
            try:
                self.loop.call_soon_threadsafe(_resolve, self.future)
            except RuntimeError:
                return False
        self.outcome = outcome
        return True


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
