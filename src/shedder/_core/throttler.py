"""The throttler: bounded concurrency, a bounded FIFO wait queue and a shed decision.

One instance serves threads and asyncio tasks at once. All state lives behind one
``threading.Lock`` whose critical sections are a few attribute updates long; nobody ever
blocks or awaits while holding it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from time import monotonic
from types import MappingProxyType, TracebackType
from typing import Any, Literal, TypedDict

from .checks import check_int, check_seconds
from .errors import Overloaded, ShedReason
from .limits import Limit
from .waiters import _GRANTED, _AsyncWaiter, _resolve, _ThreadWaiter

__all__ = [
    "SHED_REASONS",
    "Permit",
    "Throttler",
    "ThrottlerListener",
    "ThrottlerOptions",
    "ThrottlerStats",
    "throttlers",
]

logger = logging.getLogger("shedder")

SHED_REASONS: tuple[ShedReason, ...] = ("overloaded", "queue_full", "queue_timeout")

# Permits taken by ``with throttler:`` / ``async with throttler:``, innermost last. A tuple, never
# mutated in place: asyncio tasks copy their parent's context, and a shared mutable stack would
# let one task pop another's permit.
_held: ContextVar[tuple[Permit, ...]] = ContextVar("shedder_held", default=())

_registry: weakref.WeakValueDictionary[int, Throttler] = weakref.WeakValueDictionary()
_registry_ids = itertools.count()


def throttlers() -> list[Throttler]:
    """Every live throttler in this process, oldest first (health endpoints report them all)."""
    return [t for _, t in sorted(_registry.items())]


class ThrottlerListener:
    """Receives a throttler's events; subclass and override what you need.

    Methods are called outside the throttler's lock, on the thread or task that caused the
    event. An exception raised by a listener is logged and swallowed: observing must never
    break admission or lose a slot. Times are in seconds.
    """

    def on_queue(self, throttler: Throttler) -> None:
        """An arrival found no free slot and started waiting."""

    def on_admit(self, throttler: Throttler, waited: float) -> None:
        """A request got a slot; ``waited`` is 0.0 on the fast path."""

    def on_shed(self, throttler: Throttler, reason: ShedReason, waited: float) -> None:
        """A request was refused; ``waited`` > 0 only for ``queue_timeout``."""

    def on_cancel(self, throttler: Throttler, waited: float) -> None:
        """A waiter gave up (task cancelled, interrupted) before it was admitted."""

    def on_release(self, throttler: Throttler, held: float) -> None:
        """A slot was given back after being held for ``held`` seconds."""


@dataclass(frozen=True, slots=True)
class ThrottlerStats:
    """An immutable snapshot of a throttler's state and counters."""

    name: str
    in_flight: int
    queued: int
    max_concurrency: int
    max_queue: int
    shed_threshold: float
    admitted_total: int
    cancelled_total: int
    shed_total: Mapping[ShedReason, int] = field(default_factory=dict)

    @property
    def load(self) -> float:
        """``(in_flight + queued) / (max_concurrency + max_queue)``: how full the house is."""
        return (self.in_flight + self.queued) / (self.max_concurrency + self.max_queue)

    @property
    def overloaded(self) -> bool:
        """True while ``load >= shed_threshold``: the instance is shedding new arrivals."""
        return self.load >= self.shed_threshold

    def as_dict(self) -> dict[str, Any]:
        """The snapshot as plain JSON-ready values (the ``/health/load`` body)."""
        return {
            "name": self.name,
            "status": "overloaded" if self.overloaded else "ok",
            "in_flight": self.in_flight,
            "queued": self.queued,
            "max_concurrency": self.max_concurrency,
            "max_queue": self.max_queue,
            "load": round(self.load, 4),
            "shed_threshold": self.shed_threshold,
            "admitted_total": self.admitted_total,
            "cancelled_total": self.cancelled_total,
            "shed_total": dict(self.shed_total),
        }


class Permit:
    """A slot held in a throttler; give it back with :meth:`release` (idempotent).

    Also a context manager: ``with throttler.acquire(): ...``.
    """

    __slots__ = ("_released", "_throttler", "acquired_at", "waited")

    def __init__(self, throttler: Throttler, acquired_at: float, waited: float) -> None:
        self._throttler = throttler
        self._released = False
        self.acquired_at = acquired_at
        """``time.monotonic()`` when the slot was granted."""
        self.waited = waited
        """Seconds spent in the queue before the slot was granted (0.0 on the fast path)."""

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> bool:
        """Give the slot back (to the next waiter, if any). Returns False if already released."""
        return self._throttler._release(self)

    def __enter__(self) -> Permit:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"<Permit {state} of {self._throttler.name!r}>"


_Waiter = _ThreadWaiter | _AsyncWaiter


QueueDiscipline = Literal["fifo", "lifo", "codel"]
_DISCIPLINES: tuple[QueueDiscipline, ...] = ("fifo", "lifo", "codel")


class ThrottlerOptions(TypedDict, total=False):
    """The keyword arguments of :class:`shedder.Throttler`, for ``**throttler_options``.

    Typed this way (not ``**Any``) so that Starlette's ``add_middleware`` type-checks.
    """

    max_concurrency: int | Limit
    max_queue: int | None
    queue_timeout: float
    shed_threshold: float
    retry_after: int | Literal["auto"]
    retry_after_range: tuple[int, int]
    queue_discipline: QueueDiscipline
    codel_target: float
    codel_interval: float
    name: str
    clock: Callable[[], float]


class Throttler:
    """At most ``max_concurrency`` holders at once, up to ``max_queue`` more waiting in order.

    Args:
        max_concurrency: slots: requests that may run at once (int >= 1), or a
            :class:`shedder.limits.Limit` algorithm that learns the limit from latency.
        max_queue: how many more may wait for a slot (>= 0). Defaults to the (initial) limit.
        queue_timeout: longest wait for a slot, in seconds (>= 0; ``math.inf`` for no limit).
        shed_threshold: refuse at once, with reason ``"overloaded"``, an arrival that would have
            to wait while ``load >= shed_threshold`` (0 < t <= 1; 1.0 sheds only on a full queue
            or a timeout).
        retry_after: seconds a refused client should wait (int >= 1), or ``"auto"`` to estimate
            the time the current backlog takes to drain from the observed service time, clamped
            to ``retry_after_range``.
        retry_after_range: ``(low, high)`` bounds in whole seconds for ``"auto"``.
        queue_discipline: ``"fifo"`` (default): first come, first served, a full queue refuses
            the arrival. ``"lifo"``: newest first, a full queue refuses its oldest waiter.
            ``"codel"``: FIFO while the queue keeps emptying; once it has not been empty for
            ``codel_interval`` seconds it is standing: waiters that already waited
            ``codel_target`` seconds are refused (``queue_timeout``), new ones may wait only
            ``codel_target`` and are served newest first, so a standing queue cannot form. It
            stands until arrivals have found a free slot for a whole ``codel_interval``.
        codel_target: seconds; the wait allowed while a standing queue is detected.
        codel_interval: seconds the queue must stay non-empty to count as standing (and
            without congestion to stop counting as standing).
        name: label for metrics and health reports.
        clock: monotonic clock in seconds (for simulations; waiting always uses real time).

    Raises ``TypeError``/``ValueError`` naming the parameter for a bad configuration.
    Refusals raise :class:`shedder.Overloaded`.

    Invariant, under ``_lock``: ``bool(_waiters)`` implies ``_in_flight >= limit``: a freed slot
    goes straight to a waiter, so nobody waits while a slot is free. A slot granted to a waiter
    is counted in ``_in_flight`` from the moment of the grant.
    """

    def __init__(
        self,
        max_concurrency: int | Limit,
        max_queue: int | None = None,
        queue_timeout: float = 1.0,
        shed_threshold: float = 1.0,
        retry_after: int | Literal["auto"] = 1,
        *,
        retry_after_range: tuple[int, int] = (1, 60),
        queue_discipline: QueueDiscipline = "fifo",
        codel_target: float = 0.005,
        codel_interval: float = 0.1,
        name: str = "default",
        clock: Callable[[], float] = monotonic,
    ) -> None:
        self._limit: Limit | None
        if isinstance(max_concurrency, Limit):
            self._limit = max_concurrency
            self._max_concurrency = check_int("max_concurrency", max_concurrency.limit, 1)
        else:
            self._limit = None
            self._max_concurrency = check_int("max_concurrency", max_concurrency, 1)
        self._max_queue = (
            self._max_concurrency if max_queue is None else check_int("max_queue", max_queue, 0)
        )
        self._queue_timeout = check_seconds("queue_timeout", queue_timeout)
        if not isinstance(shed_threshold, (int, float)) or isinstance(shed_threshold, bool):
            raise TypeError(f"shed_threshold must be a number, got {shed_threshold!r}")
        if not 0.0 < shed_threshold <= 1.0:
            raise ValueError(f"shed_threshold must be in (0, 1], got {shed_threshold}")
        self._shed_threshold = float(shed_threshold)
        if (
            not isinstance(retry_after_range, tuple)
            or len(retry_after_range) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in retry_after_range)
        ):
            raise TypeError(
                f"retry_after_range must be a (low, high) pair of ints, got {retry_after_range!r}"
            )
        low, high = retry_after_range
        check_int("retry_after_range low", low, 1)
        if high < low:
            raise ValueError(f"retry_after_range high must be >= low ({low}), got {high}")
        self._retry_after_range = (low, high)
        self._retry_after_fixed: int | None
        if retry_after == "auto":
            self._retry_after_fixed = None
        else:
            self._retry_after_fixed = check_int("retry_after", retry_after, 1)
        if queue_discipline not in _DISCIPLINES:
            choices = ", ".join(_DISCIPLINES)
            raise ValueError(f"queue_discipline must be one of {choices}, got {queue_discipline!r}")
        self._discipline = queue_discipline
        self._codel_target = check_seconds("codel_target", codel_target)
        self._codel_interval = check_seconds("codel_interval", codel_interval)
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self.name = name
        self._clock = clock

        self._lock = threading.Lock()
        self._in_flight = 0
        # Waiters in arrival order, each with the clock time it queued at.
        self._waiters: OrderedDict[_Waiter, float] = OrderedDict()
        self._queue_busy_since = 0.0  # when the queue last went from empty to non-empty
        # CoDel: a standing queue was detected, and when an arrival last found no free slot.
        self._standing = False
        self._last_congested = 0.0
        self._admitted = 0
        self._cancelled = 0
        self._shed: dict[ShedReason, int] = dict.fromkeys(SHED_REASONS, 0)
        self._mean_hold = 0.0  # EWMA of slot hold times, seconds; feeds retry_after="auto"
        self._listeners: tuple[ThrottlerListener, ...] = ()
        _registry[next(_registry_ids)] = self

    # -- configuration -------------------------------------------------------------------------

    @property
    def max_concurrency(self) -> int:
        """The current concurrency limit (it moves when a limit algorithm is in use)."""
        return self._max_concurrency

    @property
    def limit_algorithm(self) -> Limit | None:
        """The :class:`shedder.limits.Limit` in use, or None for a fixed limit."""
        return self._limit

    @property
    def max_queue(self) -> int:
        return self._max_queue

    @property
    def queue_timeout(self) -> float:
        return self._queue_timeout

    @property
    def shed_threshold(self) -> float:
        return self._shed_threshold

    @property
    def queue_discipline(self) -> QueueDiscipline:
        return self._discipline

    def add_listener(self, listener: ThrottlerListener) -> None:
        """Subscribe ``listener`` to this throttler's events (metrics, logging, tracing)."""
        with self._lock:
            self._listeners = (*self._listeners, listener)

    def remove_listener(self, listener: ThrottlerListener) -> None:
        """Unsubscribe ``listener``; ``ValueError`` if it was not subscribed."""
        with self._lock:
            listeners = list(self._listeners)
            listeners.remove(listener)
            self._listeners = tuple(listeners)

    # -- state ---------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def stats(self) -> ThrottlerStats:
        """A consistent, immutable snapshot of the state and counters."""
        with self._lock:
            return ThrottlerStats(
                name=self.name,
                in_flight=self._in_flight,
                queued=len(self._waiters),
                max_concurrency=self._max_concurrency,
                max_queue=self._max_queue,
                shed_threshold=self._shed_threshold,
                admitted_total=self._admitted,
                cancelled_total=self._cancelled,
                shed_total=MappingProxyType(dict(self._shed)),
            )

    def __repr__(self) -> str:
        return (
            f"<Throttler {self.name!r} in_flight={self._in_flight}/{self._max_concurrency}"
            f" queued={len(self._waiters)}/{self._max_queue}>"
        )

    # -- acquiring -----------------------------------------------------------------------------

    def acquire(self, timeout: float | None = None) -> Permit:
        """Take a slot, blocking this thread in the queue if needed.

        ``timeout`` overrides ``queue_timeout`` for this call. Raises :class:`Overloaded` when
        refused. Release the returned permit exactly once (``with`` does it for you).
        """
        wait_for = self._queue_timeout if timeout is None else check_seconds("timeout", timeout)
        now = self._clock()
        with self._lock:
            if self._in_flight < self._max_concurrency and not self._waiters:
                self._in_flight += 1
                self._admitted += 1
                if not self._listeners:
                    return Permit(self, now, 0.0)
                refusal = waiter = None
                evicted: list[tuple[Overloaded, float]] = []
            else:
                waiter = None
                refusal, evicted, wait_for = self._admission_locked(now, wait_for)
                if refusal is None:
                    waiter = _ThreadWaiter()
                    self._waiters[waiter] = now
        if evicted and self._listeners:
            self._notify_evicted(evicted, now)
        if waiter is None:
            return self._admitted_at_once(refusal, now)
        self._queued()
        try:
            waiter.lock.acquire(True, -1 if wait_for > threading.TIMEOUT_MAX else wait_for)
        except BaseException:
            self._abandon(waiter, now)
            raise
        return self._after_wait(waiter, now)

    async def acquire_async(self, timeout: float | None = None) -> Permit:
        """Take a slot, awaiting in the queue if needed; same rules as :meth:`acquire`.

        Cancelling the awaiting task removes it from the queue at once; a slot that was handed to
        it at the same instant passes to the next waiter.
        """
        wait_for = self._queue_timeout if timeout is None else check_seconds("timeout", timeout)
        now = self._clock()
        with self._lock:
            if self._in_flight < self._max_concurrency and not self._waiters:
                self._in_flight += 1
                self._admitted += 1
                if not self._listeners:
                    return Permit(self, now, 0.0)
                refusal = waiter = None
                evicted: list[tuple[Overloaded, float]] = []
            else:
                waiter = None
                refusal, evicted, wait_for = self._admission_locked(now, wait_for)
                if refusal is None:
                    waiter = _AsyncWaiter(asyncio.get_running_loop())
                    self._waiters[waiter] = now
        if evicted and self._listeners:
            self._notify_evicted(evicted, now)
        if waiter is None:
            return self._admitted_at_once(refusal, now)
        self._queued()
        expiry = (
            waiter.loop.call_later(wait_for, _resolve, waiter.future)
            if wait_for != math.inf
            else None
        )
        try:
            await waiter.future
        except BaseException:
            self._abandon(waiter, now)
            raise
        finally:
            if expiry is not None:
                expiry.cancel()
        return self._after_wait(waiter, now)

    def _admission_locked(
        self, now: float, wait_for: float
    ) -> tuple[Overloaded | None, list[tuple[Overloaded, float]], float]:
        """No free slot: decide between refusing the arrival and letting it wait.

        Returns the arrival's refusal (or None: it may queue), the refusals (and waits) of older
        waiters shed to make room for it or for having waited too long (LIFO, or CoDel with a
        standing queue), and how long it may wait. The caller enqueues the arrival.
        """
        waiters = self._waiters
        evicted: list[tuple[Overloaded, float]] = []
        lifo = self._discipline == "lifo"
        if self._discipline == "codel":
            if self._standing and now - self._last_congested >= self._codel_interval:
                self._standing = False  # a whole interval with a free slot for every arrival
            self._last_congested = now
            if not waiters and not self._standing:
                self._queue_busy_since = now
            elif now - self._queue_busy_since >= self._codel_interval:
                # Standing until arrivals find free slots for an interval again, not merely
                # until the short waits below empty the queue: else it flips back to long FIFO
                # waits many times a second under overload.
                self._standing = True
            if self._standing:
                # Short waits, newest first; whoever already waited the target is refused now
                # rather than at its own (long) queue_timeout.
                wait_for = min(wait_for, self._codel_target)
                lifo = True
                self._shed_stale_locked(now, evicted)
        elif not waiters:
            self._queue_busy_since = now
        queued = len(waiters)
        reason: ShedReason
        if queued >= self._max_queue:
            if not (lifo and waiters):
                reason = "queue_full"
            else:
                oldest, since = waiters.popitem(last=False)
                self._shed["queue_full"] += 1
                if oldest.wake("queue_full"):  # else its loop is gone: nobody to tell
                    evicted.append((Overloaded("queue_full", self._retry_after_locked()), since))
                return None, evicted, wait_for
        elif (self._in_flight + queued) / (
            self._max_concurrency + self._max_queue
        ) >= self._shed_threshold:
            reason = "overloaded"
        else:
            return None, evicted, wait_for
        self._shed[reason] += 1
        return Overloaded(reason, self._retry_after_locked()), evicted, wait_for

    def _shed_stale_locked(self, now: float, evicted: list[tuple[Overloaded, float]]) -> None:
        """Refuse, oldest first, the waiters that have waited ``codel_target`` or longer."""
        waiters = self._waiters
        while waiters:
            oldest, since = next(iter(waiters.items()))
            if now - since < self._codel_target:
                return  # arrival order: everyone behind it waited less
            del waiters[oldest]
            self._shed["queue_timeout"] += 1
            if oldest.wake("queue_timeout"):
                evicted.append((Overloaded("queue_timeout", self._retry_after_locked()), since))

    def _admitted_at_once(self, refusal: Overloaded | None, now: float) -> Permit:
        """Finish an arrival that did not queue: tell the listeners, then admit or refuse."""
        if refusal is not None:
            self._notify_shed(refusal, 0.0)
            raise refusal
        self._notify("on_admit", 0.0)
        return Permit(self, now, 0.0)

    def _notify_evicted(self, evicted: list[tuple[Overloaded, float]], now: float) -> None:
        """Tell the listeners whom an arrival pushed out of the queue, with their waits."""
        for refusal, since in evicted:
            self._notify_shed(refusal, now - since)

    def _queued(self) -> None:
        """Tell the listeners an arrival queued."""
        if self._listeners:
            self._notify("on_queue")

    def _after_wait(self, waiter: _Waiter, started: float) -> Permit:
        """The waiter woke (granted, refused or timed out); settle which under the lock."""
        now = self._clock()
        waited = now - started
        with self._lock:
            outcome = waiter.outcome
            if outcome == _GRANTED:
                self._admitted += 1
                permit = Permit(self, now, waited)
            elif outcome is None:
                # Timed out. Still queued: grants and evictions remove the waiter first.
                del self._waiters[waiter]
                self._shed["queue_timeout"] += 1
                refusal = Overloaded("queue_timeout", self._retry_after_locked())
                # Not fed to the limit as a drop: a queue timeout says more arrive than the
                # service takes, not that the service is congested, and shrinking the limit
                # for it cuts throughput while the load stays the same (a death spiral).
            else:
                # Evicted by a newer arrival, which counted it and told the listeners.
                raise Overloaded(outcome, self._retry_after_locked())
        if outcome is None:
            self._notify_shed(refusal, waited)
            raise refusal
        self._notify("on_admit", waited)
        return permit

    def _abandon(self, waiter: _Waiter, started: float) -> None:
        """The waiter gave up (cancelled, interrupted); leave the queue, passing on any grant."""
        with self._lock:
            outcome = waiter.outcome
            if outcome == _GRANTED:
                self._in_flight -= 1
                self._fill_slots_locked()
            elif outcome is None:
                # Normally still queued; a waiter skipped because its loop closed is not.
                self._waiters.pop(waiter, None)
            else:
                return  # refused first: that refusal is its outcome
            self._cancelled += 1
        self._notify("on_cancel", self._clock() - started)

    # -- releasing -----------------------------------------------------------------------------

    def _release(self, permit: Permit) -> bool:
        now = self._clock()
        with self._lock:
            if permit._released:
                return False
            permit._released = True
            held = now - permit.acquired_at
            self._mean_hold += 0.1 * (held - self._mean_hold) if self._mean_hold else held
            self._in_flight -= 1
            if self._limit is not None:
                self._relimit_locked(self._limit.update(held, self._in_flight + 1, False))
            if self._waiters:
                self._fill_slots_locked()
            listeners = self._listeners
        if listeners:
            self._notify("on_release", held)
        return True

    def _relimit_locked(self, limit: int) -> None:
        if limit != self._max_concurrency:
            self._max_concurrency = max(1, limit)
            self._fill_slots_locked()

    def _fill_slots_locked(self) -> None:
        """Hand free slots to waiters (oldest first, or newest first when serving LIFO)."""
        waiters = self._waiters
        while waiters and self._in_flight < self._max_concurrency:
            newest_first = self._discipline == "lifo" or self._standing
            waiter, _ = waiters.popitem(last=newest_first)
            if waiter.wake(_GRANTED):
                self._in_flight += 1

    def _retry_after_locked(self) -> int:
        if self._retry_after_fixed is not None:
            return self._retry_after_fixed
        low, high = self._retry_after_range
        backlog = self._in_flight + len(self._waiters) + 1
        drain = backlog * self._mean_hold / self._max_concurrency
        return min(max(math.ceil(drain), low), high)

    # -- context managers ----------------------------------------------------------------------

    def __enter__(self) -> Permit:
        permit = self.acquire()
        _held.set((*_held.get(), permit))
        return permit

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._pop_held().release()

    async def __aenter__(self) -> Permit:
        permit = await self.acquire_async()
        _held.set((*_held.get(), permit))
        return permit

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._pop_held().release()

    def _pop_held(self) -> Permit:
        held = _held.get()
        if not held or held[-1]._throttler is not self:
            raise RuntimeError(f"{self!r} exited without a matching enter in this context")
        _held.set(held[:-1])
        return held[-1]

    # -- listeners -----------------------------------------------------------------------------

    def _notify(self, event: str, *args: Any) -> None:
        for listener in self._listeners:
            try:
                getattr(listener, event)(self, *args)
            except Exception:
                logger.exception("shedder listener %r failed in %s", listener, event)

    def _notify_shed(self, refusal: Overloaded, waited: float) -> None:
        if self._listeners:
            self._notify("on_shed", refusal.reason, waited)
