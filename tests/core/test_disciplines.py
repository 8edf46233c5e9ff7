"""Queue disciplines: FIFO (default), LIFO, and CoDel-style adaptive LIFO."""

from __future__ import annotations

import asyncio
import threading

import pytest

from shedder import Overloaded, Permit, Throttler, ThrottlerListener


def codel_throttler(now: list[float], *, max_queue: int, codel_target: float) -> Throttler:
    """One slot, a 5 s queue timeout and a 0.1 s CoDel interval, on the test's clock ``now[0]``."""
    return Throttler(
        max_concurrency=1,
        max_queue=max_queue,
        queue_timeout=5,
        queue_discipline="codel",
        codel_interval=0.1,
        codel_target=codel_target,
        clock=lambda: now[0],
    )


async def queue_up(throttler: Throttler, count: int) -> list[asyncio.Task[Permit]]:
    tasks = []
    for _ in range(count):
        tasks.append(asyncio.create_task(throttler.acquire_async()))
        await asyncio.sleep(0)  # each reaches the queue before the next is created
    return tasks


async def admission_order(
    throttler: Throttler, holder: Permit, tasks: list[asyncio.Task[Permit]]
) -> list[int]:
    """Release slots one at a time and record which queued task each went to."""
    order: list[int] = []
    pending = dict(enumerate(tasks))
    holder.release()
    while pending:
        done, _ = await asyncio.wait(pending.values(), return_when=asyncio.FIRST_COMPLETED)
        for index, task in list(pending.items()):
            if task in done:
                del pending[index]
                if not task.cancelled() and task.exception() is None:
                    order.append(index)
                    task.result().release()
    return order


async def test_fifo_serves_oldest_first_and_refuses_the_arrival_when_full() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=3, queue_timeout=5)
    holder = await throttler.acquire_async()
    tasks = await queue_up(throttler, 3)
    with pytest.raises(Overloaded, match="queue_full"):
        await throttler.acquire_async()
    assert await admission_order(throttler, holder, tasks) == [0, 1, 2]


async def test_lifo_serves_newest_first_and_sheds_the_oldest_when_full() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=3, queue_timeout=5, queue_discipline="lifo")
    holder = await throttler.acquire_async()
    tasks = await queue_up(throttler, 4)  # the 4th pushes the 1st out
    with pytest.raises(Overloaded) as info:
        await tasks[0]
    assert info.value.reason == "queue_full"
    assert throttler.stats().shed_total["queue_full"] == 1
    assert throttler.queued == 3
    assert await admission_order(throttler, holder, tasks[1:]) == [2, 1, 0]
    assert (throttler.in_flight, throttler.queued) == (0, 0)


def test_lifo_eviction_wakes_a_waiting_thread() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=1, queue_timeout=5, queue_discipline="lifo")
    holder = throttler.acquire()
    outcome: list[BaseException] = []
    queued = threading.Event()

    class OnQueue(ThrottlerListener):
        def on_queue(self, throttler: Throttler, priority: str) -> None:
            queued.set()

    throttler.add_listener(OnQueue())

    def oldest() -> None:
        try:
            throttler.acquire()
        except Overloaded as exc:
            outcome.append(exc)

    thread = threading.Thread(target=oldest)
    thread.start()
    assert queued.wait(5)
    newest = threading.Thread(target=lambda: throttler.acquire().release())
    newest.start()
    thread.join(5)
    assert outcome
    assert isinstance(outcome[0], Overloaded)
    assert outcome[0].reason == "queue_full"
    holder.release()
    newest.join(5)
    assert (throttler.in_flight, throttler.queued) == (0, 0)


def test_lifo_with_no_queue_still_refuses_the_arrival() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=0, queue_discipline="lifo")
    with throttler, pytest.raises(Overloaded, match="queue_full"):
        throttler.acquire()


async def test_codel_is_fifo_while_the_queue_keeps_emptying() -> None:
    now = [0.0]
    throttler = codel_throttler(now, max_queue=5, codel_target=0.005)
    holder = await throttler.acquire_async()
    tasks = await queue_up(throttler, 3)
    now[0] = 0.05  # the queue has been busy for less than the interval
    assert await admission_order(throttler, holder, tasks) == [0, 1, 2]


async def test_codel_standing_queue_gets_short_waits_and_newest_first() -> None:
    now = [0.0]
    throttler = codel_throttler(now, max_queue=10, codel_target=0.02)
    holder = await throttler.acquire_async()
    early = await queue_up(throttler, 2)  # normal waits (5 s), queue busy since t=0
    now[0] = 0.5  # the queue has not emptied for 0.5 s > interval: it is standing
    late = await queue_up(throttler, 3)  # these may wait only codel_target
    # The early waiters have waited longer than the target: refused at once, not after 5 s.
    for task in early:
        with pytest.raises(Overloaded, match="queue_timeout"):
            await asyncio.wait_for(task, 1)
    # Newest first while it stands.
    holder.release()
    newest = await asyncio.wait_for(late[2], 1)
    assert not late[0].done()
    newest.release()
    second = await asyncio.wait_for(late[1], 1)
    # The last late arrival times out after the short target (real time), not after 5 s.
    with pytest.raises(Overloaded, match="queue_timeout"):
        await asyncio.wait_for(late[0], 1)
    second.release()
    assert (throttler.in_flight, throttler.queued) == (0, 0)
    assert throttler.stats().shed_total["queue_timeout"] == 3


async def test_codel_standing_state_outlives_the_short_waits_that_empty_the_queue() -> None:
    now = [0.0]
    throttler = codel_throttler(now, max_queue=10, codel_target=0.01)
    holder = await throttler.acquire_async()
    (first,) = await queue_up(throttler, 1)
    now[0] = 0.2
    (second,) = await queue_up(throttler, 1)  # standing: the first is refused now
    with pytest.raises(Overloaded, match="queue_timeout"):
        await asyncio.wait_for(first, 1)
    with pytest.raises(Overloaded, match="queue_timeout"):
        await asyncio.wait_for(second, 1)  # its short wait runs out: the queue is empty
    # Still overloaded a moment later: the short waits emptied the queue, but the arrival
    # still finds no free slot, so the queue is still standing (no long FIFO wait again).
    now[0] = 0.25
    (third,) = await queue_up(throttler, 1)
    with pytest.raises(Overloaded, match="queue_timeout"):
        await asyncio.wait_for(third, 1)
    # A whole interval in which no arrival found the slots full: the standing state ends, and
    # a new arrival gets the normal wait, first come first served.
    holder.release()
    holder = await throttler.acquire_async()
    now[0] = 0.4
    waiting = await queue_up(throttler, 2)
    now[0] = 0.45
    assert await admission_order(throttler, holder, waiting) == [0, 1]


async def test_codel_tells_listeners_whom_it_refused_and_how_long_they_waited() -> None:
    now = [0.0]
    sheds: list[tuple[str, float]] = []

    class Recorder(ThrottlerListener):
        def on_shed(self, throttler: Throttler, reason: str, waited: float, priority: str) -> None:
            sheds.append((reason, waited))

    throttler = codel_throttler(now, max_queue=4, codel_target=0.01)
    throttler.add_listener(Recorder())
    holder = await throttler.acquire_async()
    (early,) = await queue_up(throttler, 1)
    now[0] = 0.3
    (late,) = await queue_up(throttler, 1)
    with pytest.raises(Overloaded, match="queue_timeout"):
        await asyncio.wait_for(early, 1)
    assert sheds == [("queue_timeout", pytest.approx(0.3))]
    holder.release()
    (await asyncio.wait_for(late, 1)).release()


def test_bad_discipline_names_the_choices() -> None:
    with pytest.raises(ValueError, match="queue_discipline must be one of fifo, lifo, codel"):
        Throttler(1, queue_discipline="random")  # type: ignore[arg-type]
