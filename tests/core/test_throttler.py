"""Unit tests for the admission rules of DESIGN.md, one rule (or race) per test."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable

import pytest

import shedder
from shedder import SHED_REASONS, Overloaded, Throttler, ThrottlerListener


def test_free_slot_runs_at_once() -> None:
    throttler = Throttler(max_concurrency=2, max_queue=0)
    with throttler as permit:
        assert throttler.in_flight == 1
        assert permit.waited == 0.0
    assert throttler.in_flight == 0
    assert throttler.stats().admitted_total == 1


def test_full_queue_sheds_at_once_with_queue_full() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=0, retry_after=7)
    with throttler:
        started = time.monotonic()
        with pytest.raises(Overloaded) as info:
            throttler.acquire()
        assert time.monotonic() - started < 0.05
    assert info.value.reason == "queue_full"
    assert info.value.retry_after == 7
    assert throttler.stats().shed_total["queue_full"] == 1


def test_threshold_sheds_with_overloaded_while_queue_has_room() -> None:
    # 2 slots + 2 queue places; threshold 0.5: once in_flight + queued >= 2, arrivals that would
    # have to wait are refused although the queue still has room.
    throttler = Throttler(max_concurrency=2, max_queue=2, shed_threshold=0.5)
    a = throttler.acquire()
    b = throttler.acquire()
    with pytest.raises(Overloaded) as info:
        throttler.acquire()
    assert info.value.reason == "overloaded"
    assert throttler.queued == 0
    a.release()
    b.release()


def test_below_threshold_arrival_waits_then_gets_handed_slot() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=3, shed_threshold=1.0, queue_timeout=5)
    first = throttler.acquire()
    got: list[shedder.Permit] = []
    queued = threading.Event()

    class OnQueue(ThrottlerListener):
        def on_queue(self, throttler: Throttler, priority: str) -> None:
            queued.set()

    throttler.add_listener(OnQueue())
    waiter = threading.Thread(target=lambda: got.append(throttler.acquire()))
    waiter.start()
    assert queued.wait(5)
    assert throttler.queued == 1
    first.release()
    waiter.join(5)
    assert got
    assert got[0].waited > 0
    # The slot was handed over, not returned to the pool and re-taken.
    assert throttler.in_flight == 1
    assert throttler.queued == 0
    got[0].release()
    assert throttler.in_flight == 0


def test_queue_timeout_sheds_after_the_wait() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=1, queue_timeout=0.05)
    with throttler:
        started = time.monotonic()
        with pytest.raises(Overloaded) as info:
            throttler.acquire()
        waited = time.monotonic() - started
    assert info.value.reason == "queue_timeout"
    assert 0.04 <= waited < 1.0
    assert throttler.queued == 0
    assert throttler.in_flight == 0


def test_per_call_timeout_overrides_queue_timeout() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=1, queue_timeout=60)
    with throttler, pytest.raises(Overloaded, match="queue_timeout"):
        throttler.acquire(timeout=0.01)


def test_with_threshold_one_only_full_queue_or_timeout_sheds() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=1, queue_timeout=0.01, shed_threshold=1.0)
    with throttler:
        with pytest.raises(Overloaded) as info:
            throttler.acquire()  # waits (house not full), then times out
        assert info.value.reason == "queue_timeout"


def test_fifo_handoff_no_barging() -> None:
    """Waiters get slots in arrival order; a newcomer never jumps a waiting queue."""
    throttler = Throttler(max_concurrency=1, max_queue=10, queue_timeout=10)
    order: list[int] = []
    queued = threading.Semaphore(0)

    class OnQueue(ThrottlerListener):
        def on_queue(self, throttler: Throttler, priority: str) -> None:
            queued.release()

    throttler.add_listener(OnQueue())
    holder = throttler.acquire()

    def worker(i: int) -> None:
        with throttler:
            order.append(i)

    threads = []
    for i in range(5):
        t = threading.Thread(target=worker, args=(i,))
        t.start()
        assert queued.acquire(timeout=5)  # thread i is queued before i+1 starts
        threads.append(t)
    holder.release()
    for t in threads:
        t.join(5)
    assert order == [0, 1, 2, 3, 4]


def test_release_is_idempotent_and_never_doubles_a_slot() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=0)
    permit = throttler.acquire()
    assert permit.release() is True
    assert permit.release() is False
    assert throttler.in_flight == 0
    with throttler, pytest.raises(Overloaded):
        throttler.acquire()


def test_exit_without_enter_is_an_error() -> None:
    throttler = Throttler(max_concurrency=1)
    with pytest.raises(RuntimeError, match="without a matching enter"):
        throttler.__exit__(None, None, None)


def test_nested_with_on_two_throttlers() -> None:
    outer, inner = Throttler(1, name="outer"), Throttler(1, name="inner")
    with outer, inner:
        assert (outer.in_flight, inner.in_flight) == (1, 1)
    assert (outer.in_flight, inner.in_flight) == (0, 0)


def test_stats_snapshot_is_immutable_and_json_ready() -> None:
    throttler = Throttler(max_concurrency=2, max_queue=2, name="api")
    with throttler:
        stats = throttler.stats()
    assert stats.in_flight == 1
    assert stats.load == 0.25
    assert not stats.overloaded
    with pytest.raises(AttributeError):
        stats.in_flight = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        stats.shed_total["queue_full"] = 9  # type: ignore[index]
    assert stats.as_dict() == {
        "name": "api",
        "status": "ok",
        "in_flight": 1,
        "queued": 0,
        "max_concurrency": 2,
        "max_queue": 2,
        "load": 0.25,
        "shed_threshold": 1.0,
        "admitted_total": 1,
        "cancelled_total": 0,
        "shed_total": dict.fromkeys(SHED_REASONS, 0),
        "priorities": {
            "critical": {
                "queued": 0,
                "admitted_total": 0,
                "shed_total": dict.fromkeys(SHED_REASONS, 0),
            },
            "default": {
                "queued": 0,
                "admitted_total": 1,
                "shed_total": dict.fromkeys(SHED_REASONS, 0),
            },
            "sheddable": {
                "queued": 0,
                "admitted_total": 0,
                "shed_total": dict.fromkeys(SHED_REASONS, 0),
            },
        },
    }


def test_overloaded_when_load_reaches_threshold() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=0)
    with throttler:
        assert throttler.stats().overloaded
        assert throttler.stats().as_dict()["status"] == "overloaded"
    assert not throttler.stats().overloaded


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_concurrency": 0}, ValueError, "max_concurrency must be >= 1, got 0"),
        ({"max_concurrency": 2.5}, TypeError, "max_concurrency must be an int"),
        ({"max_concurrency": True}, TypeError, "max_concurrency must be an int"),
        ({"max_concurrency": 1, "max_queue": -1}, ValueError, "max_queue must be >= 0, got -1"),
        ({"max_concurrency": 1, "queue_timeout": -0.5}, ValueError, "queue_timeout must be >= 0"),
        ({"max_concurrency": 1, "queue_timeout": math.nan}, ValueError, "queue_timeout"),
        ({"max_concurrency": 1, "queue_timeout": "1"}, TypeError, "queue_timeout"),
        (
            {"max_concurrency": 1, "shed_threshold": 0},
            ValueError,
            r"shed_threshold must be in \(0, 1\], got 0",
        ),
        ({"max_concurrency": 1, "shed_threshold": 1.5}, ValueError, "shed_threshold"),
        ({"max_concurrency": 1, "retry_after": 0}, ValueError, "retry_after must be >= 1, got 0"),
        ({"max_concurrency": 1, "retry_after": "soon"}, TypeError, "retry_after must be an int"),
        ({"max_concurrency": 1, "retry_after_range": (5, 2)}, ValueError, "high must be >= low"),
        ({"max_concurrency": 1, "retry_after_range": (0, 2)}, ValueError, "low must be >= 1"),
        ({"max_concurrency": 1, "name": ""}, ValueError, "name"),
    ],
)
def test_bad_configuration_names_parameter_value_and_bound(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Throttler(**kwargs)  # type: ignore[arg-type]


def test_bad_per_call_timeout_does_not_leak_a_waiter() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=1)
    with throttler:
        with pytest.raises(ValueError, match="timeout"):
            throttler.acquire(timeout=-1)
        assert throttler.queued == 0


def test_retry_after_auto_estimates_drain_time_within_range() -> None:
    throttler = Throttler(
        max_concurrency=1, max_queue=0, retry_after="auto", retry_after_range=(2, 30)
    )
    # Teach it a 5 s hold time without sleeping: back-date the permit.
    permit = throttler.acquire()
    permit.acquired_at -= 5.0
    permit.release()
    with throttler, pytest.raises(Overloaded) as info:
        throttler.acquire()
    # Backlog of 1 running + this arrival, 5 s each, one slot: about 10 s.
    assert 10 <= info.value.retry_after <= 11
    # Clamped from below when the service is fast.
    fast = Throttler(max_concurrency=1, max_queue=0, retry_after="auto", retry_after_range=(2, 30))
    with fast, pytest.raises(Overloaded) as info:
        fast.acquire()
    assert info.value.retry_after == 2


def test_overloaded_exception_shape() -> None:
    exc = Overloaded("queue_full", 3)
    assert (exc.reason, exc.retry_after) == ("queue_full", 3)
    assert "queue_full" in str(exc)
    assert repr(exc) == "Overloaded(reason='queue_full', retry_after=3, priority='default')"


def test_listener_errors_never_lose_a_slot(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(ThrottlerListener):
        def on_admit(self, throttler: Throttler, waited: float, priority: str) -> None:
            raise RuntimeError("boom")

        def on_release(self, throttler: Throttler, held: float) -> None:
            raise RuntimeError("boom")

    throttler = Throttler(max_concurrency=1)
    throttler.add_listener(Broken())
    with throttler:
        assert throttler.in_flight == 1
    assert throttler.in_flight == 0
    assert "listener" in caplog.text


def test_listener_sees_every_event() -> None:
    events: list[tuple[str, object]] = []

    class Recorder(ThrottlerListener):
        def on_queue(self, throttler: Throttler, priority: str) -> None:
            events.append(("queue", None))

        def on_admit(self, throttler: Throttler, waited: float, priority: str) -> None:
            events.append(("admit", waited > 0))

        def on_shed(self, throttler: Throttler, reason: str, waited: float, priority: str) -> None:
            events.append(("shed", reason))

        def on_release(self, throttler: Throttler, held: float) -> None:
            events.append(("release", held >= 0))

    throttler = Throttler(max_concurrency=1, max_queue=1, queue_timeout=0.01)
    recorder = Recorder()
    throttler.add_listener(recorder)
    with throttler, pytest.raises(Overloaded):
        throttler.acquire()
    throttler.remove_listener(recorder)
    with throttler:
        pass
    assert events == [
        ("admit", False),
        ("queue", None),
        ("shed", "queue_timeout"),
        ("release", True),
    ]


def test_registry_lists_live_throttlers() -> None:
    a = Throttler(1, name="registry-a")
    names = [t.name for t in shedder.throttlers()]
    assert "registry-a" in names
    del a
    import gc

    gc.collect()
    assert "registry-a" not in [t.name for t in shedder.throttlers()]


# -- asyncio ---------------------------------------------------------------------------------


async def test_async_with_and_fifo_handoff() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=10, queue_timeout=5)
    order: list[int] = []
    holder = await throttler.acquire_async()

    async def worker(i: int) -> None:
        async with throttler:
            order.append(i)

    tasks = []
    for i in range(5):
        tasks.append(asyncio.create_task(worker(i)))
        await asyncio.sleep(0)  # let task i reach the queue before i+1 is created
    assert throttler.queued == 5
    holder.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert throttler.in_flight == 0


async def test_async_queue_timeout() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=1, queue_timeout=0.05)
    async with throttler:
        with pytest.raises(Overloaded, match="queue_timeout"):
            await throttler.acquire_async()
        assert throttler.queued == 0
    assert throttler.in_flight == 0


async def test_cancelled_waiter_leaves_queue_at_once() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=5, queue_timeout=10)
    holder = await throttler.acquire_async()
    task = asyncio.create_task(throttler.acquire_async())
    await asyncio.sleep(0)
    assert throttler.queued == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert throttler.queued == 0
    assert throttler.stats().cancelled_total == 1
    holder.release()
    assert throttler.in_flight == 0


async def test_slot_granted_to_a_cancelled_waiter_passes_on() -> None:
    """The classic race: the slot is handed over, then the waiter is cancelled before it runs."""
    throttler = Throttler(max_concurrency=1, max_queue=5, queue_timeout=10)
    holder = await throttler.acquire_async()
    doomed = asyncio.create_task(throttler.acquire_async())
    await asyncio.sleep(0)
    heir = asyncio.create_task(throttler.acquire_async())
    await asyncio.sleep(0)
    assert throttler.queued == 2
    holder.release()  # grants `doomed` (future resolved, task not yet resumed)...
    doomed.cancel()  # ...which is cancelled in the same instant
    with pytest.raises(asyncio.CancelledError):
        await doomed
    permit = await asyncio.wait_for(heir, 5)
    assert throttler.in_flight == 1
    permit.release()
    assert throttler.in_flight == 0
    assert throttler.queued == 0


async def test_slot_granted_at_the_instant_of_timeout_is_kept() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=5, queue_timeout=0.02)
    holder = await throttler.acquire_async()
    waiter = asyncio.create_task(throttler.acquire_async())
    await asyncio.sleep(0)
    # Block the loop past the timeout so the expiry and the grant land in the same loop pass.
    time.sleep(0.05)  # noqa: ASYNC251 - blocking the loop is the point
    holder.release()
    result = await asyncio.gather(waiter, return_exceptions=True)
    # Either outcome is legal; what matters is that no slot is lost or doubled.
    if isinstance(result[0], shedder.Permit):
        assert throttler.in_flight == 1
        result[0].release()
    else:
        assert isinstance(result[0], Overloaded)
    assert throttler.in_flight == 0
    assert throttler.queued == 0


async def test_release_from_another_thread_wakes_asyncio_waiter() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=1, queue_timeout=5)
    holder = throttler.acquire()
    task = asyncio.create_task(throttler.acquire_async())
    await asyncio.sleep(0)
    assert throttler.queued == 1
    thread = threading.Thread(target=holder.release)
    thread.start()
    permit = await asyncio.wait_for(task, 5)
    thread.join()
    assert permit.waited > 0
    permit.release()
    assert throttler.in_flight == 0


async def test_threads_and_tasks_share_one_throttler() -> None:
    throttler = Throttler(max_concurrency=2, max_queue=100, queue_timeout=10)
    peak = 0
    lock = threading.Lock()

    def enter() -> None:
        nonlocal peak
        with lock:
            peak = max(peak, throttler.in_flight)

    def thread_work() -> None:
        for _ in range(20):
            with throttler:
                enter()
                time.sleep(0.001)

    async def task_work() -> None:
        for _ in range(20):
            async with throttler:
                enter()
                await asyncio.sleep(0.001)

    threads = [threading.Thread(target=thread_work) for _ in range(3)]
    for t in threads:
        t.start()
    await asyncio.gather(*(task_work() for _ in range(3)))
    await asyncio.to_thread(lambda: [t.join() for t in threads])
    assert peak <= 2
    stats = throttler.stats()
    assert (stats.in_flight, stats.queued) == (0, 0)
    assert stats.admitted_total == 120


async def test_waiter_on_closed_loop_is_skipped() -> None:
    """A grant to a waiter whose loop has closed passes to the next waiter."""
    throttler = Throttler(max_concurrency=1, max_queue=5, queue_timeout=10)
    holder = throttler.acquire()
    other_loop = asyncio.new_event_loop()
    # Its task is destroyed pending on purpose: keep the loop from logging about it.
    other_loop.set_exception_handler(lambda loop, context: None)
    ready = threading.Event()

    def run_dead_waiter() -> None:
        async def wait() -> None:
            task = asyncio.ensure_future(throttler.acquire_async())
            await asyncio.sleep(0)
            ready.set()
            other_loop.stop()
            await task

        task = other_loop.create_task(wait())
        other_loop.run_forever()
        assert not task.done()

    thread = threading.Thread(target=run_dead_waiter)
    thread.start()
    thread.join(5)
    assert ready.is_set()
    other_loop.close()  # its waiter is still queued, and can never run now
    heir = asyncio.create_task(throttler.acquire_async())
    await asyncio.sleep(0)
    assert throttler.queued == 2
    holder.release()
    permit = await asyncio.wait_for(heir, 5)
    assert throttler.in_flight == 1
    permit.release()
    assert throttler.in_flight == 0


async def test_readme_worked_example() -> None:
    """The worked example of the README's admission rules, step by step."""
    throttler = Throttler(max_concurrency=4, max_queue=4, shed_threshold=0.75, queue_timeout=10)
    running = [await throttler.acquire_async() for _ in range(4)]
    waiting = [asyncio.create_task(throttler.acquire_async()) for _ in range(2)]
    await asyncio.sleep(0)
    assert throttler.stats().load == 6 / 8
    with pytest.raises(Overloaded) as info:
        await throttler.acquire_async()
    assert info.value.reason == "overloaded"
    running[0].release()
    fifth = await waiting[0]
    assert throttler.stats().load == 5 / 8
    for permit in [fifth, *running[1:]]:
        permit.release()
    (await waiting[1]).release()

    lenient = Throttler(max_concurrency=4, max_queue=4, shed_threshold=1.0, queue_timeout=10)
    running = [await lenient.acquire_async() for _ in range(4)]
    waiting = [asyncio.create_task(lenient.acquire_async()) for _ in range(4)]
    await asyncio.sleep(0)
    with pytest.raises(Overloaded) as info:
        await lenient.acquire_async()
    assert info.value.reason == "queue_full"
    for permit in running:
        permit.release()
    for permit in await asyncio.gather(*waiting):
        permit.release()
    assert lenient.stats().in_flight == 0


# -- the quick lane (what the adapters ask before reading a request's headers) -----------------


def quick_lane(throttler: Throttler, priority: str) -> Callable[[], Overloaded | None]:
    """The quick lane of class ``priority``, answering the refusal itself."""
    rank = throttler._rank(priority)
    refusal = throttler._quick_refusal(rank)
    assert refusal is not None
    lane = throttler._quick_lane(rank, refusal)
    assert lane is not None
    return lane


def test_quick_lane_refuses_only_when_slots_and_queue_are_full() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=1, retry_after=3)
    seen: list[tuple[str, str]] = []

    class Shed(ThrottlerListener):
        def on_shed(self, throttler: Throttler, reason: str, waited: float, priority: str) -> None:
            seen.append((reason, priority))

    throttler.add_listener(Shed())
    lane = quick_lane(throttler, "default")
    assert lane() is None  # a free slot: admit() decides
    permit = throttler.acquire()
    assert lane() is None  # a free queue place
    waiting = throttler.admit()
    assert isinstance(waiting, shedder.Waiting)
    refusal = lane()
    assert refusal is not None
    assert (refusal.reason, refusal.retry_after, refusal.priority) == ("queue_full", 3, "default")
    assert lane() is refusal  # shared: refusing allocates nothing
    assert seen == [("queue_full", "default")] * 2
    stats = throttler.stats()
    assert stats.shed_total["queue_full"] == 2
    assert stats.shed_by_priority["default"]["queue_full"] == 2
    assert throttler.stats().shed_total["queue_full"] == 2  # reading does not count
    waiting.cancel()
    permit.release()
    assert lane() is None


def test_quick_lane_reads_the_class_s_room_and_leaves_room_making_to_admit() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=1)
    permit = throttler.acquire()
    critical, default, sheddable = (quick_lane(throttler, c) for c in throttler.priorities)
    s1 = throttler.admit(priority="sheddable")
    assert sheddable() is not None  # its room is full and no class is lower
    assert default() is None  # its own room has a place
    d1 = throttler.admit()
    # The default room is full, but a sheddable waiter would give up its place: admit decides.
    assert default() is None
    d2 = throttler.admit()
    assert isinstance(s1, shedder.Waiting)
    assert s1._waiter.outcome == "queue_full"
    assert default() is not None  # full, and nobody lower waits
    assert critical() is None  # a room of its own
    c1 = throttler.admit(priority="critical")
    # Every room is full (3 = max_queue x 3 classes) and the critical room holds one place:
    # a critical arrival takes the newest default place.
    assert critical() is None
    # Sheddable's room is empty, the house full: admit decides, and refuses.
    assert sheddable() is None
    refusal = throttler.admit(priority="sheddable")
    assert isinstance(refusal, shedder.Overloaded)
    assert refusal.reason == "queue_full"
    for waiting in (d1, d2, c1):
        assert isinstance(waiting, shedder.Waiting)
        waiting.cancel()
    permit.release()


def test_quick_lane_without_a_waiting_room_reads_only_the_slots() -> None:
    throttler = Throttler(max_concurrency=2, max_queue=0)
    lanes = [quick_lane(throttler, c) for c in throttler.priorities]
    assert [lane() for lane in lanes] == [None, None, None]
    permits = [throttler.acquire(), throttler.acquire(priority="sheddable")]
    refusals = [lane() for lane in lanes]
    assert [r.priority for r in refusals if r is not None] == list(throttler.priorities)
    assert throttler.stats().shed_total["queue_full"] == 3
    permits.pop().release()
    assert [lane() for lane in lanes] == [None, None, None]
    permits.pop().release()


@pytest.mark.parametrize(
    "options",
    [{"queue_discipline": "codel"}, {"queue_discipline": "lifo"}, {"retry_after": "auto"}],
)
def test_quick_lane_is_off_where_admit_must_decide(options: dict[str, object]) -> None:
    throttler = Throttler(max_concurrency=1, max_queue=0, **options)  # type: ignore[arg-type]
    assert throttler._quick_refusal(throttler._rank("default")) is None
    assert throttler._quick_lane(throttler._rank("default"), "answer") is None
