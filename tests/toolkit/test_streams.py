"""Pull-based streams: the Reactive Streams rules the module promises, and the async adapter."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shedder import UNBOUNDED, IterablePublisher, Subscriber, Subscription, iterate


class Recorder:
    """A subscriber that records every signal and checks they never overlap (rule 1.3)."""

    def __init__(self, on_next: Callable[[Recorder, Any], None] | None = None) -> None:
        self.signals: list[tuple[str, Any]] = []
        self.subscription: Subscription | None = None
        self._busy = threading.Lock()
        self.overlaps = 0
        self._on_next = on_next

    def _record(self, kind: str, value: Any = None) -> None:
        if not self._busy.acquire(blocking=False):
            self.overlaps += 1
            return
        try:
            self.signals.append((kind, value))
        finally:
            self._busy.release()

    def on_subscribe(self, subscription: Subscription) -> None:
        self.subscription = subscription
        self._record("subscribe")

    def on_next(self, item: Any) -> None:
        self._record("next", item)
        if self._on_next is not None:
            self._on_next(self, item)

    def on_error(self, error: BaseException) -> None:
        self._record("error", error)

    def on_complete(self) -> None:
        self._record("complete")

    @property
    def items(self) -> list[Any]:
        return [value for kind, value in self.signals if kind == "next"]

    @property
    def terminals(self) -> list[str]:
        return [kind for kind, _ in self.signals if kind in ("error", "complete")]

    def request(self, n: int) -> None:
        assert self.subscription is not None
        self.subscription.request(n)


def subscribe(items: Any, on_next: Callable[[Recorder, Any], None] | None = None) -> Recorder:
    recorder = Recorder(on_next)
    IterablePublisher(items).subscribe(recorder)
    return recorder


def assert_well_formed(recorder: Recorder) -> None:
    kinds = [kind for kind, _ in recorder.signals]
    assert kinds[0] == "subscribe"  # rule 1.9
    assert kinds.count("subscribe") == 1
    assert len(recorder.terminals) <= 1  # rule 1.7
    if recorder.terminals:
        assert kinds[-1] == recorder.terminals[0]  # nothing after a terminal signal
    assert recorder.overlaps == 0


def counting_until_closed(closed: threading.Event) -> Iterator[int]:
    """0, 1, 2, ...; sets ``closed`` when the generator is closed."""
    try:
        yield from range(1000)
    finally:
        closed.set()


def test_nothing_flows_until_requested() -> None:
    recorder = subscribe(range(10))
    assert recorder.signals == [("subscribe", None)]
    recorder.request(3)
    assert recorder.items == [0, 1, 2]
    recorder.request(2)
    assert recorder.items == [0, 1, 2, 3, 4]
    assert recorder.terminals == []


@given(size=st.integers(0, 30), requests=st.lists(st.integers(1, 12), max_size=8))
def test_never_more_than_requested_and_complete_exactly_once(
    size: int, requests: list[int]
) -> None:
    recorder = subscribe(range(size))
    requested = 0
    for n in requests:
        requested += n
        recorder.request(n)
        assert len(recorder.items) == min(requested, size)  # rule 1.1, and no stalling
    # Completion is signalled once demand finds the source exhausted.
    assert recorder.terminals == (["complete"] if requested > size else [])
    recorder.request(1)  # a no-op after completion (rule 3.6)
    assert recorder.items == list(range(min(requested + 1, size)))
    assert recorder.terminals == (["complete"] if requested >= size else [])
    assert_well_formed(recorder)


def test_empty_source_completes_on_first_request() -> None:
    recorder = subscribe([])
    assert recorder.terminals == []
    recorder.request(1)
    assert recorder.terminals == ["complete"]


@pytest.mark.parametrize("n", [0, -1])
def test_non_positive_request_signals_value_error_once(n: int) -> None:
    recorder = subscribe(range(5))
    recorder.request(n)
    recorder.request(n)
    recorder.request(3)  # after on_error: nothing more (rule 1.7)
    assert recorder.terminals == ["error"]
    error = recorder.signals[-1][1]
    assert isinstance(error, ValueError)
    assert "3.9" in str(error)
    assert recorder.items == []
    assert_well_formed(recorder)


def test_source_error_is_signalled_as_on_error() -> None:
    def broken() -> Iterator[int]:
        yield 1
        raise KeyError("boom")

    recorder = subscribe(broken())
    recorder.request(UNBOUNDED)
    assert recorder.items == [1]
    assert recorder.terminals == ["error"]
    assert isinstance(recorder.signals[-1][1], KeyError)


def test_request_from_on_next_does_not_recurse() -> None:
    # One item at a time, re-requested from inside on_next: recursion would pass the limit.
    count = sys.getrecursionlimit() * 3
    recorder = subscribe(range(count), on_next=lambda rec, _: rec.request(1))
    recorder.request(1)
    assert len(recorder.items) == count
    assert recorder.terminals == ["complete"]


def test_cancel_stops_delivery_and_closes_the_generator() -> None:
    closed = threading.Event()
    numbers = counting_until_closed(closed)

    def cancel_at_three(rec: Recorder, item: int) -> None:
        if item == 2:
            assert rec.subscription is not None
            rec.subscription.cancel()
            rec.subscription.cancel()  # idempotent (rule 3.7)

    recorder = subscribe(numbers, on_next=cancel_at_three)
    recorder.request(UNBOUNDED)
    recorder.request(5)  # no-op after cancel (rule 3.6)
    assert recorder.items == [0, 1, 2]
    assert recorder.terminals == []  # no terminal signal after a cancel
    assert closed.is_set()


def test_cancel_before_any_request_closes_the_source() -> None:
    closed = threading.Event()

    def numbers() -> Iterator[int]:
        try:
            yield 1
        finally:
            closed.set()

    generator = numbers()
    next(generator)  # started, so closing runs its finally
    recorder = subscribe(generator)
    assert recorder.subscription is not None
    recorder.subscription.cancel()
    recorder.request(1)
    assert closed.is_set()
    assert recorder.items == []


def test_failing_subscriber_is_cancelled_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    def explode(rec: Recorder, item: int) -> None:
        raise RuntimeError("subscriber bug")

    with caplog.at_level(logging.ERROR, logger="shedder"):
        recorder = subscribe(range(10), on_next=explode)
        recorder.request(5)
        recorder.request(5)
    assert recorder.items == [0]  # rule 2.13: the subscription counts as cancelled
    assert recorder.terminals == []
    assert "subscriber bug" in caplog.text


def test_signals_are_serialized_under_concurrent_requests() -> None:
    threads_count, per_thread = 4, 300
    recorder = subscribe(range(threads_count * per_thread + 5))
    start = threading.Barrier(threads_count)

    def request_many() -> None:
        start.wait()
        for _ in range(per_thread):
            recorder.request(1)

    threads = [threading.Thread(target=request_many) for _ in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert recorder.overlaps == 0  # rule 1.3: never two signals at once
    assert recorder.items == list(range(threads_count * per_thread))  # exact, in order
    assert_well_formed(recorder)


# -- the async iterator adapter ----------------------------------------------------------------


class Tracked:
    """An iterable that counts how many items were pulled, to check bounded demand."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.pulled = 0

    def __iter__(self) -> Iterator[int]:
        for value in range(self.count):
            self.pulled += 1
            yield value


async def test_async_iteration_keeps_demand_bounded() -> None:
    source = Tracked(100)
    consumed = 0
    async with iterate(IterablePublisher(source), demand=8) as items:
        async for item in items:
            assert item == consumed
            consumed += 1
            assert source.pulled - consumed <= 8  # requested or buffered, never more
    assert consumed == 100


async def test_async_iteration_raises_the_stream_error() -> None:
    def broken() -> Iterator[int]:
        yield 1
        raise KeyError("boom")

    received: list[int] = []

    async def consume() -> None:
        async for item in iterate(IterablePublisher(broken()), demand=4):
            received.append(item)

    with pytest.raises(KeyError, match="boom"):
        await consume()
    assert received == [1]


async def test_leaving_the_loop_cancels_the_subscription() -> None:
    closed = threading.Event()
    numbers = counting_until_closed(closed)
    async with iterate(IterablePublisher(numbers), demand=4) as items:
        async for item in items:
            if item == 5:
                break
    assert closed.is_set()
    with pytest.raises(StopAsyncIteration):
        await items.__anext__()


class ThreadedPublisher:
    """Emits from its own thread as demand arrives: signals cross threads into the loop."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.thread: threading.Thread | None = None

    def subscribe(self, subscriber: Subscriber[int]) -> None:
        demand = threading.Semaphore(0)
        cancelled = threading.Event()

        class _Subscription:
            def request(self, n: int) -> None:
                demand.release(n)

            def cancel(self) -> None:
                cancelled.set()
                demand.release()

        def emit() -> None:
            for value in range(self.count):
                demand.acquire()
                if cancelled.is_set():
                    return
                subscriber.on_next(value)
            subscriber.on_complete()

        subscriber.on_subscribe(_Subscription())
        self.thread = threading.Thread(target=emit)
        self.thread.start()


async def test_signals_from_another_thread_wake_the_iterator() -> None:
    publisher = ThreadedPublisher(500)
    received = [item async for item in iterate(publisher, demand=3)]
    assert received == list(range(500))
    assert publisher.thread is not None
    await asyncio.to_thread(publisher.thread.join, 10)


def test_demand_must_be_positive() -> None:
    with pytest.raises(ValueError, match="demand must be an int >= 1, got 0"):
        iterate(IterablePublisher([1]), demand=0)
