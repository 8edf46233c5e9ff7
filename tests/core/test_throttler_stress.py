"""Stress and property tests: many threads and tasks hammering one throttler.

Hold times, timeouts and cancellations are drawn at random (by hypothesis where the run is
cheap enough to repeat). After every run: nothing in flight or queued, never more than
max_concurrency in flight nor max_queue waiting, every attempt accounted for exactly once,
no wait much past queue_timeout, and queued tasks admitted in arrival order.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shedder import Overloaded, Throttler, ThrottlerListener
from shedder.limits import AIMDLimit

# Scheduling noise allowed on top of queue_timeout: generous, the CI machine has 2 busy cores.
NOISE = 0.5


@dataclass
class Observer(ThrottlerListener):
    """Checks the bounds from inside the events, and counts outcomes."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    peak_in_flight: int = 0
    peak_queued: int = 0
    admitted: int = 0
    shed: int = 0
    cancelled: int = 0
    longest_wait: float = 0.0

    def on_queue(self, throttler: Throttler, priority: str) -> None:
        with self.lock:
            self.peak_queued = max(self.peak_queued, throttler.queued)

    def on_admit(self, throttler: Throttler, waited: float, priority: str) -> None:
        with self.lock:
            self.admitted += 1
            self.longest_wait = max(self.longest_wait, waited)
            self.peak_in_flight = max(self.peak_in_flight, throttler.in_flight)

    def on_shed(self, throttler: Throttler, reason: str, waited: float, priority: str) -> None:
        with self.lock:
            self.shed += 1
            self.longest_wait = max(self.longest_wait, waited)

    def on_cancel(self, throttler: Throttler, waited: float) -> None:
        with self.lock:
            self.cancelled += 1


class Occupancy:
    """Counts holders from the holders' side: proof that no slot was doubled."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.current = 0
        self.peak = 0

    def __enter__(self) -> None:
        with self.lock:
            self.current += 1
            self.peak = max(self.peak, self.current)

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.current -= 1


def run_to_end(threads: list[threading.Thread], timeout: float) -> None:
    """Start every thread, wait for each (``timeout`` seconds at most), and fail if one hangs."""
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads)


def check_end_state(throttler: Throttler, observer: Observer, attempts: int) -> None:
    stats = throttler.stats()
    assert (stats.in_flight, stats.queued) == (0, 0)
    assert observer.peak_in_flight <= throttler.max_concurrency
    assert (
        observer.peak_queued <= throttler._house <= throttler.max_queue * len(throttler.priorities)
    )
    assert observer.longest_wait <= throttler.queue_timeout + NOISE
    assert observer.admitted + observer.shed + observer.cancelled == attempts
    assert stats.admitted_total == observer.admitted
    assert sum(stats.shed_total.values()) == observer.shed
    assert stats.cancelled_total == observer.cancelled


configs = st.fixed_dictionaries(
    {
        "max_concurrency": st.integers(1, 4),
        "max_queue": st.integers(0, 6),
        "queue_timeout": st.sampled_from([0.0, 0.002, 0.01, 0.05]),
        "shed_threshold": st.sampled_from([0.5, 0.8, 1.0]),
        "queue_discipline": st.sampled_from(["fifo", "lifo", "codel"]),
    }
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs, seed=st.integers(0, 2**32 - 1))
def test_threads_hammering_one_throttler(config: dict[str, Any], seed: int) -> None:
    throttler = Throttler(**config)  # type: ignore[arg-type]
    observer = Observer()
    throttler.add_listener(observer)
    occupancy = Occupancy()
    threads_count, attempts_each = 8, 12
    rng = random.Random(seed)
    plans = [[rng.choice([0.0, 0.0005, 0.002]) for _ in range(attempts_each)] for _ in range(8)]
    start = threading.Barrier(threads_count)

    def worker(plan: list[float]) -> None:
        start.wait()
        for hold in plan:
            try:
                with throttler, occupancy:
                    if hold:
                        time.sleep(hold)  # simulated work
            except Overloaded:
                pass

    threads = [threading.Thread(target=worker, args=(plan,)) for plan in plans]
    run_to_end(threads, 30)
    assert occupancy.peak <= throttler.max_concurrency
    check_end_state(throttler, observer, threads_count * attempts_each)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=configs,
    plan=st.lists(
        st.tuples(
            st.sampled_from([0.0, 0.001, 0.003]),  # hold time
            st.sampled_from([None, 0.0, 0.0005, 0.002]),  # cancel after (None: never)
            st.booleans(),  # yield before arriving
        ),
        min_size=1,
        max_size=40,
    ),
)
def test_tasks_hammering_one_throttler(
    config: dict[str, Any], plan: list[tuple[float, float | None, bool]]
) -> None:
    asyncio.run(_tasks_run(config, plan))


async def _tasks_run(config: dict[str, Any], plan: list[tuple[float, float | None, bool]]) -> None:
    throttler = Throttler(**config)  # type: ignore[arg-type]
    observer = Observer()
    throttler.add_listener(observer)
    occupancy = Occupancy()
    arrivals: list[int] = []  # in the exact order the throttler saw them
    admitted_after_wait: list[int] = []

    async def request(index: int, hold: float, early_yield: bool) -> None:
        if early_yield:
            await asyncio.sleep(0)
        arrivals.append(index)  # no await between this and the enqueue inside acquire_async
        try:
            permit = await throttler.acquire_async()
        except Overloaded:
            return
        with permit, occupancy:
            if permit.waited > 0:
                admitted_after_wait.append(index)
            await asyncio.sleep(hold)

    tasks = [asyncio.create_task(request(i, hold, y)) for i, (hold, _, y) in enumerate(plan)]
    cancellers = [
        asyncio.get_running_loop().call_later(after, task.cancel)
        for task, (_, after, _) in zip(tasks, plan, strict=True)
        if after is not None
    ]
    await asyncio.gather(*tasks, return_exceptions=True)
    for handle in cancellers:
        handle.cancel()
    assert occupancy.peak <= throttler.max_concurrency
    # A task cancelled before it arrived made no attempt.
    check_end_state(throttler, observer, len(arrivals))
    if config["queue_discipline"] == "fifo":
        # Those admitted after waiting were admitted in arrival order.
        order = {index: position for position, index in enumerate(arrivals)}
        admitted = [order[i] for i in admitted_after_wait]
        assert admitted == sorted(admitted)


def test_threads_and_tasks_on_two_loops_hammering_one_throttler() -> None:
    """Cross-world hand-offs: threads free slots for tasks on two loops and vice versa."""
    throttler = Throttler(max_concurrency=3, max_queue=20, queue_timeout=0.2)
    observer = Observer()
    throttler.add_listener(observer)
    occupancy = Occupancy()
    rounds = 40

    def thread_worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(rounds):
            try:
                with throttler, occupancy:
                    time.sleep(rng.choice([0.0, 0.0005, 0.001]))
            except Overloaded:
                pass

    async def task_worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(rounds):
            attempt = asyncio.ensure_future(throttler.acquire_async())
            if rng.random() < 0.2:
                asyncio.get_running_loop().call_later(0.0005, attempt.cancel)
            try:
                permit = await attempt
            except (Overloaded, asyncio.CancelledError):
                continue
            with permit, occupancy:
                await asyncio.sleep(rng.choice([0.0, 0.0005, 0.001]))

    def loop_thread(seed: int) -> None:
        async def main() -> None:
            await asyncio.gather(*(task_worker(seed * 10 + i) for i in range(4)))

        asyncio.run(main())

    workers = [threading.Thread(target=thread_worker, args=(i,)) for i in range(4)]
    workers += [threading.Thread(target=loop_thread, args=(i,)) for i in (1, 2)]
    run_to_end(workers, 60)
    assert occupancy.peak <= 3
    check_end_state(throttler, observer, 4 * rounds + 2 * 4 * rounds)
    assert observer.cancelled > 0  # the cancellation paths were exercised


def test_threads_and_tasks_with_an_adaptive_limit() -> None:
    """A limit that moves under the requests' feet never lets in more than its maximum."""
    throttler = Throttler(AIMDLimit(2, max_limit=4, timeout=0.002), max_queue=6, queue_timeout=0.1)
    observer = Observer()
    throttler.add_listener(observer)
    occupancy = Occupancy()

    def thread_worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(40):
            try:
                with throttler, occupancy:
                    time.sleep(rng.choice([0.0, 0.001, 0.004]))
            except Overloaded:
                pass

    async def tasks() -> None:
        async def one(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(40):
                try:
                    async with throttler:
                        with occupancy:
                            await asyncio.sleep(rng.choice([0.0, 0.001, 0.004]))
                except Overloaded:
                    pass

        await asyncio.gather(*(one(i) for i in range(4)))

    workers = [threading.Thread(target=thread_worker, args=(i,)) for i in range(4)]
    workers.append(threading.Thread(target=asyncio.run, args=(tasks(),)))
    run_to_end(workers, 60)
    assert occupancy.peak <= 4
    stats = throttler.stats()
    assert (stats.in_flight, stats.queued) == (0, 0)
    assert observer.admitted + observer.shed + observer.cancelled == 8 * 40


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    max_concurrency=st.integers(1, 3),
    max_queue=st.integers(0, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_threads_through_the_quick_lane_and_admit(
    max_concurrency: int, max_queue: int, seed: int
) -> None:
    """As the adapters do: the lock-free quick lane first, admit() when it does not refuse;
    with stats() read all along. Every refusal is counted once, no slot lost or doubled."""
    throttler = Throttler(max_concurrency=max_concurrency, max_queue=max_queue, queue_timeout=0.01)
    observer = Observer()
    throttler.add_listener(observer)
    rank = throttler._rank("default")
    lane = throttler._quick_lane(rank, throttler._quick_refusal(rank))
    assert lane is not None
    occupancy = Occupancy()
    threads_count, attempts_each = 6, 40
    rng = random.Random(seed)
    plans = [[rng.choice([0.0, 0.0002, 0.001]) for _ in range(attempts_each)] for _ in range(6)]
    start = threading.Barrier(threads_count + 1)
    quick = [0] * threads_count
    done = threading.Event()

    def worker(index: int, plan: list[float]) -> None:
        start.wait()
        for hold in plan:
            if lane() is not None:
                quick[index] += 1
                continue
            try:
                with throttler, occupancy:
                    if hold:
                        time.sleep(hold)
            except Overloaded:
                pass

    def reader() -> None:
        start.wait()
        while not done.is_set():
            stats = throttler.stats()
            assert stats.in_flight <= throttler.max_concurrency
            time.sleep(0.0005)  # a reader that polls, as a metrics scrape does

    threads = [threading.Thread(target=worker, args=(i, p)) for i, p in enumerate(plans)]
    scrape = threading.Thread(target=reader)
    for thread in [*threads, scrape]:
        thread.start()
    for thread in threads:
        thread.join(30)
    done.set()
    scrape.join(30)
    assert not any(thread.is_alive() for thread in [*threads, scrape])
    assert occupancy.peak <= throttler.max_concurrency
    check_end_state(throttler, observer, threads_count * attempts_each)
    # The lane's refusals are in the totals once each, however often stats() was read.
    assert throttler.stats().shed_total["queue_full"] >= sum(quick)
