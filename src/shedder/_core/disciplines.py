"""Queue disciplines: how a throttler's waiting room is served, as small strategy objects.

A discipline is consulted under the throttler's one lock, so its methods are a few attribute
updates long and never block. Pass one as ``Throttler(queue_discipline=CoDel(...))``, or a name:
``"fifo"`` (the default), ``"lifo"``, ``"codel"``. Priority classes and flows sit above the
discipline: it orders waiters *within* a flow's line and decides what a full room does.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from .checks import check_seconds

if TYPE_CHECKING:
    from .waitqueue import WaiterQueue

__all__ = ["FIFO", "LIFO", "CoDel", "Discipline", "discipline_named"]


class Discipline:
    """Base class: first come, first served; a full waiting room refuses the arrival.

    Attributes read by the throttler under its lock: ``newest_first`` (serve the newest waiter
    of a line first), ``evict_oldest`` (a full room refuses its oldest waiter of the arrival's
    class instead of the arrival) and ``stale_after`` (None, or seconds: after
    :meth:`on_congestion`, waiters that have waited that long are refused with
    ``queue_timeout``).
    """

    name = "fifo"
    newest_first = False
    evict_oldest = False
    stale_after: float | None = None

    def bind(self) -> Discipline:
        """A copy for one throttler (disciplines with state must not be shared)."""
        return copy.copy(self)

    def on_congestion(self, queue: WaiterQueue, now: float, wait_for: float) -> float:
        """An arrival found no free slot. Returns how long it may wait (<= ``wait_for``)."""
        return wait_for

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FIFO(Discipline):
    """First come, first served (the default)."""


class LIFO(Discipline):
    """Newest first; a full room refuses its oldest waiter (``queue_full``) to admit the new.

    Under sustained overload the newest requests are the ones whose clients still wait, so
    serving them first keeps goodput while old ones are refused.
    """

    name = "lifo"
    newest_first = True
    evict_oldest = True


class CoDel(Discipline):
    """Controlled delay: FIFO while the queue keeps emptying, short LIFO waits once it stands.

    The queue is *standing* once it has not been empty for ``interval`` seconds. While it
    stands, waiters that already waited ``target`` seconds are refused (``queue_timeout``), new
    ones may wait only ``target`` and are served newest first, so a standing queue cannot
    form. It stands until arrivals have found a free slot for a whole ``interval`` (not merely
    until the short waits empty the queue, which under overload would flip it back to long
    FIFO waits many times a second).
    """

    name = "codel"

    def __init__(self, target: float = 0.005, interval: float = 0.1) -> None:
        self.target = check_seconds("codel_target", target)
        self.interval = check_seconds("codel_interval", interval)
        self.standing = False
        self._busy_since = 0.0  # when the queue last went from empty to non-empty
        self._last_congested = -float("inf")  # when an arrival last found no free slot

    def bind(self) -> CoDel:
        return CoDel(self.target, self.interval)

    def _stand(self, standing: bool) -> None:
        # While standing: newest first, a full room refuses its oldest waiter, and whoever
        # already waited the target is refused.
        self.standing = self.newest_first = self.evict_oldest = standing
        self.stale_after = self.target if standing else None

    def on_congestion(self, queue: WaiterQueue, now: float, wait_for: float) -> float:
        if self.standing and now - self._last_congested >= self.interval:
            self._stand(False)  # a whole interval with a free slot for every arrival
        self._last_congested = now
        if not queue and not self.standing:
            self._busy_since = now
        elif now - self._busy_since >= self.interval:
            self._stand(True)
        if not self.standing:
            return wait_for
        # Whoever already waited the target is refused now (stale_after) rather than at its own
        # (long) queue_timeout.
        return min(wait_for, self.target)

    def __repr__(self) -> str:
        return f"CoDel(target={self.target}, interval={self.interval})"


_NAMED: dict[str, type[Discipline]] = {"fifo": FIFO, "lifo": LIFO, "codel": CoDel}


def discipline_named(
    value: object, codel_target: float = 0.005, codel_interval: float = 0.1
) -> Discipline:
    """A discipline from a name (``"fifo"``, ``"lifo"``, ``"codel"``) or an instance (copied)."""
    if isinstance(value, Discipline):
        return value.bind()
    if isinstance(value, str) and value in _NAMED:
        if value == "codel":
            return CoDel(codel_target, codel_interval)
        return _NAMED[value]()
    choices = ", ".join(_NAMED)
    if isinstance(value, str):
        raise ValueError(f"queue_discipline must be one of {choices}, got {value!r}")
    raise TypeError(
        f"queue_discipline must be a name ({choices}) or a shedder.Discipline, got {value!r}"
    )
