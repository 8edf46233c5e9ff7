"""The throttler: bounded concurrency, a bounded wait queue and a shed decision.

One instance serves threads and asyncio tasks at once. All state lives behind one
``threading.Lock`` whose critical sections are a few attribute updates long; nobody ever
blocks or awaits while holding it.

Admission is one synchronous step (:meth:`Throttler.admit`): under the lock it admits, refuses
or queues the arrival, and only an arrival that really has to wait allocates a waiter. Who waits
and who is refused first is decided by priority classes (each waits in a room of its own; under
overload a lower class is served last and refused first), flows (served in turn inside a class)
and the queue discipline (a strategy object consulted under the lock).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import sys
import threading
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from time import monotonic
from types import MappingProxyType, TracebackType
from typing import Any, Literal, TypedDict, TypeVar

from .checks import check_fraction, check_int, check_number, check_seconds
from .disciplines import FIFO, Discipline, discipline_named
from .errors import Overloaded, ShedReason
from .limits import Limit
from .waiters import _GRANTED, _AsyncWaiter, _resolve, _ThreadWaiter
from .waitqueue import WaiterQueue

__all__ = [
    "DEFAULT_PRIORITIES",
    "SHED_REASONS",
    "Outcome",
    "Permit",
    "Throttler",
    "ThrottlerListener",
    "ThrottlerOptions",
    "ThrottlerStats",
    "Waiting",
    "throttlers",
]

logger = logging.getLogger("shedder")

SHED_REASONS: tuple[ShedReason, ...] = (
    "overloaded",
    "queue_full",
    "queue_timeout",
    "deadline_exceeded",
)

DEFAULT_PRIORITIES: tuple[str, ...] = ("critical", "default", "sheddable")
"""The priority classes of a throttler unless told otherwise, highest first."""

Outcome = Literal["success", "ignore", "dropped"]
"""How a permit's work ended, for the limit algorithm: ``"success"`` (a real service time),
``"ignore"`` (a fast failure that says nothing of latency: do not learn from it) or
``"dropped"`` (failed for congestion, such as a backend timeout: the limit should shrink)."""

_OUTCOMES = frozenset(("success", "ignore", "dropped"))

# Permits taken by ``with throttler:`` / ``async with throttler:``, innermost last. A tuple, never
# mutated in place: asyncio tasks copy their parent's context, and a shared mutable stack would
# let one task pop another's permit.
_held: ContextVar[tuple[Permit, ...]] = ContextVar("shedder_held", default=())

_A = TypeVar("_A")  # what a quick lane answers (see Throttler._quick_lane)

_registry: weakref.WeakValueDictionary[int, Throttler] = weakref.WeakValueDictionary()
_registry_ids = itertools.count()


def throttlers() -> list[Throttler]:
    """Every live throttler in this process, oldest first (health endpoints report them all)."""
    return [t for _, t in sorted(_registry.items())]


class ThrottlerListener:
    """Receives a throttler's events; subclass and override what you need.

    Methods are called outside the throttler's lock, on the thread or task that caused the
    event. An exception raised by a listener is logged and swallowed: observing must never
    break admission or lose a slot. Times are in seconds; ``priority`` is the request's class.
    """

    def on_queue(self, throttler: Throttler, priority: str) -> None:
        """An arrival found no free slot and started waiting."""

    def on_admit(self, throttler: Throttler, waited: float, priority: str) -> None:
        """A request got a slot; ``waited`` is 0.0 on the fast path."""

    def on_shed(
        self, throttler: Throttler, reason: ShedReason, waited: float, priority: str
    ) -> None:
        """A request was refused; ``waited`` > 0 only for a refused waiter."""

    def on_cancel(self, throttler: Throttler, waited: float) -> None:
        """A waiter gave up (task cancelled, interrupted) before it was admitted."""

    def on_release(self, throttler: Throttler, held: float) -> None:
        """A slot was given back after being held for ``held`` seconds."""


@dataclass(frozen=True, slots=True)
class ThrottlerStats:
    """An immutable snapshot of a throttler's state and counters.

    The ``*_by_priority`` mappings break the figures down by priority class (every class of
    the throttler, highest first); the totals are over all classes.
    """

    name: str
    in_flight: int
    queued: int
    max_concurrency: int
    max_queue: int
    shed_threshold: float
    admitted_total: int
    cancelled_total: int
    shed_total: Mapping[ShedReason, int] = field(default_factory=dict)
    queued_by_priority: Mapping[str, int] = field(default_factory=dict)
    admitted_by_priority: Mapping[str, int] = field(default_factory=dict)
    shed_by_priority: Mapping[str, Mapping[ShedReason, int]] = field(default_factory=dict)

    @property
    def load(self) -> float:
        """``(in_flight + queued) / (max_concurrency + max_queue)``: how full the slots and one
        waiting room are. 1 when a room is full; more while several priority classes wait
        (each has a room of ``max_queue``)."""
        return (self.in_flight + self.queued) / (self.max_concurrency + self.max_queue)

    @property
    def overloaded(self) -> bool:
        """True while ``load >= shed_threshold``: the instance refuses some new arrivals, or is
        about to; ``/health/load`` then answers 503, for load balancers to send work elsewhere."""
        return self.load >= self.shed_threshold

    def as_dict(self) -> dict[str, Any]:
        """The snapshot as plain JSON-ready values (the ``/health/load`` body)."""
        payload: dict[str, Any] = {
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
        if self.shed_by_priority:
            payload["priorities"] = {
                name: {
                    "queued": self.queued_by_priority.get(name, 0),
                    "admitted_total": self.admitted_by_priority.get(name, 0),
                    "shed_total": dict(shed),
                }
                for name, shed in self.shed_by_priority.items()
            }
        return payload


class Permit:
    """A slot held in a throttler; give it back with :meth:`release` (idempotent).

    Also a context manager: ``with throttler.acquire(): ...`` (released as ``"success"``).
    """

    __slots__ = ("_released", "_throttler", "acquired_at", "deadline", "priority", "waited")

    def __init__(
        self,
        throttler: Throttler,
        acquired_at: float,
        waited: float,
        priority: str,
        deadline: float | None,
    ) -> None:
        self._throttler = throttler
        self._released = False
        self.acquired_at = acquired_at
        """The throttler's clock (``time.monotonic()``) when the slot was granted."""
        self.waited = waited
        """Seconds spent in the queue before the slot was granted (0.0 on the fast path)."""
        self.priority = priority
        """The priority class the slot was granted in."""
        self.deadline = deadline
        """The request's deadline on the throttler's clock, or None."""

    @property
    def released(self) -> bool:
        return self._released

    def remaining(self) -> float | None:
        """Seconds left until the deadline (negative once passed), or None without one."""
        if self.deadline is None:
            return None
        return self.deadline - self._throttler._clock()

    def release(self, outcome: Outcome = "success") -> bool:
        """Give the slot back (to the next waiter, if any). Returns False if already released.

        ``outcome`` tells a limit algorithm how the work ended (see :data:`Outcome`): pass
        ``"ignore"`` for a fast failure so that it is not learnt as healthy latency.
        """
        return self._throttler._release(self, outcome)

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
        return f"<Permit {state} of {self._throttler.name!r} ({self.priority})>"


_Waiter = _ThreadWaiter | _AsyncWaiter


class Waiting:
    """An arrival that :meth:`Throttler.admit` queued: wait on it once, or :meth:`cancel` it.

    The time since admission counts against its wait limit, whichever thread waits: a server
    may queue a request on one thread and wait for its slot on another.
    """

    __slots__ = (
        "_deadline",
        "_expires",
        "_reason",
        "_started",
        "_throttler",
        "_waiter",
        "priority",
    )

    def __init__(
        self,
        throttler: Throttler,
        waiter: _Waiter,
        started: float,
        wait_for: float,
        reason: ShedReason,
        priority: str,
        deadline: float | None = None,
    ) -> None:
        self._throttler = throttler
        self._waiter = waiter
        self._deadline = deadline
        self._started = started  # on the throttler's clock
        # Real time, for the wait itself (the throttler's clock may be simulated).
        self._expires = monotonic() + wait_for
        self._reason = reason  # what a timeout is called: queue_timeout or deadline_exceeded
        self.priority = priority

    def wait(self) -> Permit:
        """Block this thread until granted; :class:`Overloaded` when refused or timed out."""
        waiter = self._waiter
        if not isinstance(waiter, _ThreadWaiter):
            raise TypeError("this Waiting was admitted for a task: await wait_async()")
        left = self._expires - monotonic()
        try:
            if left > threading.TIMEOUT_MAX:
                waiter.lock.acquire()
            else:
                waiter.lock.acquire(True, max(left, 0.0))
        except BaseException:
            self._throttler._abandon(waiter, self._started)
            raise
        return self._throttler._after_wait(self)

    async def wait_async(self) -> Permit:
        """Await the slot; cancelling the task leaves the queue (a late grant passes on)."""
        waiter = self._waiter
        if not isinstance(waiter, _AsyncWaiter):
            raise TypeError("this Waiting was admitted for a thread: call wait()")
        left = self._expires - monotonic()
        expiry = (
            waiter.loop.call_later(max(left, 0.0), _resolve, waiter.future)
            if left != math.inf
            else None
        )
        try:
            await waiter.future
        except BaseException:
            self._throttler._abandon(waiter, self._started)
            raise
        finally:
            if expiry is not None:
                expiry.cancel()
        return self._throttler._after_wait(self)

    def cancel(self) -> None:
        """Give up waiting (the client left): leave the queue, passing on any grant."""
        self._throttler._abandon(self._waiter, self._started)


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
    queue_discipline: str | Discipline
    codel_target: float
    codel_interval: float
    priorities: Sequence[str]
    default_priority: str
    shed_thresholds: Mapping[str, float]
    flow_queue_limit: int | None
    burst_window: float
    name: str
    clock: Callable[[], float]


class Throttler:
    """At most ``max_concurrency`` holders at once, up to ``max_queue`` more waiting in order.

    Args:
        max_concurrency: slots: requests that may run at once (int >= 1), or a
            :class:`shedder.limits.Limit` algorithm that learns the limit from latency.
        max_queue: how many more may wait for a slot (>= 0): the places of each priority
            class's room (see ``priorities``). Defaults to the (initial) limit.
        queue_timeout: longest wait for a slot, in seconds (>= 0; ``math.inf`` for no limit).
        shed_threshold: refuse at once, with reason ``"overloaded"``, an arrival that would have
            to wait while ``load >= shed_threshold`` (0 < t <= 1; 1.0 sheds only on a full queue
            or a timeout). This is the default class's threshold; see ``shed_thresholds``.
        retry_after: seconds a refused client should wait (int >= 1), or ``"auto"`` to estimate
            the time the current backlog takes to drain from the observed service time, clamped
            to ``retry_after_range``.
        retry_after_range: ``(low, high)`` bounds in whole seconds for ``"auto"``.
        queue_discipline: how waiters are served, a name or a :class:`shedder.Discipline`:
            ``"fifo"`` (default): first come, first served, a full queue refuses the arrival.
            ``"lifo"``: newest first, a full queue refuses its oldest waiter.
            ``"codel"``: FIFO while the queue keeps emptying; once it has not been empty for
            ``codel_interval`` seconds it is standing: waiters that already waited
            ``codel_target`` seconds are refused (``queue_timeout``), new ones may wait only
            ``codel_target`` and are served newest first (see :class:`shedder.CoDel`).
        codel_target: seconds; the wait allowed while a standing queue is detected.
        codel_interval: seconds the queue must stay non-empty to count as standing.
        priorities: the priority classes, highest first (default: critical, default,
            sheddable). Waiters are served highest class first. Each class waits in a room of
            its own of ``max_queue`` places; during a burst (see ``burst_window``) an arrival
            whose room is full borrows an idle place of another class's room, and otherwise
            takes the newest place of a lower class if one waits (refusing that waiter); each
            class may have its own shed point (``shed_thresholds``), past which a higher class
            likewise takes the newest place of a lower one rather than be refused.
        default_priority: the class of a request that names none (default ``"default"``).
        shed_thresholds: per-class ``shed_threshold`` (an unnamed class uses
            ``shed_threshold``), e.g. ``{"sheddable": 0.75}`` to stop queueing sheddable work
            once ``load`` (every class's waiters counted against one room) reaches 0.75, so
            higher classes' waiters push a lower class past its point. 1.0 is no shed point:
            the class's full room refuses it. By default every class has ``shed_threshold``: a
            lower class is refused first by being served last under overload, not by refusals
            at ordinary load (measured: a 0.75 default refused sheddable work 3x as often at
            0.9x load as no classes did).
        flow_queue_limit: most waiters one flow (tenant, API key, client) may have queued in a
            class; default: half of ``max_queue`` (at least 1). Flows are served in turn, and a
            flow is never refused a place while another flow of its class with waiters holds
            two or more places (waiters and slots) more than it: that flow's newest waiter is
            refused instead, or, if the room has space, the arrival waits past this limit.
        burst_window: seconds (>= 0) a backlog may last and still be a burst, during which
            a class whose room is full may wait in an idle place of the room of another class
            that has found every slot busy before (a higher class takes it back when it needs
            it; a lower one waits for it to drain). A burst drains within moments, and the
            place is a refusal saved (measured at 0.9x load); past it, under overload, each
            class keeps to its own room, so that a standing queue stays one room long. 0:
            never borrow.
        name: label for metrics and health reports.
        clock: monotonic clock in seconds (for simulations; waiting always uses real time).

    Raises ``TypeError``/``ValueError`` naming the parameter for a bad configuration.
    Refusals raise :class:`shedder.Overloaded`.

    Invariant, under ``_lock``: ``bool(_queue)`` implies ``_in_flight >= limit``: a freed slot
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
        queue_discipline: str | Discipline = "fifo",
        codel_target: float = 0.005,
        codel_interval: float = 0.1,
        priorities: Sequence[str] = DEFAULT_PRIORITIES,
        default_priority: str = "default",
        shed_thresholds: Mapping[str, float] | None = None,
        flow_queue_limit: int | None = None,
        burst_window: float = 0.1,
        name: str = "default",
        clock: Callable[[], float] = monotonic,
    ) -> None:
        self._limit: Limit | None
        if isinstance(max_concurrency, Limit):
            self._limit = max_concurrency
            self._max_concurrency = check_int(
                "max_concurrency", max_concurrency.limit, 1, _MAX_SLOTS
            )
        else:
            self._limit = None
            self._max_concurrency = check_int("max_concurrency", max_concurrency, 1, _MAX_SLOTS)
        self._max_queue = (
            self._max_concurrency
            if max_queue is None
            else check_int("max_queue", max_queue, 0, _MAX_SLOTS)
        )
        self._queue_timeout = check_seconds("queue_timeout", queue_timeout)
        self._shed_threshold = check_fraction("shed_threshold", shed_threshold)
        if self._shed_threshold == 0.0:
            raise ValueError(f"shed_threshold must be in (0, 1], got {shed_threshold}")
        if (
            not isinstance(retry_after_range, tuple)
            or len(retry_after_range) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in retry_after_range)
        ):
            raise TypeError(
                f"retry_after_range must be a (low, high) pair of ints, got {retry_after_range!r}"
            )
        low, high = retry_after_range
        check_int("retry_after_range low", low, 1, _MAX_RETRY_AFTER)
        if isinstance(high, int) and high < low:
            raise ValueError(f"retry_after_range high must be >= low ({low}), got {high}")
        check_int("retry_after_range high", high, low, _MAX_RETRY_AFTER)
        self._retry_after_range = (low, high)
        self._retry_after_fixed: int | None
        if retry_after == "auto":
            self._retry_after_fixed = None
        else:
            self._retry_after_fixed = check_int("retry_after", retry_after, 1, _MAX_RETRY_AFTER)
        self._discipline = discipline_named(
            queue_discipline,
            check_seconds("codel_target", codel_target),
            check_seconds("codel_interval", codel_interval),
        )
        self._priorities, self._ranks, self._default_rank = _check_priorities(
            priorities, default_priority
        )
        self._thresholds = _class_thresholds(
            self._priorities, self._default_rank, self._shed_threshold, shed_thresholds
        )
        self._burst_window = check_seconds("burst_window", burst_window)
        # The rooms of the classes whose requests have found every slot busy (_in_house): a
        # higher class may take lower places up to it, and during a burst any class idle
        # places (_admission_locked). With nothing classified it is the default class's room.
        # Kept as a sum, not derived from _in_house: the quick lane reads it per refusal.
        self._house = 0
        self._in_house = [False] * len(self._priorities)
        self._flow_queue_limit = (
            max(1, (self._max_queue + 1) // 2)
            if flow_queue_limit is None
            else check_int("flow_queue_limit", flow_queue_limit, 1)
        )
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self.name = name
        if not callable(clock):
            raise TypeError(f"clock must be callable, got {clock!r}")
        self._clock = clock

        self._lock = threading.Lock()
        self._in_flight = 0
        self._queue = WaiterQueue(len(self._priorities))
        classes = len(self._priorities)
        self._admitted = [0] * classes
        self._cancelled = 0
        self._shed: list[dict[ShedReason, int]] = [
            dict.fromkeys(SHED_REASONS, 0) for _ in range(classes)
        ]
        self._mean_hold = 0.0  # EWMA of slot hold times, seconds (service_time)
        self._hold_deviation = 0.0  # EWMA of their absolute deviation from it
        # Measured only once something reads them (retry_after="auto", a deadline margin
        # "auto", service_time): the uncontended release path is otherwise not slowed.
        self._track_hold = self._retry_after_fixed is None
        # The pace of service while every slot is busy, for refusing at arrival a request that
        # could not start before its deadline: an average of the gaps between releases made
        # while someone waits (each hands its slot straight on), on the throttler's clock.
        self._release_gap = 0.0
        self._gap_samples = 0
        self._last_busy_release: float | None = None  # None: a slot went idle since
        # The current backlog: since when someone has waited, bridging gaps shorter than one
        # release interval (a batch of releases empties the queue for an instant under
        # sustained overload: that is not the backlog ending). See burst_window.
        self._backlog_since = 0.0
        self._emptied_at = -math.inf  # when grants last emptied the queue
        # Permits of a flow -> (class, flow): their slots count among the flow's places (see
        # WaiterQueue.hold) until released. Kept here rather than on Permit, whose every
        # construction it would slow (measured ~70 ns an admission without flows).
        self._flowed: dict[Permit, tuple[int, Hashable]] = {}
        self._refusals: dict[tuple[ShedReason, int, int], Overloaded] = {}
        # Shared refusals, built once when retry_after is fixed: refusing allocates nothing.
        self._fixed_refusals = [
            {reason: self._refusal_locked(reason, rank) for reason in SHED_REASONS}
            for rank in range(classes)
        ]
        # A plain FIFO needs no say on each congested arrival: skip the call.
        self._plain_fifo = type(self._discipline) in (Discipline, FIFO)
        # The quick lane (_quick_lane): per class, the shared queue-full refusal it returns, or
        # None where it cannot decide alone (another discipline, or Retry-After that varies).
        self._quick_refusals: list[Overloaded] | None = (
            [by_reason["queue_full"] for by_reason in self._fixed_refusals]
            if self._plain_fifo and self._retry_after_fixed is not None
            else None
        )
        # Its refusals, counted without the lock: next() on an itertools.count is one C call,
        # which the GIL never interrupts (see _quick_lane). stats() reads a count with next()
        # too, and keeps how often it did so in _quick_reads (under the lock) to take those
        # reads back out.
        self._quick_counts = [itertools.count() for _ in range(classes)]
        self._quick_reads = [0] * classes
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
    def retry_after_auto(self) -> bool:
        """True when ``retry_after="auto"``: Retry-After follows the observed service time."""
        return self._retry_after_fixed is None

    @property
    def queue_timeout(self) -> float:
        return self._queue_timeout

    @property
    def burst_window(self) -> float:
        return self._burst_window

    @property
    def shed_threshold(self) -> float:
        return self._shed_threshold

    @property
    def queue_discipline(self) -> str:
        """The discipline's name (``"fifo"``, ``"lifo"``, ``"codel"``, or a custom one's)."""
        return self._discipline.name

    @property
    def discipline(self) -> Discipline:
        return self._discipline

    @property
    def priorities(self) -> tuple[str, ...]:
        """The priority classes, highest first."""
        return self._priorities

    @property
    def default_priority(self) -> str:
        return self._priorities[self._default_rank]

    def shed_threshold_of(self, priority: str) -> float:
        """The load at which arrivals of class ``priority`` that would wait are refused."""
        return self._thresholds[self._rank(priority)]

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
        return len(self._queue)

    def _work_reserve(self) -> float:
        """Seconds to keep before a deadline for the work itself: a high estimate of the hold
        time (mean plus four mean deviations, as TCP bounds a round trip); 0.0 until known."""
        if not self._track_hold:
            self._track_hold = True
        return self._mean_hold + 4.0 * self._hold_deviation

    @property
    def service_time(self) -> float | None:
        """The observed time a slot is held, in seconds (a moving average over requests that
        ended in ``"success"``), or None before the first one. Measured from the first time
        it is needed: ``retry_after="auto"``, a request of ``Deadlines(margin="auto")`` (which
        keeps this much, and room for its variation, of each budget for the work) or a read of
        this property."""
        self._track_hold = True
        return self._mean_hold or None

    def stats(self) -> ThrottlerStats:
        """A consistent, immutable snapshot of the state and counters."""
        with self._lock:
            shed = self._shed_locked()
            shed_total: dict[ShedReason, int] = dict.fromkeys(SHED_REASONS, 0)
            for counts in shed:
                for reason, count in counts.items():
                    shed_total[reason] += count
            names = self._priorities
            return ThrottlerStats(
                name=self.name,
                in_flight=self._in_flight,
                queued=len(self._queue),
                max_concurrency=self._max_concurrency,
                max_queue=self._max_queue,
                shed_threshold=self._shed_threshold,
                admitted_total=sum(self._admitted),
                cancelled_total=self._cancelled,
                shed_total=MappingProxyType(shed_total),
                queued_by_priority=MappingProxyType(
                    {name: self._queue.count(rank) for rank, name in enumerate(names)}
                ),
                admitted_by_priority=MappingProxyType(
                    dict(zip(names, self._admitted, strict=True))
                ),
                shed_by_priority=MappingProxyType(
                    {name: MappingProxyType(dict(c)) for name, c in zip(names, shed, strict=True)}
                ),
            )

    def _shed_locked(self) -> list[dict[ShedReason, int]]:
        """Refusals per class and reason, the quick lane's included (see _quick_lane)."""
        shed = [dict(counts) for counts in self._shed]
        for rank, counts in enumerate(shed):
            # next() returns the count so far (lane refusals plus earlier reads) and adds one.
            read = next(self._quick_counts[rank])
            counts["queue_full"] += read - self._quick_reads[rank]
            self._quick_reads[rank] += 1
        return shed

    def __repr__(self) -> str:
        return (
            f"<Throttler {self.name!r} in_flight={self._in_flight}/{self._max_concurrency}"
            f" queued={len(self._queue)}/{self._max_queue}>"
        )

    # -- admission -----------------------------------------------------------------------------

    def _rank(self, priority: str) -> int:
        rank = self._ranks.get(priority)
        if rank is None:
            choices = ", ".join(self._priorities)
            raise ValueError(f"priority must be one of {choices}, got {priority!r}")
        return rank

    def admit(
        self,
        *,
        priority: str | None = None,
        flow: Hashable = None,
        deadline: float | None = None,
        timeout: float | None = None,
        waiter: Literal["thread", "async"] = "thread",
    ) -> Permit | Overloaded | Waiting:
        """Decide at once: a :class:`Permit` (admitted), an :class:`Overloaded` (refused, not
        raised) or a :class:`Waiting` (queued: call its ``wait()`` or ``wait_async()``).

        A refusal returned here is shared with other refusals of the same kind (nothing is
        allocated to refuse): read it, and raise ``refusal.copy()`` if you must raise.

        The building block of :meth:`acquire` and of servers that queue a request on one
        thread and wait on another. ``priority`` is a class name (default class if None),
        ``flow`` any hashable key (None: no flow), ``deadline`` the latest useful start on the
        throttler's clock (an arrival past it is refused with ``"deadline_exceeded"``, and so
        is one that by the observed pace of service could only start after it; one that would
        wait past it waits only until then), ``timeout`` overrides ``queue_timeout``.
        ``waiter`` says who will wait: a thread, or a task of the running event loop.
        """
        if timeout is not None:
            timeout = check_seconds("timeout", timeout)
        rank = self._default_rank if priority is None else self._rank(priority)
        now = self._clock()
        evicted: list[tuple[Overloaded, float]] | None = None
        # acquire/try/finally rather than ``with``: the context-manager protocol costs more than
        # the whole refusal decision, on the path that runs for every request.
        lock = self._lock
        lock.acquire()
        try:
            if deadline is not None and deadline <= now:
                self._shed[rank]["deadline_exceeded"] += 1
                refusal: Overloaded | None = self._refusal_locked("deadline_exceeded", rank)
            elif self._in_flight < self._max_concurrency and not self._queue.size:
                permit = Permit(self, now, 0.0, self._priorities[rank], deadline)
                if flow is not None:
                    # Counted first: an unhashable flow raises here and changes nothing.
                    self._queue.hold(rank, flow)
                    self._flowed[permit] = (rank, flow)
                self._in_flight += 1
                self._admitted[rank] += 1
                if not self._listeners:
                    return permit
                refusal = None
            else:
                permit = None
                wait_for = self._queue_timeout if timeout is None else timeout
                queue = self._queue
                size = queue.size
                if (
                    size >= self._max_queue
                    and flow is None
                    and self._plain_fifo
                    and (own := queue.count(rank)) >= self._max_queue
                    and (own == size or queue.lowest_rank() <= rank)
                    and (size >= self._house or now - self._backlog_since >= self._burst_window)
                ):
                    # The usual refusal under overload, decided without another call: the
                    # class's room is full, no lower class waits to give up a place, and no
                    # idle place may be borrowed (the house is full, or it is no burst).
                    self._shed[rank]["queue_full"] += 1
                    refusal = (
                        self._fixed_refusals[rank]["queue_full"]
                        if self._retry_after_fixed is not None
                        else self._refusal_locked("queue_full", rank)
                    )
                    if not self._listeners:
                        return refusal
                elif (
                    deadline is not None
                    and size
                    and self._gap_samples >= _GAP_WARMUP
                    and self._starts_too_late_locked(now, deadline, rank, flow)
                ):
                    # It could not start in time: refused now, without a waiter, rather than
                    # at its deadline (and before anyone is evicted to make room for it).
                    self._shed[rank]["deadline_exceeded"] += 1
                    refusal = self._refusal_locked("deadline_exceeded", rank)
                else:
                    # The loop first: without one this raises before anyone is evicted for it.
                    loop = None if waiter == "thread" else asyncio.get_running_loop()
                    evicted = []
                    refusal, wait_for = self._admission_locked(now, wait_for, rank, flow, evicted)
                if refusal is None:
                    timeout_reason: ShedReason = "queue_timeout"
                    if deadline is not None and deadline - now < wait_for:
                        wait_for = deadline - now
                        timeout_reason = "deadline_exceeded"
                    queued: _Waiter = _ThreadWaiter() if loop is None else _AsyncWaiter(loop)
                    # Empty before this arrival's evictions, if any (they do not end a backlog).
                    if not size and now - self._emptied_at > self._release_gap:
                        self._backlog_since = now  # a new backlog, not an instant's gap
                    queue.push(queued, rank, flow, now)
        finally:
            lock.release()
        # Listeners hear of it outside the lock (they may read stats()).
        name = self._priorities[rank]
        if evicted and self._listeners:
            for victim, since in evicted:
                self._notify_shed(victim, now - since)
        if refusal is not None:
            if self._listeners:
                self._notify("on_shed", refusal.reason, 0.0, refusal.priority)
            return refusal
        if permit is not None:
            self._notify("on_admit", 0.0, name)
            return permit
        if self._listeners:
            self._notify("on_queue", name)
        return Waiting(self, queued, now, wait_for, timeout_reason, name, deadline)

    def _quick_refusal(self, rank: int) -> Overloaded | None:
        """The refusal the quick lane gives arrivals of class ``rank`` (see :meth:`_quick_lane`),
        or None where there is no quick lane: another discipline than FIFO, a Retry-After that
        varies, or no GIL."""
        if self._quick_refusals is None or not _GIL:
            return None
        return self._quick_refusals[rank]

    def _quick_lane(self, rank: int, answer: _A) -> Callable[[], _A | None] | None:
        """The quick lane for arrivals of class ``rank`` with no flow and no deadline, or None
        where there is none (see :meth:`_quick_refusal`).

        The lane answers ``answer`` (the caller's form of ``_quick_refusal(rank)``: the refusal
        itself, or an adapter's encoded response) and counts the refusal when every slot is
        taken, the class's room is full and no lower class waits; else None, and
        :meth:`admit` decides. The adapters ask it before they read a request's headers: under
        overload most arrivals are refused, and no deadline can turn this refusal into anything
        else. It takes no lock: under the GIL each read is atomic, the queue is read before the
        slots (a waiter exists only while every slot is taken, so a full room read here means
        the slots were full then as well), and the refusal is counted with one next() on an
        itertools.count. A closure over what it reads, because it runs for every refused
        request.
        """
        refusal = self._quick_refusal(rank)
        if refusal is None:
            return None
        queue = self._queue
        room = queue.waiters_of(rank)
        max_queue = self._max_queue
        count = self._quick_counts[rank]
        clock = self._clock

        def refuse_full() -> _A | None:
            size = queue.size
            # Below max_queue waiters in all, no room can be full: the usual exit, first.
            if size < max_queue or self._in_flight < self._max_concurrency:
                return None
            # A class's room not full: admit decides (it may also bring the room into the
            # house). Full: refused, unless an idle place may be borrowed (a burst) or a lower
            # class waits to give up its place.
            waiting = len(room)
            if waiting < max_queue:
                return None
            if size < self._house and clock() - self._backlog_since < self._burst_window:
                return None
            if size > waiting and queue.lowest_rank() > rank:
                return None  # a lower class waits: it gives up its place (admit decides)
            next(count)
            if self._listeners:
                self._notify("on_shed", "queue_full", 0.0, refusal.priority)
            return answer

        def refuse_busy() -> _A | None:
            # No room at all (max_queue=0): nobody ever waits, and busy slots are the test.
            if self._in_flight < self._max_concurrency:
                return None
            next(count)
            if self._listeners:
                self._notify("on_shed", "queue_full", 0.0, refusal.priority)
            return answer

        return refuse_full if max_queue else refuse_busy

    def try_acquire(
        self, *, priority: str | None = None, flow: Hashable = None, deadline: float | None = None
    ) -> Permit | None:
        """A slot if one is free now and nobody waits for it, else None; never waits.

        A None is not counted as a refusal: this is a primitive for callers that have their own
        fallback, like ``threading.Semaphore.acquire(blocking=False)``.
        """
        rank = self._default_rank if priority is None else self._rank(priority)
        now = self._clock()
        lock = self._lock
        lock.acquire()  # not ``with``: see admit()
        try:
            if (deadline is not None and deadline <= now) or not (
                self._in_flight < self._max_concurrency and not self._queue.size
            ):
                return None
            permit = Permit(self, now, 0.0, self._priorities[rank], deadline)
            if flow is not None:
                self._queue.hold(rank, flow)
                self._flowed[permit] = (rank, flow)
            self._in_flight += 1
            self._admitted[rank] += 1
        finally:
            lock.release()
        if self._listeners:
            self._notify("on_admit", 0.0, permit.priority)
        return permit

    def acquire(
        self,
        timeout: float | None = None,
        *,
        priority: str | None = None,
        flow: Hashable = None,
        deadline: float | None = None,
    ) -> Permit:
        """Take a slot, blocking this thread in the queue if needed.

        ``timeout`` overrides ``queue_timeout`` for this call; ``priority``, ``flow`` and
        ``deadline`` as in :meth:`admit`. Raises :class:`Overloaded` when refused. Release the
        returned permit exactly once (``with`` does it for you).
        """
        decision = self.admit(
            priority=priority, flow=flow, deadline=deadline, timeout=timeout, waiter="thread"
        )
        if type(decision) is Permit:
            return decision
        if isinstance(decision, Overloaded):
            raise decision.copy()
        assert isinstance(decision, Waiting)
        return decision.wait()

    async def acquire_async(
        self,
        timeout: float | None = None,
        *,
        priority: str | None = None,
        flow: Hashable = None,
        deadline: float | None = None,
    ) -> Permit:
        """Take a slot, awaiting in the queue if needed; same rules as :meth:`acquire`.

        Cancelling the awaiting task removes it from the queue at once; a slot that was handed to
        it at the same instant passes to the next waiter.
        """
        decision = self.admit(
            priority=priority, flow=flow, deadline=deadline, timeout=timeout, waiter="async"
        )
        if type(decision) is Permit:
            return decision
        if isinstance(decision, Overloaded):
            raise decision.copy()
        assert isinstance(decision, Waiting)
        return await decision.wait_async()

    def _admission_locked(
        self,
        now: float,
        wait_for: float,
        rank: int,
        flow: Hashable,
        evicted: list[tuple[Overloaded, float]],
    ) -> tuple[Overloaded | None, float]:
        """No free slot: decide between refusing the arrival and letting it wait.

        Returns the arrival's refusal (or None: it may queue) and how long it may wait; appends
        to ``evicted`` the refusals (and queueing times) of waiters shed to make room for it or
        for having waited too long. The caller enqueues the arrival.
        """
        queue = self._queue
        discipline = self._discipline
        if not self._plain_fifo:
            wait_for = discipline.on_congestion(queue, now, wait_for)
            if discipline.stale_after is not None and queue.size:
                self._shed_stale_locked(now, discipline.stale_after, evicted)
        reason: ShedReason
        if not self._in_house[rank]:
            # The first time the class finds every slot busy, its room joins the house.
            self._in_house[rank] = True
            self._house += self._max_queue
        size = queue.size
        own = queue.count(rank)  # the class's room (each class has one of max_queue places)
        # Fairness inside the class (fair queuing's longest-queue drop): a flow that would be
        # refused a place while another flow of its class holds two or more places (waiters
        # and slots) more than it does takes the newest place of the flow holding the most.
        # Looked up only when the arrival would otherwise be refused.
        fuller: Hashable = None
        capped = flow is not None and queue.flow_count(rank, flow) >= self._flow_queue_limit
        if capped:
            # Below its share, a flow may go over its cap (taking a place if the room is full).
            fuller = queue.fuller_flow(rank, flow)
        if capped and fuller is None:
            reason = "queue_full"  # this flow's share of the room is full
        elif size >= self._house or (
            own >= self._max_queue and now - self._backlog_since >= self._burst_window
        ):
            # The class's room is full (or every room is), and it may not borrow: the newest
            # waiter of a lower class gives up its place, so that a higher class is never
            # refused room while a lower one waits; it may so grow past its room, never past
            # the house. Else a flow below its share takes the fullest flow's newest place.
            # (During a burst, a backlog younger than burst_window, a full room borrows an
            # idle place of the house instead: the next branches, as if it were its own. A
            # burst drains within moments, and a place idle in another class's room is a
            # refusal saved; after it, each class keeps to its room, so that a standing queue
            # stays as short as one room.)
            victim = None
            lowest = queue.lowest_rank()
            if lowest > rank:
                victim = queue.newest(lowest)
            elif own:
                if flow is not None and not capped:
                    fuller = queue.fuller_flow(rank, flow)
                if fuller is not None:
                    victim = self._fair_victim(rank, fuller)
                elif discipline.evict_oldest:
                    victim = queue.oldest(rank)
            if victim is None:
                reason = "queue_full"
            else:
                self._evict_locked(victim, "queue_full", evicted)
                return None, wait_for
        elif (threshold := self._thresholds[rank]) < 1.0 and (
            # A shed point reads the whole house (every class's waiters, so lower classes can
            # be refused at a load higher ones never see); 1 is none: the room decides.
            (self._in_flight + size) / (self._max_concurrency + self._max_queue) >= threshold
        ):
            lowest = queue.lowest_rank()
            if lowest > rank:
                # Over its shed point, a higher class still goes before a lower one: it takes
                # the newest lower-class place rather than be refused while they wait.
                self._evict_locked(queue.newest(lowest), "overloaded", evicted)
                return None, wait_for
            if flow is not None and not capped:
                fuller = queue.fuller_flow(rank, flow)
            if fuller is not None:
                # Likewise a flow below its share, against the flow holding the most.
                self._evict_locked(self._fair_victim(rank, fuller), "overloaded", evicted)
                return None, wait_for
            reason = "overloaded"
        else:
            return None, wait_for
        self._shed[rank][reason] += 1
        if self._retry_after_fixed is not None:
            return self._fixed_refusals[rank][reason], wait_for
        return self._refusal_locked(reason, rank), wait_for

    def _fair_victim(self, rank: int, flow: Hashable) -> Any:
        """The waiter of ``flow`` (which waits in class ``rank``) that gives up its place: its
        newest, or its oldest under a discipline that refuses the oldest of a full room."""
        if self._discipline.evict_oldest:
            return self._queue.flow_oldest(rank, flow)
        return self._queue.flow_newest(rank, flow)

    def _refusal_locked(self, reason: ShedReason, rank: int) -> Overloaded:
        """The refusal of an arrival: one shared instance per (reason, retry_after, class).

        Refusing allocates nothing on the hot path; :meth:`acquire` raises a copy, so the
        shared instance never carries a traceback.
        """
        retry_after = self._retry_after_fixed or self._retry_after_locked()
        key = (reason, retry_after, rank)
        refusal = self._refusals.get(key)
        if refusal is None:
            refusal = Overloaded(reason, retry_after, self._priorities[rank])
            if len(self._refusals) < 512:  # "auto" spans a range: keep the table bounded
                refusal._shared = True
                self._refusals[key] = refusal
        return refusal

    def _starts_too_late_locked(
        self, now: float, deadline: float, rank: int, flow: Hashable
    ) -> bool:
        """Whether an arrival that must wait would start only after ``deadline``, by the
        observed pace of service (once warmed up: see ``_GAP_WARMUP``).

        With ``ahead`` waiters served before it, it starts at the ``ahead + 1``-th release
        from now: about ``(ahead + 1) * gap`` away. Counted as ahead are only the waiters
        certainly served first: those of higher classes and (unless the newest is served
        first) the earlier ones of its own flow's line; other flows of its class take turns
        with it. One first in line is never refused on the estimate. Whoever is let in and
        still misses its deadline is refused when it passes, as before.
        """
        queue = self._queue
        ahead = 0 if self._discipline.newest_first else queue.flow_count(rank, flow)
        for higher in range(rank):
            ahead += queue.count(higher)
        return ahead > 0 and now + (ahead + 1) * self._release_gap > deadline

    def _shed_stale_locked(
        self, now: float, age: float, evicted: list[tuple[Overloaded, float]]
    ) -> None:
        """Refuse, oldest first in each class, the waiters that have waited ``age`` or longer."""
        queue = self._queue
        for rank in range(queue.lowest_rank(), -1, -1):
            while (oldest := queue.oldest(rank)) is not None and now - oldest.since >= age:
                self._evict_locked(oldest, "queue_timeout", evicted)

    def _evict_locked(
        self, waiter: Any, reason: ShedReason, evicted: list[tuple[Overloaded, float]]
    ) -> None:
        """Refuse a queued waiter now (to make room, or for having waited too long)."""
        self._queue.remove(waiter)
        self._shed[waiter.rank][reason] += 1
        if waiter.wake(reason):  # else its loop is gone: nobody to tell
            refusal = Overloaded(reason, self._retry_after_locked(), self._priorities[waiter.rank])
            evicted.append((refusal, waiter.since))

    def _after_wait(self, waiting: Waiting) -> Permit:
        """The waiter woke (granted, refused or timed out); settle which under the lock."""
        waiter = waiting._waiter
        now = self._clock()
        waited = now - waiting._started
        rank = waiter.rank
        with self._lock:
            outcome = waiter.outcome
            if outcome == _GRANTED and waiter.granted_at > waiting._expires:
                # Granted only after its wait had ended, which happens when nobody was waiting
                # on it yet (a server thread picks the request up late): it is past its deadline
                # or queue_timeout, so refuse it as such and pass the slot on.
                outcome = None
                self._in_flight -= 1
                if waiter.flow is not None:
                    self._queue.unhold(rank, waiter.flow)
                self._fill_slots_locked(now)
                reason = waiting._reason
                self._shed[rank][reason] += 1
                refusal = Overloaded(reason, self._retry_after_locked(), self._priorities[rank])
            elif outcome == _GRANTED:
                self._admitted[rank] += 1
                permit = Permit(self, now, waited, self._priorities[rank], waiting._deadline)
                if waiter.flow is not None:
                    # Its slot was counted at the grant (pop_next(hold=True)): now the permit's.
                    self._flowed[permit] = (rank, waiter.flow)
            elif outcome is None:
                # Timed out. Still queued: grants and evictions remove the waiter first.
                self._queue.remove(waiter)
                reason = waiting._reason
                self._shed[rank][reason] += 1
                refusal = Overloaded(reason, self._retry_after_locked(), self._priorities[rank])
                # Not fed to the limit as a drop: a queue timeout says more arrive than the
                # service takes, not that the service is congested, and shrinking the limit
                # for it cuts throughput while the load stays the same (a death spiral).
            elif outcome == "cancelled":
                raise RuntimeError("this Waiting was cancelled; it cannot be waited on")
            else:
                # Evicted by a newer arrival, which counted it and told the listeners.
                raise Overloaded(outcome, self._retry_after_locked(), self._priorities[rank])
        if outcome is None:
            self._notify_shed(refusal, waited)
            raise refusal
        if self._listeners:
            self._notify("on_admit", waited, permit.priority)
        return permit

    def _abandon(self, waiter: _Waiter, started: float) -> None:
        """The waiter gave up (cancelled, interrupted); leave the queue, passing on any grant.

        Idempotent: the waiter is marked ``"cancelled"``, so a second call does nothing.
        """
        with self._lock:
            outcome = waiter.outcome
            if outcome == _GRANTED:
                self._in_flight -= 1
                if waiter.flow is not None:
                    self._queue.unhold(waiter.rank, waiter.flow)
                self._fill_slots_locked(self._clock())
            elif outcome is None:
                # Normally still queued; a waiter skipped because its loop closed is not.
                self._queue.remove(waiter)
            else:
                return  # refused first (that refusal is its outcome), or already abandoned
            waiter.outcome = "cancelled"
            self._cancelled += 1
        self._notify("on_cancel", self._clock() - started)

    # -- releasing -----------------------------------------------------------------------------

    def _release(self, permit: Permit, outcome: Outcome) -> bool:
        if outcome not in _OUTCOMES:
            raise ValueError(f"outcome must be success, ignore or dropped, got {outcome!r}")
        now = self._clock()
        lock = self._lock
        lock.acquire()  # not ``with``: see admit()
        try:
            if permit._released:
                return False
            permit._released = True
            held = now - permit.acquired_at
            self._in_flight -= 1
            if self._flowed:
                place = self._flowed.pop(permit, None)
                if place is not None:
                    self._queue.unhold(*place)
            if self._track_hold and outcome == "success":
                if self._mean_hold:
                    error = held - self._mean_hold
                    self._mean_hold += 0.1 * error
                    self._hold_deviation += 0.1 * (abs(error) - self._hold_deviation)
                else:
                    self._mean_hold = held
            if self._limit is not None and outcome != "ignore":
                limit = self._limit.update(held, self._in_flight + 1, outcome == "dropped")
                if limit != self._max_concurrency:
                    self._max_concurrency = max(1, limit)
            if self._queue.size:
                # Someone waits, so every slot was busy: the time since the last such release
                # is one service interval (a slot that went idle in between reset the run).
                last = self._last_busy_release
                if last is not None:
                    samples = self._gap_samples + 1
                    self._gap_samples = samples
                    # A plain mean of the first samples, then an EWMA that follows drift.
                    self._release_gap += (now - last - self._release_gap) / min(
                        samples, _GAP_WINDOW
                    )
                self._last_busy_release = now
                self._fill_slots_locked(now)
            else:
                self._last_busy_release = None  # this slot goes idle: the run ends
            listeners = self._listeners
        finally:
            lock.release()
        if listeners:
            self._notify("on_release", held)
        return True

    def _fill_slots_locked(self, now: float) -> None:
        """Hand free slots to waiters (``now`` on the throttler's clock): highest class first,
        flows in turn, per the discipline."""
        queue = self._queue
        if queue:
            granted_at = monotonic()
            while queue and self._in_flight < self._max_concurrency:
                # hold=True: a flow's waiter keeps its place as it takes the slot.
                waiter: Any = queue.pop_next(self._discipline.newest_first, hold=True)
                waiter.granted_at = granted_at
                if waiter.wake(_GRANTED):
                    self._in_flight += 1
                elif waiter.flow is not None:
                    queue.unhold(waiter.rank, waiter.flow)
            if not queue:
                # Drained by grants (other removals leave the mark older, so the next backlog
                # counts as new: a burst, the side that refuses nobody for it).
                self._emptied_at = now
        if self._in_flight < self._max_concurrency:
            self._last_busy_release = None  # a slot is idle: the run ends

    def _retry_after_locked(self) -> int:
        if self._retry_after_fixed is not None:
            return self._retry_after_fixed
        low, high = self._retry_after_range
        backlog = self._in_flight + len(self._queue) + 1
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
            self._notify("on_shed", refusal.reason, waited, refusal.priority)


# The release pace is trusted for refusals only after this many gaps (a cold throttler never
# refuses on a guess), and then follows an EWMA over about this many.
_GAP_WARMUP = 8
_GAP_WINDOW = 16

# Whether this interpreter runs with the GIL (free-threaded builds may not): the quick lane
# counts without the lock only under it.
_GIL: bool = getattr(sys, "_is_gil_enabled", lambda: True)()

# No process runs a billion requests at once; a bigger figure is a typo, and an absurd one
# (10**5000) would break every health answer that prints it.
_MAX_SLOTS = 10**9

# Retry-After is sent as an integer header: keep it a number every client can parse and act on
# (a day), rather than accept a value that overflows on the way out.
_MAX_RETRY_AFTER = 86_400


def _check_priorities(
    priorities: object, default_priority: object
) -> tuple[tuple[str, ...], dict[str, int], int]:
    if isinstance(priorities, str) or not isinstance(priorities, Sequence):
        raise TypeError(f"priorities must be a sequence of class names, got {priorities!r}")
    names = tuple(priorities)
    if not names:
        raise ValueError("priorities must name at least one class")
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"priorities must be non-empty strings, got {name!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"priorities must be distinct, got {names!r}")
    if default_priority not in names:
        raise ValueError(
            f"default_priority must be one of the priorities ({', '.join(names)}),"
            f" got {default_priority!r}"
        )
    ranks = {name: rank for rank, name in enumerate(names)}
    return names, ranks, names.index(default_priority)


def _class_thresholds(
    names: tuple[str, ...],
    default_rank: int,
    shed_threshold: float,
    given: Mapping[str, float] | None,
) -> tuple[float, ...]:
    thresholds = [shed_threshold] * len(names)
    if given is not None:
        if not isinstance(given, Mapping):
            raise TypeError(f"shed_thresholds must be a mapping of class to load, got {given!r}")
        for name, value in given.items():
            if name not in names:
                choices = ", ".join(names)
                raise ValueError(f"shed_thresholds names an unknown class {name!r} ({choices})")
            threshold = check_number(f"shed_thresholds[{name!r}]", value, 0.0, 1.0)
            if threshold == 0.0:
                raise ValueError(f"shed_thresholds[{name!r}] must be in (0, 1], got {value}")
            thresholds[names.index(name)] = threshold
    return tuple(thresholds)
