"""Bounded queues for threads and asyncio tasks: blocking, dropping and monitored.

One locked core serves every flavour: the state lives behind a ``threading.Lock`` held for a few
attribute updates, and the waiting is done outside it by thin layers, a lock per waiting thread
or a future per waiting task (resolved with ``call_soon_threadsafe`` from other threads), the
same waiters the :class:`~shedder.Throttler` uses. Nobody polls.

Hand-off, as in the throttler: an item put while getters wait goes straight to the oldest getter,
and a slot freed while putters wait is reserved for the oldest putter, so a late arrival never
overtakes a waiter.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from queue import Empty, Full
from time import monotonic
from typing import Any, Generic, Literal, TypeVar

from shedder._core.checks import (
    check_callable,
    check_choice,
    check_instance,
    check_int,
    check_seconds,
    check_sequence,
)
from shedder._core.waiters import _AsyncWaiter, _resolve, _ThreadWaiter
from shedder._core.waitqueue import WaiterQueue

__all__ = [
    "BlockingQueue",
    "DropPolicy",
    "DroppingQueue",
    "Empty",
    "Full",
    "MonitoredQueue",
    "MonitoredQueueStats",
    "QueuePolicy",
    "QueueStats",
]

T = TypeVar("T")
_Waiter = _ThreadWaiter | _AsyncWaiter
W = TypeVar("W", _ThreadWaiter, _AsyncWaiter)

DropPolicy = Literal["drop_oldest", "drop_newest", "drop_random"]
"""What a full :class:`DroppingQueue` discards to make room: the head, the new item, or one
chosen uniformly among the queued items and the new one."""
QueuePolicy = Literal["block", "drop_oldest", "drop_newest", "drop_random"]
_POLICIES: tuple[QueuePolicy, ...] = ("block", "drop_oldest", "drop_newest", "drop_random")

DEFAULT_PUT_WAIT_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.005,
    0.01,
    0.05,
    0.1,
    0.5,
    1.0,
    5.0,
)
"""Upper bounds, in seconds, of the put-wait histogram of :class:`MonitoredQueue`."""


@dataclass(frozen=True, slots=True)
class QueueStats:
    """A consistent snapshot of a queue. At rest, ``put_total == get_total + dropped_total + size``.

    ``put_total`` counts every item offered and accepted or dropped (a put that timed out with
    :class:`queue.Full` is not counted); ``get_total`` every item taken out.
    """

    size: int
    capacity: int
    put_total: int
    get_total: int
    dropped_total: int
    waiting_getters: int
    waiting_putters: int

    @property
    def load(self) -> float:
        """``size / capacity``, 0.0 (empty) to 1.0 (full)."""
        return min(self.size / self.capacity, 1.0)


@dataclass(frozen=True, slots=True)
class MonitoredQueueStats(QueueStats):
    """:class:`QueueStats` plus the put-wait histogram and the recent throughput.

    ``put_wait_buckets`` pairs each upper bound (seconds, the last is ``math.inf``) with the
    *cumulative* count of puts that waited at most that long, as Prometheus wants them.
    """

    put_wait_buckets: tuple[tuple[float, int], ...] = ()
    put_wait_sum: float = 0.0
    put_wait_count: int = 0
    throughput: float = 0.0
    """Items taken out per second, over the last ``throughput_window`` seconds."""


class _QueueCore(Generic[T]):
    """The shared state machine. Invariant, under ``_lock``: ``bool(_getters)`` implies
    ``not _items`` (an item arriving while getters wait is handed over), and ``bool(_putters)``
    implies ``len(_items) + _reserved >= capacity`` (a freed slot is reserved for a putter)."""

    def __init__(
        self,
        capacity: int,
        policy: QueuePolicy,
        rng: random.Random | None,
    ) -> None:
        self._capacity = check_int("capacity", capacity, 1)
        self._policy = check_choice("policy", policy, _POLICIES)
        self._random = (
            random.Random()
            if rng is None
            else check_instance("rng", rng, random.Random, "a random.Random or None")
        )
        self._lock = threading.Lock()
        self._items: deque[T] = deque()
        self._reserved = 0  # slots granted to waking putters that have not inserted yet
        # The throttler's waiting room, with one class and no flows: arrival order.
        self._getters = WaiterQueue()
        self._putters = WaiterQueue()
        self._handed: dict[_Waiter, T] = {}  # items handed to getters that have not woken yet
        self._put_total = 0
        self._get_total = 0
        self._dropped_total = 0

    # -- state -------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Most items the queue holds."""
        return self._capacity

    @property
    def size(self) -> int:
        """Items queued now."""
        return len(self._items)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def is_full(self) -> bool:
        return len(self._items) + self._reserved >= self._capacity

    @property
    def is_empty(self) -> bool:
        return not self._items

    @property
    def load(self) -> float:
        """``size / capacity``: how full the queue is, 0.0 to 1.0 (samplers follow this)."""
        return min(len(self._items) / self._capacity, 1.0)

    @property
    def dropped_total(self) -> int:
        return self._dropped_total

    def stats(self) -> QueueStats:
        """A consistent snapshot of the size and the counters."""
        with self._lock:
            return QueueStats(**self._stats_fields_locked())

    def _stats_fields_locked(self) -> dict[str, int]:
        return {
            "size": len(self._items),
            "capacity": self._capacity,
            "put_total": self._put_total,
            "get_total": self._get_total,
            "dropped_total": self._dropped_total,
            "waiting_getters": len(self._getters),
            "waiting_putters": len(self._putters),
        }

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {len(self._items)}/{self._capacity} {self._policy}>"

    # -- hooks for MonitoredQueue (called under the lock) ------------------------------------

    def _observe_put_locked(self, waited: float) -> None:
        pass

    def _observe_get_locked(self) -> None:
        pass

    # -- the locked core -----------------------------------------------------------------------

    def _enter_locked(self, item: T) -> bool:
        """``item`` enters the queue: straight to the oldest live getter (returns False), else
        to the tail (returns True: it takes a slot)."""
        self._put_total += 1
        return self._hand_or_keep_locked(item, self._items.append)

    def _hand_or_keep_locked(self, item: T, keep: Callable[[T], None]) -> bool:
        while self._getters:
            waiter: Any = self._getters.pop_next(False)
            self._handed[waiter] = item
            if waiter.grant():
                return False
            del self._handed[waiter]  # its loop is closed: it will never take the item
        keep(item)
        return True

    def _free_slot_locked(self) -> None:
        """A slot was freed: reserve it for the oldest live putter, if any."""
        while self._putters:
            waiter: Any = self._putters.pop_next(False)
            self._reserved += 1
            if waiter.grant():
                return
            self._reserved -= 1

    def _take_locked(self) -> T:
        item = self._items.popleft()
        self._get_total += 1
        self._observe_get_locked()
        self._free_slot_locked()
        return item

    def _offer_locked(self, item: T) -> list[T] | None:
        """Put without waiting: the dropped items, or None if a blocking put must wait."""
        if self._getters or (
            len(self._items) + self._reserved < self._capacity and not self._putters
        ):
            self._enter_locked(item)
            self._observe_put_locked(0.0)
            return []
        policy = self._policy
        if policy == "block":
            return None
        self._put_total += 1
        self._dropped_total += 1
        self._observe_put_locked(0.0)
        if policy == "drop_random":
            victim = self._random.randrange(len(self._items) + 1)
            if victim == len(self._items):
                return [item]
            dropped = self._items[victim]
            del self._items[victim]
        elif policy == "drop_oldest":
            dropped = self._items.popleft()
        else:
            return [item]
        self._items.append(item)
        return [dropped]

    # -- putting: try under the lock, wait outside it, settle under the lock -------------------

    def _try_put(
        self, item: T, timeout: float | None, new_waiter: Callable[[], W]
    ) -> tuple[list[T] | None, W | None]:
        with self._lock:
            dropped = self._offer_locked(item)
            if dropped is not None:
                return dropped, None
            if timeout == 0:
                raise Full
            waiter = new_waiter()
            self._putters.push(waiter, 0, None, 0.0)
            return None, waiter

    def _settle_put(self, waiter: _Waiter, item: T, started: float) -> None:
        with self._lock:
            if waiter.granted:
                self._reserved -= 1
                if not self._enter_locked(item):
                    # Handed straight to a getter: the reserved slot is free again.
                    self._free_slot_locked()
                self._observe_put_locked(monotonic() - started)
                return
            self._putters.remove(waiter)  # timed out; a granted waiter has already left the queue
        raise Full

    def _abandon_put(self, waiter: _Waiter) -> None:
        with self._lock:
            if waiter.granted:
                self._reserved -= 1
                self._free_slot_locked()
            else:
                self._putters.remove(waiter)

    def _put_sync(self, item: T, timeout: float | None) -> list[T]:
        timeout = _check_timeout(timeout)
        dropped, waiter = self._try_put(item, timeout, _ThreadWaiter)
        if waiter is None:
            return dropped or []
        started = monotonic()
        try:
            _block(waiter, timeout)
        except BaseException:
            self._abandon_put(waiter)
            raise
        self._settle_put(waiter, item, started)
        return []

    async def _put_async(self, item: T, timeout: float | None) -> list[T]:
        timeout = _check_timeout(timeout)
        dropped, waiter = self._try_put(item, timeout, _new_async_waiter)
        if waiter is None:
            return dropped or []
        started = monotonic()
        try:
            await _until(waiter, timeout)
        except BaseException:
            self._abandon_put(waiter)
            raise
        self._settle_put(waiter, item, started)
        return []

    # -- getting -------------------------------------------------------------------------------

    def _try_get(
        self, timeout: float | None, new_waiter: Callable[[], W]
    ) -> tuple[list[T], W | None]:
        with self._lock:
            if self._items:
                return [self._take_locked()], None
            if timeout == 0:
                raise Empty
            waiter = new_waiter()
            self._getters.push(waiter, 0, None, 0.0)
            return [], waiter

    def _settle_get(self, waiter: _Waiter) -> T:
        with self._lock:
            if waiter.granted:
                self._get_total += 1
                self._observe_get_locked()
                return self._handed.pop(waiter)
            self._getters.remove(waiter)
        raise Empty

    def _abandon_get(self, waiter: _Waiter) -> None:
        with self._lock:
            if waiter.granted:
                # Handed an item at the instant it gave up: the item goes to the next getter or
                # back to the head, so nothing is lost (this may exceed capacity by one, briefly).
                self._hand_or_keep_locked(self._handed.pop(waiter), self._items.appendleft)
            else:
                self._getters.remove(waiter)

    def _get_sync(self, timeout: float | None) -> T:
        timeout = _check_timeout(timeout)
        got, waiter = self._try_get(timeout, _ThreadWaiter)
        if waiter is None:
            return got[0]
        try:
            _block(waiter, timeout)
        except BaseException:
            self._abandon_get(waiter)
            raise
        return self._settle_get(waiter)

    async def _get_async(self, timeout: float | None) -> T:
        timeout = _check_timeout(timeout)
        got, waiter = self._try_get(timeout, _new_async_waiter)
        if waiter is None:
            return got[0]
        try:
            await _until(waiter, timeout)
        except BaseException:
            self._abandon_get(waiter)
            raise
        return self._settle_get(waiter)

    # -- public getters, the same for every flavour ----------------------------------------------

    def get(self, timeout: float | None = None) -> T:
        """Take the oldest item, blocking this thread up to ``timeout`` seconds (None: forever).

        Raises :class:`queue.Empty` when none came in time (at once for ``timeout=0``).
        """
        return self._get_sync(timeout)

    async def get_async(self, timeout: float | None = None) -> T:
        """Take the oldest item, awaiting up to ``timeout`` seconds; cancellation-safe: an item
        handed to a task cancelled at that instant goes back to the queue. Raises ``Empty``."""
        return await self._get_async(timeout)

    def get_nowait(self) -> T:
        """Take the oldest item or raise :class:`queue.Empty` at once."""
        return self._get_sync(0)


def _check_timeout(timeout: float | None) -> float | None:
    return None if timeout is None else check_seconds("timeout", timeout)


def _new_async_waiter() -> _AsyncWaiter:
    return _AsyncWaiter(asyncio.get_running_loop())


def _block(waiter: _ThreadWaiter, timeout: float | None) -> None:
    """Block the thread until granted or ``timeout`` passes (the settle step tells which)."""
    if timeout is None or timeout > threading.TIMEOUT_MAX:
        waiter.lock.acquire()
    else:
        waiter.lock.acquire(True, timeout)


async def _until(waiter: _AsyncWaiter, timeout: float | None) -> None:
    """Await until granted or ``timeout`` passes (the settle step tells which)."""
    expiry = (
        None
        if timeout is None or timeout == math.inf
        else waiter.loop.call_later(timeout, _resolve, waiter.future)
    )
    try:
        await waiter.future
    finally:
        if expiry is not None:
            expiry.cancel()


class BlockingQueue(_QueueCore[T]):
    """A bounded FIFO queue whose producers wait while it is full: the simplest backpressure.

    Safe from threads and asyncio tasks at once (``put``/``get`` block a thread,
    ``put_async``/``get_async`` await on the task's loop; a thread's put wakes a task's get).
    Waiters are served first come, first served. Raises :class:`queue.Full` /
    :class:`queue.Empty` on timeout.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity, "block", None)

    def put(self, item: T, timeout: float | None = None) -> None:
        """Add ``item``, blocking while the queue is full, up to ``timeout`` seconds (None:
        forever; 0: not at all). Raises :class:`queue.Full` when no room came in time."""
        self._put_sync(item, timeout)

    async def put_async(self, item: T, timeout: float | None = None) -> None:
        """Add ``item``, awaiting room up to ``timeout`` seconds; cancellation-safe (a cancelled
        put has not added its item). Raises :class:`queue.Full` when no room came in time."""
        await self._put_async(item, timeout)

    def put_nowait(self, item: T) -> None:
        """Add ``item`` or raise :class:`queue.Full` at once."""
        self._put_sync(item, 0)


class DroppingQueue(_QueueCore[T]):
    """A bounded FIFO queue that never blocks producers: when full, ``put`` drops an item.

    ``policy`` says which: ``"drop_oldest"`` (the head: keep the freshest data),
    ``"drop_newest"`` (the new item: keep what is already promised) or ``"drop_random"`` (one
    chosen uniformly among the queued items and the new one). ``rng`` seeds ``drop_random``.
    Consumers block or await in ``get``/``get_async`` until an item comes.
    """

    def __init__(
        self,
        capacity: int,
        policy: DropPolicy = "drop_oldest",
        *,
        rng: random.Random | None = None,
    ) -> None:
        check_choice("policy", policy, _POLICIES[1:])
        super().__init__(capacity, policy, rng)

    @property
    def policy(self) -> DropPolicy:
        return self._policy  # type: ignore[return-value]  # checked in __init__

    def put(self, item: T) -> list[T]:
        """Add ``item`` without blocking; returns the items dropped to make room (none or one)."""
        return self._put_sync(item, 0)


class MonitoredQueue(_QueueCore[T]):
    """A bounded queue that measures itself: depth, drops, put waits and throughput.

    ``policy`` is ``"block"`` (producers wait, like :class:`BlockingQueue`) or a drop policy
    (like :class:`DroppingQueue`). :meth:`stats` returns :class:`MonitoredQueueStats`; export
    them to Prometheus with ``shedder.prometheus.instrument_queue``.

    Args:
        put_wait_buckets: histogram upper bounds in seconds, increasing.
        throughput_window: seconds over which ``throughput`` (items taken per second) is averaged.
        clock: ``time.monotonic`` or a fake for tests.
    """

    def __init__(
        self,
        capacity: int,
        policy: QueuePolicy = "block",
        *,
        put_wait_buckets: Sequence[float] = DEFAULT_PUT_WAIT_BUCKETS,
        throughput_window: float = 10.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        super().__init__(capacity, policy, rng)
        bounds = tuple(
            check_seconds("put_wait_buckets", bound)
            for bound in check_sequence("put_wait_buckets", put_wait_buckets)
        )
        if any(b <= a for a, b in itertools.pairwise(bounds)):
            raise ValueError(f"put_wait_buckets must be increasing, got {bounds}")
        self._bounds = bounds if bounds and bounds[-1] == math.inf else (*bounds, math.inf)
        self._bucket_counts = [0] * len(self._bounds)
        self._wait_sum = 0.0
        window = check_seconds("throughput_window", throughput_window)
        if window == 0 or window == math.inf:
            raise ValueError(f"throughput_window must be > 0 and finite, got {window}")
        self._window = window
        self._clock = check_callable("clock", clock)
        self._created = clock()
        # Gets per whole second of the clock, oldest first: (second, count), pruned past window.
        self._recent: deque[list[int]] = deque()

    def put(self, item: T, timeout: float | None = None) -> list[T]:
        """Add ``item``: waits for room up to ``timeout`` (policy ``"block"``; raises
        :class:`queue.Full`), or drops to make room. Returns the dropped items."""
        return self._put_sync(item, timeout)

    async def put_async(self, item: T, timeout: float | None = None) -> list[T]:
        """Add ``item``, awaiting room under policy ``"block"``; returns the dropped items."""
        return await self._put_async(item, timeout)

    def put_nowait(self, item: T) -> list[T]:
        """Add ``item`` without waiting; raises :class:`queue.Full` under policy ``"block"``."""
        return self._put_sync(item, 0)

    def _observe_put_locked(self, waited: float) -> None:
        self._wait_sum += waited
        for index, bound in enumerate(self._bounds):
            if waited <= bound:
                self._bucket_counts[index] += 1
                return

    def _observe_get_locked(self) -> None:
        second = int(self._clock())
        if self._recent and self._recent[-1][0] == second:
            self._recent[-1][1] += 1
        else:
            self._recent.append([second, 1])
            self._prune_locked(second)

    def _prune_locked(self, second: int) -> None:
        while self._recent and self._recent[0][0] <= second - self._window:
            self._recent.popleft()

    def stats(self) -> MonitoredQueueStats:
        """A consistent snapshot: size, counters, put-wait histogram and recent throughput."""
        with self._lock:
            now = self._clock()
            self._prune_locked(int(now))
            span = min(self._window, max(now - self._created, 1.0))
            cumulative, running = [], 0
            for bound, count in zip(self._bounds, self._bucket_counts, strict=True):
                running += count
                cumulative.append((bound, running))
            return MonitoredQueueStats(
                **self._stats_fields_locked(),
                put_wait_buckets=tuple(cumulative),
                put_wait_sum=self._wait_sum,
                put_wait_count=running,
                throughput=sum(count for _, count in self._recent) / span,
            )
