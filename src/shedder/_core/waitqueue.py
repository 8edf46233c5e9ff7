"""The waiting room: waiters ordered by priority class, then by flow in turn, then by arrival.

Used under its owner's lock only; every operation is O(1) in the number of waiters (O(classes)
to find the highest or lowest non-empty class, and there are a handful), but for the places
of flows, kept in a heap: O(log n). With one class and no flows it is a plain arrival-ordered
queue.

Inside a class, each flow (a tenant, an API key, a client) has its own arrival-ordered line and
the lines are served in turn (round-robin, the unit-cost case of deficit round-robin), so one
busy flow cannot starve the others. A flow's line exists only while it has waiters: the table
of flows is bounded by the number of waiters, however many distinct flows come and go.

The queue also counts each flow's *places* in a class: its waiters and the slots its requests
hold (the owner reports slots with :meth:`WaiterQueue.hold` and :meth:`WaiterQueue.unhold`),
so that :meth:`WaiterQueue.fuller_flow` can name the flow holding the most of the house when a
smaller one needs a place (fair queuing's longest-queue drop). Slot counts exist only while a
flow holds a slot: bounded by the slots. Requests without a flow (``None``) are not counted.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sized
from typing import Protocol

__all__ = ["QueuedWaiter", "WaiterQueue"]


class QueuedWaiter(Protocol):
    """What the queue needs of a waiter: where it stands. Set by :meth:`WaiterQueue.push`."""

    rank: int
    flow: Hashable
    since: float


class _ClassLine:
    """One priority class: its waiters in arrival order, one line per flow, flows' places."""

    __slots__ = ("flows", "heap", "held", "order")

    def __init__(self) -> None:
        self.order: OrderedDict[QueuedWaiter, None] = OrderedDict()
        # Flow key -> its waiters in arrival order; iteration order is the serving turn.
        self.flows: OrderedDict[Hashable, OrderedDict[QueuedWaiter, None]] = OrderedDict()
        # Flow key -> slots held by its requests of this class (only while it holds one).
        self.held: dict[Hashable, int] = {}
        # (-places, sequence, flow) for flows with waiters; stale entries are dropped lazily
        # (an entry is current while its flow waits and holds exactly that many places).
        self.heap: list[tuple[int, int, Hashable]] = []

    def places(self, flow: Hashable) -> int:
        own = self.flows.get(flow)
        return (0 if own is None else len(own)) + self.held.get(flow, 0)


class WaiterQueue:
    """Waiters by class (rank 0 is served first), flows in turn within a class, FIFO or LIFO."""

    __slots__ = ("_classes", "_sequence", "size")

    def __init__(self, classes: int = 1) -> None:
        self._classes = [_ClassLine() for _ in range(classes)]
        self._sequence = 0  # ties in the heaps: flow keys need not be comparable
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

    def waiters_of(self, rank: int) -> Sized:
        """The waiters of class ``rank``, live (the same object for the queue's lifetime): a
        caller that only needs their number can hold it and call ``len()``."""
        return self._classes[rank].order

    def flow_count(self, rank: int, flow: Hashable) -> int:
        """Waiters of ``flow`` in class ``rank``."""
        line = self._classes[rank].flows.get(flow)
        return 0 if line is None else len(line)

    def places(self, rank: int, flow: Hashable) -> int:
        """Places ``flow`` holds in class ``rank``: its waiters and its slots."""
        return self._classes[rank].places(flow)

    def push(self, waiter: QueuedWaiter, rank: int, flow: Hashable, since: float) -> None:
        waiter.rank, waiter.flow, waiter.since = rank, flow, since
        line = self._classes[rank]
        line.order[waiter] = None
        own = line.flows.get(flow)
        if own is None:
            own = line.flows[flow] = OrderedDict()
        own[waiter] = None
        self.size += 1
        if flow is not None:
            self._mark(line, flow)

    def remove(self, waiter: QueuedWaiter) -> bool:
        """Take ``waiter`` out wherever it stands; False if it was not queued."""
        line = self._classes[waiter.rank]
        if waiter not in line.order:
            return False
        del line.order[waiter]
        flow = waiter.flow
        own = line.flows[flow]
        del own[waiter]
        if not own:
            del line.flows[flow]
            if not line.flows:
                line.heap.clear()  # every entry is stale
        elif flow is not None:
            self._mark(line, flow)
        self.size -= 1
        return True

    def pop_next(self, newest_first: bool, hold: bool = False) -> QueuedWaiter:
        """The next waiter to serve: of the highest class with waiters, then of the flow whose
        turn it is, its oldest (newest).

        ``hold``: the waiter is given a slot, so its flow keeps the place (see :meth:`hold`;
        call :meth:`unhold` if the grant fails).
        """
        for line in self._classes:  # the highest class with waiters
            if line.order:
                break
        else:
            raise IndexError("pop from an empty WaiterQueue")
        # Newest first reads the turns backwards too: with one flow per request (a flow per
        # client address) it must still serve the latest arrival.
        flows = line.flows
        flow, own = next(reversed(flows.items()) if newest_first else iter(flows.items()))
        waiter, _ = own.popitem(last=newest_first)
        if own:
            flows.move_to_end(flow, last=not newest_first)  # its turn is over
        else:
            del flows[flow]
            if not flows:
                line.heap.clear()  # every entry is stale
        del line.order[waiter]
        self.size -= 1
        if flow is not None:
            if hold:
                line.held[flow] = line.held.get(flow, 0) + 1  # same places as before
            elif own:
                self._mark(line, flow)
        return waiter

    def hold(self, rank: int, flow: Hashable) -> None:
        """A request of ``flow`` (not None) took a slot in class ``rank`` without waiting."""
        line = self._classes[rank]
        line.held[flow] = line.held.get(flow, 0) + 1
        if flow in line.flows:
            self._mark(line, flow)

    def unhold(self, rank: int, flow: Hashable) -> None:
        """A slot of ``flow`` (not None) in class ``rank`` was given back."""
        line = self._classes[rank]
        held = line.held[flow] - 1
        if held:
            line.held[flow] = held
        else:
            del line.held[flow]
        if flow in line.flows:
            self._mark(line, flow)

    def _mark(self, line: _ClassLine, flow: Hashable) -> None:
        """``flow`` waits in ``line`` and its places changed: record the current count."""
        heap = line.heap
        self._sequence += 1
        heapq.heappush(heap, (-line.places(flow), self._sequence, flow))
        if len(heap) > 2 * len(line.flows) + 16:
            # Mostly stale entries: rebuild from the flows that wait (amortised O(1) a change).
            heap.clear()
            for key in line.flows:
                if key is not None:
                    self._sequence += 1
                    heap.append((-line.places(key), self._sequence, key))
            heapq.heapify(heap)

    def fuller_flow(self, rank: int, flow: Hashable) -> Hashable:
        """The flow with waiters in class ``rank`` that holds the most places, if it holds at
        least two more than ``flow`` (so that one place moved leaves it no fewer); else None.

        Requests without a flow are never named.
        """
        line = self._classes[rank]
        heap = line.heap
        flows = line.flows
        while heap:
            negative, _, top = heap[0]
            if top in flows and line.places(top) == -negative:
                return top if -negative >= line.places(flow) + 2 else None
            heapq.heappop(heap)  # stale: the flow left, or its places changed since
        return None

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

    def flow_oldest(self, rank: int, flow: Hashable) -> QueuedWaiter | None:
        """The longest-waiting waiter of ``flow`` in class ``rank``."""
        own = self._classes[rank].flows.get(flow)
        return next(iter(own)) if own else None

    def flow_newest(self, rank: int, flow: Hashable) -> QueuedWaiter | None:
        """The latest arrival of ``flow`` in class ``rank``."""
        own = self._classes[rank].flows.get(flow)
        return next(reversed(own)) if own else None
