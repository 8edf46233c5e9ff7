"""Bounded queues: the blocking and dropping rules, exact counts under concurrency, hand-off."""

from __future__ import annotations

import asyncio
import math
import random
import threading
from collections import Counter, deque
from queue import Empty, Full

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shedder import BlockingQueue, DroppingQueue, MonitoredQueue

CONCURRENT = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_conserved(queue: BlockingQueue[int] | DroppingQueue[int] | MonitoredQueue[int]) -> None:
    stats = queue.stats()
    assert stats.put_total == stats.get_total + stats.dropped_total + stats.size
    assert stats.waiting_getters == stats.waiting_putters == 0


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [0, -1])
def test_capacity_must_be_positive(capacity: int) -> None:
    with pytest.raises(ValueError, match=f"capacity must be >= 1, got {capacity}"):
        BlockingQueue[int](capacity)


def test_capacity_must_be_an_int() -> None:
    with pytest.raises(TypeError, match="capacity must be an int"):
        BlockingQueue[int](2.5)  # type: ignore[arg-type]


def test_dropping_queue_rejects_block_policy() -> None:
    with pytest.raises(ValueError, match="policy must be one of"):
        DroppingQueue[int](2, "block")  # type: ignore[arg-type]


def test_negative_timeout_is_refused() -> None:
    with pytest.raises(ValueError, match="timeout must be >= 0 seconds, got -1"):
        BlockingQueue[int](1).get(timeout=-1)


# -- the blocking queue, one thread --------------------------------------------------------


def test_blocking_queue_is_fifo_and_reports_its_size() -> None:
    queue = BlockingQueue[str](2)
    assert (queue.size, queue.capacity, queue.is_empty, queue.is_full) == (0, 2, True, False)
    queue.put("a")
    queue.put("b")
    assert (len(queue), queue.is_full, queue.load) == (2, True, 1.0)
    with pytest.raises(Full):
        queue.put_nowait("c")
    with pytest.raises(Full):
        queue.put("c", timeout=0.01)
    assert [queue.get(), queue.get_nowait()] == ["a", "b"]
    with pytest.raises(Empty):
        queue.get_nowait()
    with pytest.raises(Empty):
        queue.get(timeout=0.01)
    assert_conserved(queue)


def test_blocked_producer_resumes_when_a_consumer_takes() -> None:
    queue = BlockingQueue[int](1)
    queue.put(1)
    done = threading.Event()

    def produce() -> None:
        queue.put(2)  # blocks: the queue is full
        done.set()

    producer = threading.Thread(target=produce)
    producer.start()
    assert not done.wait(0.05)
    assert queue.get() == 1
    assert done.wait(5)
    producer.join()
    assert queue.get_nowait() == 2


async def test_waiting_producers_are_served_in_arrival_order() -> None:
    queue = BlockingQueue[int](1)
    queue.put(0)
    producers = [asyncio.create_task(queue.put_async(value)) for value in (1, 2, 3)]
    await asyncio.sleep(0)
    assert queue.stats().waiting_putters == 3
    # A late thread's put_nowait must not overtake them.
    with pytest.raises(Full):
        await asyncio.to_thread(queue.put_nowait, 99)
    assert [await queue.get_async(timeout=5) for _ in range(4)] == [0, 1, 2, 3]
    await asyncio.gather(*producers)


# -- dropping policies against a model -------------------------------------------------------

operations = st.lists(st.one_of(st.integers(0, 1000), st.none()), max_size=60)


@given(capacity=st.integers(1, 5), ops=operations)
def test_drop_oldest_matches_the_model(capacity: int, ops: list[int | None]) -> None:
    queue = DroppingQueue[int](capacity, "drop_oldest")
    model: deque[int] = deque(maxlen=capacity)
    for op in ops:
        if op is None:
            if model:
                assert queue.get_nowait() == model.popleft()
            else:
                with pytest.raises(Empty):
                    queue.get_nowait()
        else:
            expected = [model[0]] if len(model) == capacity else []
            model.append(op)
            assert queue.put(op) == expected
        assert len(queue) == len(model)
    assert_conserved(queue)


@given(capacity=st.integers(1, 5), ops=operations)
def test_drop_newest_matches_the_model(capacity: int, ops: list[int | None]) -> None:
    queue = DroppingQueue[int](capacity, "drop_newest")
    model: deque[int] = deque()
    for op in ops:
        if op is None:
            if model:
                assert queue.get_nowait() == model.popleft()
        elif len(model) == capacity:
            assert queue.put(op) == [op]
        else:
            model.append(op)
            assert queue.put(op) == []
    assert list(model) == [queue.get_nowait() for _ in range(len(queue))]


@given(capacity=st.integers(1, 5), ops=operations, seed=st.integers(0, 2**32))
def test_drop_random_loses_and_duplicates_nothing(
    capacity: int, ops: list[int | None], seed: int
) -> None:
    queue = DroppingQueue[int](capacity, "drop_random", rng=random.Random(seed))
    offered: Counter[int] = Counter()
    accounted: Counter[int] = Counter()
    for op in ops:
        if op is None:
            if len(queue):
                accounted[queue.get_nowait()] += 1
        else:
            offered[op] += 1
            was_full = len(queue) == capacity
            dropped = queue.put(op)
            assert len(dropped) == (1 if was_full else 0)
            accounted.update(dropped)
        assert len(queue) <= capacity
    accounted.update(queue.get_nowait() for _ in range(len(queue)))
    assert accounted == offered
    assert_conserved(queue)


def test_drop_random_picks_among_queued_and_new_items() -> None:
    queue = DroppingQueue[int](3, "drop_random", rng=random.Random(7))
    for value in range(3):
        queue.put(value)
    new_item_dropped = sum(queue.put(100 + n) == [100 + n] for n in range(400))
    # Each put drops one of 4 candidates, so about 1 in 4 drops hit the new item.
    assert 40 < new_item_dropped < 170
    assert queue.dropped_total == 400


# -- exact counts under concurrency ----------------------------------------------------------


def run_threads(targets: list[threading.Thread]) -> None:
    for thread in targets:
        thread.start()
    for thread in targets:
        thread.join(timeout=30)
        assert not thread.is_alive()


@CONCURRENT
@given(
    capacity=st.integers(1, 4),
    producers=st.integers(1, 4),
    consumers=st.integers(1, 4),
    per_producer=st.integers(0, 60),
)
def test_threads_neither_lose_nor_duplicate(
    capacity: int, producers: int, consumers: int, per_producer: int
) -> None:
    queue = BlockingQueue[tuple[int, int]](capacity)
    total = producers * per_producer
    received: list[tuple[int, int]] = []
    lock = threading.Lock()
    shares = [total // consumers + (1 if c < total % consumers else 0) for c in range(consumers)]

    def produce(producer: int) -> None:
        for index in range(per_producer):
            queue.put((producer, index))
            assert len(queue) <= capacity

    def consume(count: int) -> None:
        taken = [queue.get(timeout=10) for _ in range(count)]
        with lock:
            received.extend(taken)

    run_threads(
        [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
        + [threading.Thread(target=consume, args=(share,)) for share in shares]
    )
    assert sorted(received) == [(p, i) for p in range(producers) for i in range(per_producer)]
    # Each producer's items come out in the order it put them.
    for producer in range(producers):
        mine = [index for p, index in received if p == producer]
        assert len(mine) == per_producer
    stats = queue.stats()
    assert (stats.put_total, stats.get_total, stats.size) == (total, total, 0)
    assert_conserved(queue)


@CONCURRENT
@given(
    capacity=st.integers(1, 4),
    producers=st.integers(1, 4),
    consumers=st.integers(1, 4),
    per_producer=st.integers(0, 60),
)
async def test_tasks_neither_lose_nor_duplicate(
    capacity: int, producers: int, consumers: int, per_producer: int
) -> None:
    queue = BlockingQueue[tuple[int, int]](capacity)
    total = producers * per_producer
    shares = [total // consumers + (1 if c < total % consumers else 0) for c in range(consumers)]

    async def produce(producer: int) -> None:
        for index in range(per_producer):
            await queue.put_async((producer, index))

    async def consume(count: int) -> list[tuple[int, int]]:
        return [await queue.get_async(timeout=10) for _ in range(count)]

    results = await asyncio.gather(
        *(produce(p) for p in range(producers)), *(consume(share) for share in shares)
    )
    received = [item for result in results if result for item in result]
    assert sorted(received) == [(p, i) for p in range(producers) for i in range(per_producer)]
    assert_conserved(queue)


@CONCURRENT
@given(capacity=st.integers(1, 4), producers=st.integers(1, 3), per_producer=st.integers(1, 80))
async def test_thread_producers_wake_task_consumers(
    capacity: int, producers: int, per_producer: int
) -> None:
    queue = BlockingQueue[int](capacity)
    total = producers * per_producer

    def produce(producer: int) -> None:
        for index in range(per_producer):
            queue.put(producer * 1000 + index)

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    for thread in threads:
        thread.start()
    received = [await queue.get_async(timeout=10) for _ in range(total)]
    for thread in threads:
        await asyncio.to_thread(thread.join)
    assert sorted(received) == sorted(
        p * 1000 + i for p in range(producers) for i in range(per_producer)
    )
    assert_conserved(queue)


@CONCURRENT
@given(
    capacity=st.integers(1, 4),
    producers=st.integers(1, 4),
    per_producer=st.integers(1, 80),
    policy=st.sampled_from(["drop_oldest", "drop_newest", "drop_random"]),
)
def test_dropping_counts_are_exact_under_concurrent_producers(
    capacity: int, producers: int, per_producer: int, policy: str
) -> None:
    queue = DroppingQueue[int](capacity, policy)  # type: ignore[arg-type]
    dropped: list[int] = []
    received: list[int] = []
    lock = threading.Lock()
    finished = threading.Event()

    def produce(producer: int) -> None:
        for index in range(per_producer):
            lost = queue.put(producer * 1000 + index)
            with lock:
                dropped.extend(lost)

    def consume() -> None:
        while True:
            try:
                received.append(queue.get(timeout=0.01))
            except Empty:
                if finished.is_set() and not len(queue):
                    return

    consumer = threading.Thread(target=consume)
    consumer.start()
    run_threads([threading.Thread(target=produce, args=(p,)) for p in range(producers)])
    finished.set()
    consumer.join(timeout=30)
    produced = [p * 1000 + i for p in range(producers) for i in range(per_producer)]
    assert sorted(received + dropped) == produced
    assert queue.dropped_total == len(dropped)
    assert_conserved(queue)


# -- cancellation and timeouts --------------------------------------------------------------


async def test_cancelled_getter_leaves_and_loses_nothing() -> None:
    queue = BlockingQueue[int](2)
    getter = asyncio.create_task(queue.get_async())
    await asyncio.sleep(0)
    assert queue.stats().waiting_getters == 1
    getter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await getter
    assert queue.stats().waiting_getters == 0
    queue.put_nowait(5)
    assert await queue.get_async() == 5


async def test_item_handed_to_a_getter_cancelled_at_that_instant_goes_back() -> None:
    queue = BlockingQueue[int](2)
    first = asyncio.create_task(queue.get_async())
    second = asyncio.create_task(queue.get_async())
    await asyncio.sleep(0)
    queue.put_nowait(1)  # handed to `first`, which has not run yet
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await asyncio.wait_for(second, 5) == 1
    assert_conserved(queue)


async def test_item_handed_to_the_last_cancelled_getter_returns_to_the_head() -> None:
    queue = BlockingQueue[int](3)
    getter = asyncio.create_task(queue.get_async())
    await asyncio.sleep(0)
    queue.put_nowait(1)
    getter.cancel()
    queue.put_nowait(2)
    with pytest.raises(asyncio.CancelledError):
        await getter
    assert [queue.get_nowait(), queue.get_nowait()] == [1, 2]


async def test_cancelled_put_adds_nothing_and_passes_its_slot_on() -> None:
    queue = BlockingQueue[int](1)
    await queue.put_async(0)
    first = asyncio.create_task(queue.put_async(1))
    second = asyncio.create_task(queue.put_async(2))
    await asyncio.sleep(0)
    assert queue.get_nowait() == 0  # the slot is reserved for `first`...
    first.cancel()  # ...which gives up before inserting: the slot passes to `second`
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 5)
    assert queue.get_nowait() == 2
    assert queue.stats().put_total == 2
    assert_conserved(queue)


async def test_async_timeouts_raise_empty_and_full() -> None:
    queue = BlockingQueue[int](1)
    with pytest.raises(Empty):
        await queue.get_async(timeout=0.01)
    await queue.put_async(1)
    with pytest.raises(Full):
        await queue.put_async(2, timeout=0.01)
    assert queue.stats().waiting_putters == 0
    assert await queue.get_async(timeout=0) == 1


async def test_dropping_queue_get_async_waits_for_an_item() -> None:
    queue = DroppingQueue[str](1, "drop_newest")
    getter = asyncio.create_task(queue.get_async())
    await asyncio.sleep(0)
    assert not getter.done()
    assert await asyncio.to_thread(queue.put, "x") == []
    assert await asyncio.wait_for(getter, 5) == "x"


# -- the monitored queue ---------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_monitored_queue_reports_depth_drops_and_throughput() -> None:
    clock = FakeClock()
    queue = MonitoredQueue[int](2, "drop_oldest", throughput_window=10, clock=clock)
    for value in range(5):
        queue.put(value)
    clock.now += 4
    taken = [queue.get_nowait(), queue.get_nowait()]
    clock.now += 1
    stats = queue.stats()
    assert taken == [3, 4]
    assert (stats.size, stats.capacity, stats.dropped_total) == (0, 2, 3)
    assert (stats.put_total, stats.get_total) == (5, 2)
    assert stats.throughput == pytest.approx(2 / 5)  # 2 items over the 5 s it has existed
    clock.now += 20
    assert queue.stats().throughput == 0.0  # they have left the window


async def test_monitored_queue_histogram_counts_put_waits() -> None:
    queue = MonitoredQueue[int](1, put_wait_buckets=(0.001, 10.0))
    await queue.put_async(1)
    producer = asyncio.create_task(queue.put_async(2))
    await asyncio.sleep(0.02)  # the producer waits measurably for room
    assert queue.stats().waiting_putters == 1
    assert await queue.get_async() == 1
    await asyncio.wait_for(producer, 5)
    stats = queue.stats()
    assert stats.put_wait_count == 2
    assert stats.put_wait_buckets[0] == (0.001, 1)  # the first put did not wait
    assert stats.put_wait_buckets[-1] == (math.inf, 2)
    assert 0.015 <= stats.put_wait_sum < 10


def test_monitored_queue_rejects_bad_buckets() -> None:
    with pytest.raises(ValueError, match="put_wait_buckets must be increasing"):
        MonitoredQueue[int](1, put_wait_buckets=(1.0, 0.5))
    with pytest.raises(ValueError, match="throughput_window must be > 0"):
        MonitoredQueue[int](1, throughput_window=0)
