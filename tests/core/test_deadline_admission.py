"""Deadline-aware admission: an arrival that could not start before its deadline is refused at
once, by the observed pace of service, and never on a guess.

Deterministic: one thread, the throttler's injectable clock, and each release hands its slot to
exactly one waiter (the technique of test_priorities.py). The stress test at the end runs real
tasks against real time.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Hashable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shedder import Overloaded, Permit, Throttler, Waiting
from shedder._core.throttler import _GAP_WARMUP

from .test_priorities import Clock, Events
from .test_throttler_stress import Observer, Occupancy, check_end_state, run_to_end

GAP = 0.01  # the simulated service: one slot freed every 10 ms while all are busy


def saturate(throttler: Throttler, clock: Clock, releases: int, gap: float = GAP) -> Permit:
    """Hold the one slot with a waiter behind it and release it ``releases`` times, ``gap``
    apart, each release handing the slot to the next waiter: ``releases - 1`` gaps observed.
    Returns the permit now holding the slot (the queue is empty again)."""
    holder = throttler.acquire()
    for _ in range(releases):
        waiting = throttler.admit()
        assert isinstance(waiting, Waiting)
        clock.advance(gap)
        holder.release()
        holder = waiting.wait()
    return holder


def queue_up(
    throttler: Throttler, count: int, priority: str | None = None, flow: Hashable = None
) -> list[Waiting]:
    waiting = [throttler.admit(priority=priority, flow=flow) for _ in range(count)]
    assert all(isinstance(w, Waiting) for w in waiting)
    return waiting  # type: ignore[return-value]


def arrive(
    throttler: Throttler,
    deadline: float,
    priority: str | None = None,
    flow: Hashable = None,
) -> Permit | Overloaded | Waiting:
    return throttler.admit(priority=priority, flow=flow, deadline=deadline)


def refused_now(decision: object) -> bool:
    return isinstance(decision, Overloaded) and decision.reason == "deadline_exceeded"


def test_a_cold_throttler_never_refuses_on_a_guess() -> None:
    clock = Clock()
    throttler = Throttler(max_concurrency=1, max_queue=50, clock=clock)
    saturate(throttler, clock, releases=8)  # 7 gaps seen: one short of trusting the pace
    queue_up(throttler, 20)
    decision = arrive(throttler, deadline=clock.now + 0.001)  # 20 ahead, 1 ms left
    assert isinstance(decision, Waiting)  # it waits (and is refused when its deadline passes)


def test_an_arrival_that_would_start_after_its_deadline_is_refused_at_once() -> None:
    clock = Clock()
    throttler = Throttler(max_concurrency=1, max_queue=50, clock=clock)
    events = Events()
    throttler.add_listener(events)
    saturate(throttler, clock, releases=9)
    assert throttler._release_gap == pytest.approx(GAP)
    queue_up(throttler, 5)  # 5 ahead: it would start at the 6th release, 60 ms from now
    events.seen.clear()

    late = arrive(throttler, deadline=clock.now + 0.055)
    assert refused_now(late)
    assert throttler.queued == 5  # no waiter was made for it
    assert events.seen == [("shed", "default", "deadline_exceeded", 0.0)]
    assert throttler.stats().shed_total["deadline_exceeded"] == 1

    in_time = arrive(throttler, deadline=clock.now + 0.065)
    assert isinstance(in_time, Waiting)
    assert throttler.queued == 6


def test_an_arrival_with_nobody_ahead_is_never_refused_by_the_estimate() -> None:
    clock = Clock()
    throttler = Throttler(max_concurrency=1, max_queue=50, clock=clock)
    saturate(throttler, clock, releases=20)
    # All slots busy, nobody waiting: it may well get the next slot in time.
    assert isinstance(arrive(throttler, deadline=clock.now + 1e-6), Waiting)


def test_the_pace_follows_the_service() -> None:
    clock = Clock()
    throttler = Throttler(max_concurrency=1, max_queue=50, clock=clock)
    holder = saturate(throttler, clock, releases=20, gap=0.01)
    holder.release()
    holder = saturate(throttler, clock, releases=60, gap=0.002)  # the service got faster
    assert throttler._release_gap == pytest.approx(0.002, rel=0.1)
    queue_up(throttler, 10)  # it starts in 22 ms at the new pace, 110 ms at the old
    assert isinstance(arrive(throttler, deadline=clock.now + 0.03), Waiting)


def test_a_slot_left_idle_ends_the_run_of_gaps() -> None:
    clock = Clock()
    throttler = Throttler(max_concurrency=1, max_queue=50, clock=clock)
    holder = saturate(throttler, clock, releases=10)
    holder.release()  # nobody waits: the slot goes idle
    clock.advance(30.0)  # a quiet half minute is not a service interval
    holder = throttler.acquire()
    waiting = queue_up(throttler, 1)[0]
    clock.advance(GAP)
    holder.release()
    waiting.wait()
    assert throttler._release_gap == pytest.approx(GAP)


def test_a_waiter_that_leaves_its_slot_idle_ends_the_run() -> None:
    clock = Clock()
    throttler = Throttler(max_concurrency=1, max_queue=50, clock=clock)
    holder = saturate(throttler, clock, releases=10)
    waiting = queue_up(throttler, 1)[0]
    clock.advance(GAP)
    holder.release()  # granted to `waiting`, which then leaves: the slot is idle
    waiting.cancel()
    clock.advance(30.0)
    holder = throttler.acquire()
    waiting = queue_up(throttler, 1)[0]  # joins an empty queue: a new run
    clock.advance(GAP)
    holder.release()
    waiting.wait()
    assert throttler._release_gap == pytest.approx(GAP)


def test_the_uncontended_path_does_not_measure_hold_times_nobody_reads() -> None:
    clock = Clock()
    throttler = Throttler(max_concurrency=1, clock=clock)
    with throttler.acquire():
        clock.advance(0.5)
    assert throttler._mean_hold == 0.0  # nobody asked: not measured
    assert throttler.service_time is None  # asked now: measured from here on
    with throttler.acquire():
        clock.advance(0.5)
    assert throttler.service_time == 0.5
    assert Throttler(max_concurrency=1, retry_after="auto")._track_hold


def test_only_waiters_served_first_count() -> None:
    clock = Clock()
    throttler = Throttler(max_concurrency=1, max_queue=60, flow_queue_limit=60, clock=clock)
    saturate(throttler, clock, releases=12)
    queue_up(throttler, 10, priority="sheddable")  # served after any default arrival
    queue_up(throttler, 2, priority="critical")  # served before it
    queue_up(throttler, 2, flow="tenant-a")  # another flow: takes turns with it
    # Ahead of a default arrival of no flow: the 2 critical (it starts at the 3rd release).
    assert refused_now(arrive(throttler, deadline=clock.now + 0.025))
    assert isinstance(arrive(throttler, deadline=clock.now + 0.035), Waiting)
    # Of tenant-a: the 2 critical and the 2 of its own line (the 5th release).
    assert refused_now(arrive(throttler, deadline=clock.now + 0.045, flow="tenant-a"))
    assert isinstance(arrive(throttler, deadline=clock.now + 0.055, flow="tenant-a"), Waiting)
    # A critical arrival has only the 2 critical ahead of it, whatever waits below.
    assert refused_now(arrive(throttler, deadline=clock.now + 0.025, priority="critical"))
    assert isinstance(arrive(throttler, deadline=clock.now + 0.035, priority="critical"), Waiting)


def test_newest_first_serves_the_arrival_first() -> None:
    clock = Clock()
    throttler = Throttler(max_concurrency=1, max_queue=60, queue_discipline="lifo", clock=clock)
    saturate(throttler, clock, releases=12)
    queue_up(throttler, 30)
    assert isinstance(arrive(throttler, deadline=clock.now + 0.001), Waiting)


def test_newest_first_counts_the_higher_classes_ahead() -> None:
    clock = Clock()
    throttler = Throttler(max_concurrency=1, max_queue=60, queue_discipline="lifo", clock=clock)
    holder = saturate(throttler, clock, releases=12)
    default = queue_up(throttler, 5)
    critical = queue_up(throttler, 3, priority="critical")
    # Newest first, no default waiter is ahead of it; the three critical ones are: 40 ms for 25.
    decision = arrive(throttler, deadline=clock.now + 0.025)
    assert refused_now(decision)
    later = arrive(throttler, deadline=clock.now + 0.045)
    assert isinstance(later, Waiting)
    for waiting in (*default, *critical, later):
        waiting.cancel()
    holder.release()


def test_a_refused_arrival_evicts_nobody() -> None:
    clock = Clock()
    # shed_threshold 0.8: with 4 waiters an arrival is at its shed point, (1 + 4) / (1 + 5).
    throttler = Throttler(max_concurrency=1, max_queue=5, shed_threshold=0.8, clock=clock)
    saturate(throttler, clock, releases=12)
    sheddable = queue_up(throttler, 1, priority="sheddable")
    critical = queue_up(throttler, 3, priority="critical")
    decision = arrive(throttler, deadline=clock.now + 0.02, priority="critical")
    assert refused_now(decision)
    assert all(w._waiter.outcome is None for w in [*critical, *sheddable])
    # With time enough, it takes the sheddable place as before.
    assert isinstance(arrive(throttler, deadline=clock.now + 1.0, priority="critical"), Waiting)
    assert sheddable[0]._waiter.outcome == "overloaded"


def test_requests_without_a_deadline_are_not_affected() -> None:
    clock = Clock()
    throttler = Throttler(max_concurrency=1, max_queue=60, clock=clock)
    saturate(throttler, clock, releases=12)
    queue_up(throttler, 40)
    assert isinstance(throttler.admit(), Waiting)


def test_work_reserve_is_the_mean_hold_plus_four_deviations() -> None:
    clock = Clock()
    throttler = Throttler(max_concurrency=1, clock=clock)
    assert throttler.service_time is None
    assert throttler._work_reserve() == 0.0
    for hold in (0.1, 0.1):
        with throttler.acquire():
            clock.advance(hold)
    assert throttler.service_time == pytest.approx(0.1)
    assert throttler._work_reserve() == pytest.approx(0.1)
    with throttler.acquire():
        clock.advance(0.2)
    # mean 0.1 + 0.1 * 0.1 = 0.11; deviation 0.1 * 0.1 = 0.01
    assert throttler.service_time == pytest.approx(0.11)
    assert throttler._work_reserve() == pytest.approx(0.15)
    permit = throttler.acquire()
    clock.advance(5.0)
    permit.release("ignore")  # a fast failure says nothing of the service time
    assert throttler.service_time == pytest.approx(0.11)


# -- real tasks, real time: the new refusal loses and doubles no slot -------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    max_concurrency=st.integers(1, 3),
    max_queue=st.integers(1, 12),
    discipline=st.sampled_from(["fifo", "lifo", "codel"]),
    plan=st.lists(
        st.tuples(
            st.sampled_from([0.0005, 0.001, 0.002]),  # hold time
            st.sampled_from([None, 0.0, 0.001, 0.003, 0.01]),  # deadline after arrival
            st.sampled_from(["critical", "default", "sheddable"]),
            st.sampled_from([None, "a", "b"]),  # flow
            st.sampled_from([None, 0.001]),  # cancel after (None: never)
        ),
        min_size=1,
        max_size=60,
    ),
)
def test_tasks_with_deadlines_lose_no_slot(
    max_concurrency: int,
    max_queue: int,
    discipline: str,
    plan: list[tuple[float, float | None, str, str | None, float | None]],
) -> None:
    asyncio.run(_run_with_deadlines(max_concurrency, max_queue, discipline, plan))


async def _run_with_deadlines(
    max_concurrency: int,
    max_queue: int,
    discipline: str,
    plan: list[tuple[float, float | None, str, str | None, float | None]],
) -> None:
    throttler = Throttler(
        max_concurrency=max_concurrency,
        max_queue=max_queue,
        queue_timeout=0.05,
        queue_discipline=discipline,
        flow_queue_limit=max_queue,
    )
    throttler._gap_samples = 10**6  # trust the pace from the first gap: exercise the refusal
    observer = Observer()
    throttler.add_listener(observer)
    occupancy = Occupancy()
    attempts = 0

    async def request(hold: float, budget: float | None, priority: str, flow: Any) -> None:
        nonlocal attempts
        attempts += 1
        deadline = None if budget is None else throttler._clock() + budget
        try:
            permit = await throttler.acquire_async(priority=priority, flow=flow, deadline=deadline)
        except Overloaded:
            return
        with permit, occupancy:
            await asyncio.sleep(hold)

    loop = asyncio.get_running_loop()
    tasks = []
    cancellers = []
    for index, (hold, budget, priority, flow, cancel_after) in enumerate(plan):
        task = asyncio.create_task(request(hold, budget, priority, flow))
        tasks.append(task)
        if cancel_after is not None:
            cancellers.append(loop.call_later(cancel_after, task.cancel))
        await asyncio.sleep(0.0005 if index % 3 == 2 else 0)  # bursts, and a queue to drain
    await asyncio.gather(*tasks, return_exceptions=True)
    for handle in cancellers:
        handle.cancel()
    assert occupancy.peak <= max_concurrency
    check_end_state(throttler, observer, attempts)


def test_under_steady_overload_refusals_happen_at_arrival_not_after_waiting() -> None:
    """A long queue (200) at 4x a 2-slot service of 2 ms, deadlines 20 ms after arrival, on
    the test's clock: once the pace is known, arrivals that could not start in time are
    refused at once instead of waiting for their deadline, and the slots stay busy."""
    clock = Clock()
    throttler = Throttler(max_concurrency=2, max_queue=200, queue_timeout=1.0, clock=clock)
    events: list[tuple[float, int, str, Any]] = []  # (time, order, kind, payload)
    order = 0

    def at(when: float, kind: str, payload: Any = None) -> None:
        nonlocal order
        order += 1
        events.append((when, order, kind, payload))
        events.sort()

    refused_at_arrival = waited_out = cold_waited_out = served = late_starts = 0
    waiting: dict[int, tuple[Waiting, float]] = {}  # arrival number -> its wait, deadline
    for n in range(4000):  # one arrival every 0.25 ms: 4 a ms for 1 a ms served
        at(100.0 + n * 0.00025, "arrive", n)
    while events:
        clock.now, _, kind, payload = events.pop(0)
        if kind == "arrive":
            deadline = clock.now + 0.02
            decision = throttler.admit(deadline=deadline)
            if isinstance(decision, Permit):
                served += 1
                at(clock.now + 0.002, "done", decision)
            elif isinstance(decision, Waiting):
                waiting[payload] = (decision, deadline)
                at(deadline, "expire", payload)
            else:
                assert decision.reason == "deadline_exceeded"
                refused_at_arrival += 1
        elif kind == "done":
            payload.release()
            for number, (wait, deadline) in list(waiting.items()):
                if wait._waiter.outcome == "granted":
                    del waiting[number]
                    permit = wait.wait()
                    served += 1
                    late_starts += clock.now > deadline
                    at(clock.now + 0.002, "done", permit)
        elif payload in waiting:  # its deadline passed while it waited: the timer's refusal
            if payload >= 200:  # after the first 50 ms (the queue that formed while cold)
                waited_out += 1
            else:
                cold_waited_out += 1
            waiting.pop(payload)[0].cancel()
    stats = throttler.stats()
    assert (stats.in_flight, stats.queued) == (0, 0)
    assert late_starts == 0
    assert served + refused_at_arrival + waited_out + cold_waited_out == 4000
    assert served >= 0.99 * 1000  # the slots never idled: 1 s of 2 slots x 2 ms
    assert refused_at_arrival >= 2800
    assert waited_out <= 5, (waited_out, cold_waited_out)  # 0 when written


def test_threads_with_deadlines_lose_no_slot() -> None:
    """Threads refused at arrival, refused at their deadline and admitted, all at once."""
    throttler = Throttler(max_concurrency=2, max_queue=16, queue_timeout=0.05)
    observer = Observer()
    throttler.add_listener(observer)
    occupancy = Occupancy()
    start = threading.Barrier(8)

    def worker(seed: int) -> None:
        start.wait()
        for attempt in range(40):
            budget = (0.0005, 0.002, 0.01, None)[(seed + attempt) % 4]
            deadline = None if budget is None else throttler._clock() + budget
            try:
                with throttler.acquire(deadline=deadline), occupancy:
                    time.sleep(0.0005)
            except Overloaded:
                pass

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    run_to_end(threads, 30)
    assert occupancy.peak <= 2
    check_end_state(throttler, observer, 8 * 40)
    assert throttler._gap_samples >= _GAP_WARMUP  # the pace was learnt and could refuse
