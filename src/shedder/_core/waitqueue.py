"""The waiting room: waiters ordered by priority class, then by flow in turn, then by arrival.

Used under its owner's lock only; every operation is O(1) in the number of waiters (O(classes)
to find the highest or lowest non-empty class, and there are a handful). With one class and no
flows it is a plain arrival-ordered queue.

Inside a class, each flow (a tenant, an API key, a client) has its own arrival-ordered line and
the lines are served in turn (round-robin, the unit-cost case of deficit round-robin), so one
busy flow cannot starve the others. A flow's line exists only while it has waiters: the table
of flows is bounded by the number of waiters, however many distinct flows come and go.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Protocol

__all__ = ["QueuedWaiter", "WaiterQueue"]


class QueuedWaiter(Protocol):
    """What the queue needs of a waiter: where it stands. Set by :meth:`WaiterQueue.push`."""

    rank: int
    flow: Hashable
    since: float


class _ClassLine:
    """One priority class: its waiters in arrival order, and one line per flow."""

    __slots__ = ("flows", "order")

    def __init__(self) -> None:
        self.order: OrderedDict[QueuedWaiter, None] = OrderedDict()
        # Flow key -> its waiters in arrival order; iteration order is the serving turn.
        self.flows: OrderedDict[Hashable, OrderedDict[QueuedWaiter, None]] = OrderedDict()


class WaiterQueue:
    """Waiters by class (rank 0 is served first), flows in turn within a class, FIFO or LIFO."""

    __slots__ = ("_classes", "size")

    def __init__(self, classes: int = 1) -> None:
        self._classes = [_ClassLine() for _ in range(classes)]
        self.size = 0
        """How many wait (a plain attribute: the throttler's fast path reads it)."""

    def __len__(self) -> int:
        return self.size

    def __bool__(self) -> bool:
        return self.size > 0

    def __iter__(self) -> Iterator[QueuedWaiter]:
        """Every waiter, highest class first, each class in arrival order."""
        for line in self._classes:
            yield from line.order

    def count(self, rank: int) -> int:
        """Waiters of class ``rank``."""
        return len(self._classes[rank].order)

    def flow_count(self, rank: int, flow: Hashable) -> int:
        """Waiters of ``flow`` in class ``rank``."""
        line = self._classes[rank].flows.get(flow)
        return 0 if line is None else len(line)

    def push(self, waiter: QueuedWaiter, rank: int, flow: Hashable, since: float) -> None:
        waiter.rank, waiter.flow, waiter.since = rank, flow, since
        line = self._classes[rank]
        line.order[waiter] = None
        own = line.flows.get(flow)
        if own is None:
            own = line.flows[flow] = OrderedDict()
        own[waiter] = None
        self.size += 1

    def remove(self, waiter: QueuedWaiter) -> bool:
        """Take ``waiter`` out wherever it stands; False if it was not queued."""
        line = self._classes[waiter.rank]
        if waiter not in line.order:
            return False
        del line.order[waiter]
        own = line.flows[waiter.flow]
        del own[waiter]
        if not own:
            del line.flows[waiter.flow]
        self.size -= 1
        return True

    def pop_next(self, newest_first: bool) -> QueuedWaiter:
        """The next waiter to serve: highest class, the flow whose turn it is, oldest (newest)."""
        for line in self._classes:
            if line.order:
                # Newest first reads the turns backwards too: with one flow per request (a flow
                # per client address) it must still serve the latest arrival.
                flows = line.flows
                flow, own = next(reversed(flows.items()) if newest_first else iter(flows.items()))
                waiter, _ = own.popitem(last=newest_first)
                if own:
                    flows.move_to_end(flow, last=not newest_first)  # its turn is over
                else:
                    del line.flows[flow]
                del line.order[waiter]
                self.size -= 1
                return waiter
        raise IndexError("pop from an empty WaiterQueue")

    def lowest_rank(self) -> int:
        """The rank of the lowest non-empty class; -1 when empty."""
        for rank in range(len(self._classes) - 1, -1, -1):
            if self._classes[rank].order:
                return rank
        return -1

    def oldest(self, rank: int) -> QueuedWaiter | None:
        """The longest-waiting waiter of class ``rank``."""
        order = self._classes[rank].order
        return next(iter(order)) if order else None

    def newest(self, rank: int) -> QueuedWaiter | None:
        """The latest arrival of class ``rank``."""
        order = self._classes[rank].order
        return next(reversed(order)) if order else None
