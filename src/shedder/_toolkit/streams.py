"""Pull-based streams in the spirit of Reactive Streams (https://www.reactive-streams.org).

A :class:`Subscriber` asks for ``n`` more items with ``Subscription.request(n)``; the publisher
never sends more than the subscriber asked for, so a slow consumer throttles a fast producer.
The rules kept here, numbered as in the specification:

- 1.1 never more ``on_next`` signals than requested in total;
- 1.3 / 2.7 signals are serialized: never two at once, whichever threads call ``request``;
- 1.7 / 2.4 ``on_error`` / ``on_complete`` at most once, and nothing after them;
- 1.9 ``on_subscribe`` comes first; 3.3 a ``request`` made from ``on_next`` does not recurse;
- 3.6 / 3.7 after ``cancel``, ``request`` and ``cancel`` are no-ops; 3.8 cancel stops delivery;
- 3.9 ``request(n)`` with ``n <= 0`` signals ``on_error(ValueError)``;
- 3.17 demand up to ``2**63 - 1`` is "unbounded".
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from queue import Full
from types import TracebackType
from typing import Any, Generic, Literal, Protocol, TypeVar

from .queues import BlockingQueue

__all__ = [
    "UNBOUNDED",
    "IterablePublisher",
    "Publisher",
    "PublisherIterator",
    "Subscriber",
    "Subscription",
    "iterate",
]

logger = logging.getLogger("shedder")

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)
T_co = TypeVar("T_co", covariant=True)

UNBOUNDED = 2**63 - 1
"""Demand at or above this counts as unbounded (rule 3.17)."""


class Subscription(Protocol):
    """The link between one publisher and one subscriber."""

    def request(self, n: int) -> None:
        """Ask for ``n`` more items (n >= 1; n <= 0 signals ``on_error(ValueError)``)."""

    def cancel(self) -> None:
        """Stop delivery and release the publisher's resources; idempotent."""


class Subscriber(Protocol[T_contra]):
    """Receives a stream's signals, one at a time: ``on_subscribe``, then ``on_next`` as many
    times as requested, then at most one of ``on_error`` / ``on_complete``."""

    def on_subscribe(self, subscription: Subscription) -> None: ...

    def on_next(self, item: T_contra) -> None: ...

    def on_error(self, error: BaseException) -> None: ...

    def on_complete(self) -> None: ...


class Publisher(Protocol[T_co]):
    """A source of items that sends them only as subscribers request them."""

    def subscribe(self, subscriber: Subscriber[T_co]) -> None: ...


class IterablePublisher(Generic[T]):
    """Publishes the items of an iterable, pulling each one only once it has been requested.

    Each :meth:`subscribe` starts a new iteration (``iter(iterable)``), so a list can be
    published to many subscribers, an iterator or generator to one. An exception raised by the
    iterator is signalled as ``on_error``; cancelling closes a generator.
    """

    def __init__(self, iterable: Iterable[T]) -> None:
        self._iterable = iterable

    def subscribe(self, subscriber: Subscriber[T]) -> None:
        _IteratorSubscription(subscriber, iter(self._iterable))._start()


class _IteratorSubscription(Generic[T]):
    """Enforces the rules around an iterator. One thread at a time holds ``_draining`` and only
    that thread signals the subscriber (rule 1.3); others just add demand and leave. Calls made
    by the subscriber from inside a signal see ``_draining`` set, which is how rule 3.3 holds."""

    def __init__(self, subscriber: Subscriber[T], iterator: Iterator[T]) -> None:
        self._subscriber = subscriber
        self._iterator: Iterator[T] | None = iterator
        self._lock = threading.Lock()
        self._demand = 0
        self._draining = True  # taken until on_subscribe has returned (rule 1.9)
        self._done = False  # terminal signal sent or subscription cancelled
        self._invalid_request: ValueError | None = None

    def _start(self) -> None:
        if self._signal("on_subscribe", self):
            self._drain()
        else:
            self._close()

    def request(self, n: int) -> None:
        with self._lock:
            if self._done:
                return  # rule 3.6
            if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
                if self._invalid_request is None:
                    self._invalid_request = ValueError(
                        f"request(n) needs n >= 1 (Reactive Streams rule 3.9), got {n!r}"
                    )
            else:
                self._demand = min(self._demand + n, UNBOUNDED)
            if self._draining:
                return  # the draining thread will see the new demand before it stops
            self._draining = True
        self._drain()

    def cancel(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
            if self._draining:
                return  # the draining thread owns the iterator; it closes it on its way out
            self._draining = True
        self._close()

    def _drain(self) -> None:
        """Deliver while there is demand; called only by the thread that set ``_draining``."""
        iterator = self._iterator
        while True:
            with self._lock:
                if self._done:
                    break
                error = self._invalid_request
                if error is None:
                    if self._demand == 0:
                        self._draining = False
                        return
                    if self._demand < UNBOUNDED:
                        self._demand -= 1
            if error is not None or iterator is None:
                self._finish("on_error", error or RuntimeError("stream already closed"))
                break
            try:
                item = next(iterator)
            except StopIteration:
                self._finish("on_complete")
                break
            except Exception as exc:
                self._finish("on_error", exc)
                break
            if self._done or not self._signal("on_next", item):
                break  # cancelled meanwhile (rule 3.8), or the subscriber broke (rule 2.13)
        self._close()

    def _finish(self, signal: Literal["on_error", "on_complete"], *args: Any) -> None:
        with self._lock:
            if self._done:
                return  # cancelled: no terminal signal after a cancel
            self._done = True
        self._signal(signal, *args)

    def _signal(self, method: str, *args: Any) -> bool:
        """Call the subscriber; if it raises, it broke rule 2.13: cancel, log, report False."""
        try:
            getattr(self._subscriber, method)(*args)
        except Exception:
            logger.exception("shedder stream subscriber %r failed in %s", self._subscriber, method)
            with self._lock:
                self._done = True
            return False
        return True

    def _close(self) -> None:
        # Drop the references (rule 3.13) and close a generator so its finally blocks run.
        iterator, self._iterator = self._iterator, None
        close = getattr(iterator, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                logger.exception("shedder stream: closing %r failed", iterator)


_ITEM, _ERROR, _COMPLETE = "item", "error", "complete"


class PublisherIterator(Generic[T]):
    """An async iterator over a publisher with bounded demand; see :func:`iterate`.

    It is the publisher's subscriber: signals may come from any thread. Leaving early
    (``break``, an exception, cancellation) cancels the subscription when used with
    ``async with``, or call :meth:`aclose`.
    """

    def __init__(self, publisher: Publisher[T], demand: int) -> None:
        if not isinstance(demand, int) or isinstance(demand, bool) or demand < 1:
            raise ValueError(f"demand must be an int >= 1, got {demand!r}")
        self._publisher = publisher
        self._demand = demand
        # Re-request in batches of half the demand: fewer calls, still never above ``demand``.
        self._batch = max(demand // 2, 1)
        self._unrequested = 0  # consumed items not yet requested again
        # Room for every requested item plus the terminal signal: a put never waits.
        self._signals = BlockingQueue[tuple[str, Any]](demand + 1)
        self._subscription: Subscription | None = None
        self._subscribed = False
        self._finished = False

    # -- Subscriber ------------------------------------------------------------------------------

    def on_subscribe(self, subscription: Subscription) -> None:
        if self._subscription is not None or self._finished:
            subscription.cancel()  # rule 2.5: one subscription at a time
            return
        self._subscription = subscription
        subscription.request(self._demand)

    def on_next(self, item: T) -> None:
        self._push(_ITEM, item)

    def on_error(self, error: BaseException) -> None:
        self._push(_ERROR, error)

    def on_complete(self) -> None:
        self._push(_COMPLETE, None)

    def _push(self, kind: str, value: Any) -> None:
        try:
            self._signals.put_nowait((kind, value))
        except Full:
            raise RuntimeError(
                "publisher sent more items than requested (Reactive Streams rule 1.1)"
            ) from None

    # -- async iteration -------------------------------------------------------------------------

    def __aiter__(self) -> PublisherIterator[T]:
        return self

    async def __anext__(self) -> T:
        if self._finished:
            raise StopAsyncIteration
        if not self._subscribed:
            self._subscribed = True
            self._publisher.subscribe(self)
        kind, value = await self._signals.get_async()
        if kind == _ITEM:
            self._unrequested += 1
            if self._unrequested >= self._batch and self._subscription is not None:
                self._unrequested, count = 0, self._unrequested
                self._subscription.request(count)
            return value  # type: ignore[no-any-return]
        self._finished = True
        self._subscription = None
        if kind == _ERROR:
            raise value
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop iterating and cancel the subscription (idempotent)."""
        self._finished = True
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            subscription.cancel()

    async def __aenter__(self) -> PublisherIterator[T]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def iterate(publisher: Publisher[T], *, demand: int = 16) -> PublisherIterator[T]:
    """Iterate a publisher with ``async for``, keeping at most ``demand`` items requested or
    buffered at any time (re-requesting in batches as they are consumed).

    ``on_error`` is raised from the loop. Use ``async with iterate(p) as items:`` so that leaving
    the loop early cancels the subscription. Raises ``ValueError`` for ``demand < 1``.
    """
    return PublisherIterator(publisher, demand)
