"""Priority classes: who is served first, who is refused first, and what reports it.

The rules run on a deterministic clock (``Throttler(clock=...)``) and on one thread: an arrival
that must wait is queued with ``admit()``, and a release hands the slot to exactly one waiter,
whose ``wait()`` then returns at once. Which waiter holds a grant is read from its outcome
(``granted``, a refusal reason, or None while it still waits).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shedder import (
    SHED_REASONS,
    Classification,
    Overloaded,
    Permit,
    Request,
    Throttler,
    ThrottlerListener,
    Waiting,
)
from shedder.asgi import LoadSheddingMiddleware

from .test_throttler import quick_lane
from .test_throttler_stress import Occupancy, run_to_end


class Clock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def queue(throttler: Throttler, priority: str | None = None, flow: Hashable = None) -> Waiting:
    """Queue one arrival (it must have to wait)."""
    decision = throttler.admit(priority=priority, flow=flow)
    assert isinstance(decision, Waiting), decision
    return decision


def refused(throttler: Throttler, priority: str | None = None, flow: Hashable = None) -> Overloaded:
    decision = throttler.admit(priority=priority, flow=flow)
    assert isinstance(decision, Overloaded), decision
    return decision


def outcome(waiting: Waiting) -> str | None:
    """``"granted"``, the refusal reason, or None while it waits (peeks at the waiter)."""
    return waiting._waiter.outcome


def serve_all(holder: Permit, waiting: dict[str, Waiting]) -> list[str]:
    """Release ``holder``, then each granted waiter in turn: the labels in serving order."""
    order: list[str] = []
    permit = holder
    while True:
        permit.release()
        granted = [label for label, w in waiting.items() if outcome(w) == "granted"]
        if not granted:
            return order
        assert len(granted) == 1, f"one slot went to {granted}"
        label = granted[0]
        permit = waiting.pop(label).wait()
        order.append(label)


@dataclass
class Events(ThrottlerListener):
    """Records every event with its priority class."""

    seen: list[tuple[Any, ...]] = field(default_factory=list)

    def on_queue(self, throttler: Throttler, priority: str) -> None:
        self.seen.append(("queue", priority))

    def on_admit(self, throttler: Throttler, waited: float, priority: str) -> None:
        self.seen.append(("admit", priority, waited))

    def on_shed(self, throttler: Throttler, reason: str, waited: float, priority: str) -> None:
        self.seen.append(("shed", priority, reason, waited))


# -- ordering ---------------------------------------------------------------------------------


def test_higher_class_is_served_first_then_arrival_order() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=10, clock=Clock())
    holder = throttler.acquire()
    waiting = {
        label: queue(throttler, priority)
        for label, priority in [
            ("s1", "sheddable"),
            ("d1", None),  # no class named: the default class
            ("c1", "critical"),
            ("s2", "sheddable"),
            ("d2", "default"),
            ("c2", "critical"),
        ]
    }
    assert throttler.stats().queued_by_priority == {"critical": 2, "default": 2, "sheddable": 2}
    assert serve_all(holder, waiting) == ["c1", "c2", "d1", "d2", "s1", "s2"]
    stats = throttler.stats()
    assert (stats.in_flight, stats.queued) == (0, 0)
    assert stats.admitted_by_priority == {"critical": 2, "default": 3, "sheddable": 2}


def test_lifo_serves_the_highest_class_first_then_newest_first() -> None:
    clock = Clock()
    throttler = Throttler(max_concurrency=1, max_queue=4, queue_discipline="lifo", clock=clock)
    holder = throttler.acquire()
    waiting = {}
    for label, priority in [
        ("c1", "critical"),
        ("s1", "sheddable"),
        ("d1", None),
        ("c2", "critical"),
    ]:
        waiting[label] = queue(throttler, priority)
        clock.advance(0.01)
    assert serve_all(holder, waiting) == ["c2", "c1", "d1", "s1"]


def test_the_backlog_outlives_an_instant_s_gap_but_not_a_pause() -> None:
    clock = Clock()
    throttler = Throttler(max_concurrency=1, max_queue=1, clock=clock)
    assert throttler.burst_window == 0.1
    permit = throttler.acquire()
    # Services of 10 ms, each handing its slot to the next arrival: the queue empties at every
    # grant, for no time at all, and the pace of releases is 10 ms.
    for _ in range(12):
        following = queue(throttler)
        clock.advance(0.01)
        permit.release()
        permit = following.wait()
    assert throttler._release_gap == pytest.approx(0.01)
    # One backlog of 120 ms: overload, where a full room is full (critical's room, in the
    # house since its one waiter, lends no place).
    critical = queue(throttler, "critical")
    critical.cancel()
    waiting = {"d1": queue(throttler)}
    assert refused(throttler).reason == "queue_full"
    assert serve_all(permit, waiting) == ["d1"]
    # The queue stayed empty for longer than a release interval: the next backlog is a burst.
    clock.advance(0.05)
    permit = throttler.acquire()
    waiting = {"d2": queue(throttler), "d3": queue(throttler)}  # d3 borrows critical's place
    assert serve_all(permit, waiting) == ["d2", "d3"]


@settings(max_examples=300, deadline=None)
@given(
    max_queue=st.integers(0, 2),
    burst=st.booleans(),
    steps=st.lists(
        st.one_of(st.sampled_from(["critical", "default", "sheddable"]), st.just("release")),
        max_size=40,
    ),
)
def test_who_waits_and_who_is_refused_against_a_model(
    max_queue: int, burst: bool, steps: list[str]
) -> None:
    """Against a model of the rooms: each class that finds the slot busy brings a room of
    ``max_queue`` places into the house; an arrival whose room is full borrows an idle place
    of the house during a burst (``burst``: the backlog never ages), else takes the newest
    place of the lowest class below it, else is refused; so is one that finds the house full
    with no lower class waiting. Grants go to the highest class first, then first come.
    The clock moves 1 ms a step, so that arrivals never tie.
    """
    clock = Clock()
    throttler = Throttler(
        max_concurrency=1,
        max_queue=max_queue,
        burst_window=math.inf if burst else 0.0,
        clock=clock,
    )
    rank = {name: index for index, name in enumerate(throttler.priorities)}
    holder: Permit | None = None
    model: list[tuple[int, int, Waiting]] = []  # (rank, arrival, decision)
    in_house: set[int] = set()
    for step, action in enumerate(steps):
        clock.advance(0.001)
        if action == "release":
            if holder is not None:
                holder.release()
                holder = None
                if model:
                    first = min(model, key=lambda m: m[:2])
                    model.remove(first)
                    assert outcome(first[2]) == "granted"
                    holder = first[2].wait()
            continue
        decision = throttler.admit(priority=action)
        r = rank[action]
        if holder is None and not model:
            assert isinstance(decision, Permit)
            holder = decision
            continue
        in_house.add(r)
        house, size = max_queue * len(in_house), len(model)
        own = sum(1 for m in model if m[0] == r)
        if size >= house or (own >= max_queue and not burst):
            lowest = max((m[0] for m in model), default=-1)
            if lowest <= r:
                assert isinstance(decision, Overloaded)
                assert decision.reason == "queue_full"
                continue
            victim = max((m for m in model if m[0] == lowest), key=lambda m: m[1])
            model.remove(victim)
            assert outcome(victim[2]) == "queue_full"
        assert isinstance(decision, Waiting)
        model.append((r, step, decision))
        assert all(outcome(m[2]) is None for m in model)
    assert throttler.queued == len(model)
    assert throttler.stats().queued_by_priority == {
        name: sum(1 for m in model if m[0] == index) for name, index in rank.items()
    }
    if holder is not None:
        holder.release()
    for _, _, waiting in model:
        waiting.cancel()
    assert (throttler.in_flight, throttler.queued) == (0, 0)


def test_permits_and_events_carry_the_class() -> None:
    clock = Clock()
    throttler = Throttler(max_concurrency=1, max_queue=2, clock=clock)
    events = Events()
    throttler.add_listener(events)
    holder = throttler.acquire(priority="critical")
    assert holder.priority == "critical"
    waiting = queue(throttler, "sheddable")
    clock.advance(0.25)
    holder.release()
    permit = waiting.wait()
    assert (permit.priority, permit.waited) == ("sheddable", 0.25)
    permit.release()
    assert events.seen == [
        ("admit", "critical", 0.0),
        ("queue", "sheddable"),
        ("admit", "sheddable", 0.25),
    ]
    assert repr(permit) == "<Permit released of 'default' (sheddable)>"


def test_custom_classes_and_default() -> None:
    throttler = Throttler(
        max_concurrency=1,
        max_queue=4,
        priorities=("gold", "silver", "bronze"),
        default_priority="bronze",
        clock=Clock(),
        burst_window=0,  # no borrowing: a full room is full
    )
    assert throttler.priorities == ("gold", "silver", "bronze")
    assert throttler.default_priority == "bronze"
    # The default class is the lowest here: every class is at or above it, none shed early.
    assert [throttler.shed_threshold_of(p) for p in throttler.priorities] == [1.0, 1.0, 1.0]
    holder = throttler.acquire()
    assert holder.priority == "bronze"
    waiting = {"bronze": queue(throttler), "gold": queue(throttler, "gold")}
    assert serve_all(holder, waiting) == ["gold", "bronze"]


# -- eviction ---------------------------------------------------------------------------------


def test_each_class_waits_in_a_room_of_its_own() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=2, clock=Clock(), burst_window=0)
    events = Events()
    throttler.add_listener(events)
    holder = throttler.acquire()
    s1, s2 = queue(throttler, "sheddable"), queue(throttler, "sheddable")
    refusal = refused(throttler, "sheddable")  # its room is full, and no class is lower
    assert (refusal.reason, refusal.priority) == ("queue_full", "sheddable")
    # The rooms above are empty: higher arrivals wait there, and nobody gives way.
    waiting = {"d1": queue(throttler), "c1": queue(throttler, "critical")}
    waiting["c2"] = queue(throttler, "critical")
    waiting["d2"] = queue(throttler)
    assert (outcome(s1), outcome(s2)) == (None, None)
    stats = throttler.stats()
    assert stats.queued == 6  # max_queue in each class
    assert stats.queued_by_priority == {"critical": 2, "default": 2, "sheddable": 2}
    assert stats.load == (1 + 6) / (1 + 2)  # the house can be more than full
    assert stats.overloaded
    # A class whose room is full takes the newest place of the lowest class that waits.
    waiting["c3"] = queue(throttler, "critical")
    assert (outcome(s1), outcome(s2)) == (None, "queue_full")
    waiting["d3"] = queue(throttler)
    assert outcome(s1) == "queue_full"
    assert ("shed", "sheddable", "queue_full", 0.0) in events.seen
    # Every place of the house is taken and no lower class waits: refused.
    assert refused(throttler).reason == "queue_full"
    assert throttler.queued == 6
    assert {p: c["queue_full"] for p, c in throttler.stats().shed_by_priority.items()} == {
        "critical": 0,
        "default": 1,
        "sheddable": 3,
    }
    # All arrived at the same instant: class order (ties go to the higher class).
    assert serve_all(holder, waiting) == ["c1", "c2", "c3", "d1", "d2", "d3"]


def test_in_a_burst_a_full_room_borrows_an_idle_place_of_the_house() -> None:
    clock = Clock()
    throttler = Throttler(max_concurrency=1, max_queue=2, clock=clock)
    holder = throttler.acquire()
    waiting = {"s1": queue(throttler, "sheddable"), "s2": queue(throttler, "sheddable")}
    clock.advance(0.001)
    waiting["c1"] = queue(throttler, "critical")  # critical's room joins the house: 4 places
    clock.advance(0.001)
    # Sheddable's room is full, but the backlog is young (a burst): it borrows critical's
    # idle place rather than be refused.
    waiting["s3"] = queue(throttler, "sheddable")
    assert throttler.stats().queued_by_priority == {"critical": 1, "default": 0, "sheddable": 3}
    # The house is full and no class is lower: refused.
    assert refused(throttler, "sheddable").reason == "queue_full"
    # Critical's room has a place, lent out: a critical arrival takes it back from the newest
    # sheddable waiter.
    clock.advance(0.001)
    waiting["c2"] = queue(throttler, "critical")
    assert outcome(waiting.pop("s3")) == "queue_full"
    # The default class has never waited: its room is not in the house, nobody borrows it.
    assert refused(throttler, "sheddable").reason == "queue_full"
    assert serve_all(holder, waiting) == ["c1", "c2", "s1", "s2"]


def test_after_the_burst_each_class_keeps_to_its_own_room() -> None:
    clock = Clock()
    throttler = Throttler(max_concurrency=1, max_queue=2, clock=clock)
    lane = quick_lane(throttler, "sheddable")
    holder = throttler.acquire()
    waiting = {"c1": queue(throttler, "critical")}
    waiting |= {"s1": queue(throttler, "sheddable"), "s2": queue(throttler, "sheddable")}
    assert lane() is None  # sheddable's room is full, but it may borrow: admit decides
    clock.advance(0.15)  # older than burst_window: overload, and a room is a room
    assert lane() is not None
    assert refused(throttler, "sheddable").reason == "queue_full"
    assert throttler.stats().shed_by_priority["sheddable"]["queue_full"] == 2
    assert serve_all(holder, waiting) == ["c1", "s1", "s2"]


def test_with_nothing_classified_the_house_is_one_room() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=2, clock=Clock())  # a burst, forever
    lane = quick_lane(throttler, "default")
    holder = throttler.acquire()
    waiting = {"d1": queue(throttler), "d2": queue(throttler)}
    assert lane() is not None  # no other class has waited: nothing to borrow
    assert refused(throttler).reason == "queue_full"
    assert throttler._house == 2
    assert serve_all(holder, waiting) == ["d1", "d2"]


def test_an_async_arrival_without_a_loop_raises_and_evicts_nobody() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=1, clock=Clock())
    holder = throttler.acquire()
    prefetch = queue(throttler, "sheddable")
    critical = queue(throttler, "critical")
    with pytest.raises(RuntimeError, match="no running event loop"):
        throttler.admit(priority="critical", waiter="async")  # would take prefetch's place
    assert outcome(prefetch) is None
    assert serve_all(holder, {"c": critical, "s": prefetch}) == ["c", "s"]


def test_a_critical_arrival_is_refused_when_its_room_is_full() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=2, clock=Clock())
    holder = throttler.acquire()
    waiting = {"c1": queue(throttler, "critical"), "c2": queue(throttler, "critical")}
    refusal = refused(throttler, "critical")
    assert (refusal.reason, refusal.priority) == ("queue_full", "critical")
    assert repr(refusal) == "Overloaded(reason='queue_full', retry_after=1, priority='critical')"
    assert serve_all(holder, waiting) == ["c1", "c2"]


def test_lifo_full_room_refuses_its_oldest_of_the_same_class() -> None:
    throttler = Throttler(
        max_concurrency=1, max_queue=3, queue_discipline="lifo", clock=Clock(), burst_window=0
    )
    holder = throttler.acquire()
    d1, d2, d3 = queue(throttler), queue(throttler), queue(throttler)
    c1 = queue(throttler, "critical")  # a room of its own: nobody goes
    assert [outcome(w) for w in (d1, d2, d3)] == [None, None, None]
    d4 = queue(throttler)  # its class's room is full, LIFO: the oldest default waiter goes
    assert outcome(d1) == "queue_full"
    # Classes first (one instant: ties), then newest first within a class.
    assert serve_all(holder, {"d2": d2, "d3": d3, "d4": d4, "c1": c1}) == ["c1", "d4", "d3", "d2"]


def test_fifo_full_room_refuses_a_same_class_arrival() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=2, clock=Clock())
    holder = throttler.acquire()
    waiting = {"d1": queue(throttler), "d2": queue(throttler)}
    assert refused(throttler).reason == "queue_full"
    assert serve_all(holder, waiting) == ["d1", "d2"]


def test_codel_refuses_stale_waiters_of_every_class_and_serves_classes_first() -> None:
    clock = Clock()
    throttler = Throttler(
        max_concurrency=1,
        max_queue=10,
        queue_discipline="codel",
        codel_target=0.005,
        codel_interval=0.1,
        clock=clock,
    )
    holder = throttler.acquire()
    s1 = queue(throttler, "sheddable")  # the queue stops being empty now
    clock.advance(0.05)
    c1 = queue(throttler, "critical")
    clock.advance(0.06)  # not empty for a whole interval: the queue is standing
    d1 = queue(throttler)
    assert throttler.discipline.standing  # type: ignore[attr-defined]
    # Both had waited more than the target: refused, whatever their class; the new one waits.
    assert (outcome(s1), outcome(c1), outcome(d1)) == ("queue_timeout", "queue_timeout", None)
    for waiting in (s1, c1):
        with pytest.raises(Overloaded) as info:
            waiting.wait()
        assert info.value.reason == "queue_timeout"
        assert info.value.priority == waiting.priority
    assert throttler.stats().shed_by_priority["critical"]["queue_timeout"] == 1
    # While standing: classes still come first, newest first within a class.
    waiting = {"s2": queue(throttler, "sheddable"), "c2": queue(throttler, "critical")}
    waiting["c3"] = queue(throttler, "critical")
    waiting["d1"] = d1
    assert serve_all(holder, waiting) == ["c3", "c2", "d1", "s2"]


# -- shed points ------------------------------------------------------------------------------


def test_every_class_shares_the_shed_point_by_default() -> None:
    throttler = Throttler(max_concurrency=2, max_queue=2, shed_threshold=0.9, clock=Clock())
    assert {p: throttler.shed_threshold_of(p) for p in throttler.priorities} == {
        "critical": 0.9,
        "default": 0.9,
        "sheddable": 0.9,
    }


def test_a_lower_shed_point_refuses_sheddable_at_three_quarters() -> None:
    throttler = Throttler(
        max_concurrency=2,
        max_queue=2,
        shed_thresholds={"sheddable": 0.75},
        clock=Clock(),
        burst_window=0,  # no borrowing: a full room is full
    )
    assert {p: throttler.shed_threshold_of(p) for p in throttler.priorities} == {
        "critical": 1.0,
        "default": 1.0,
        "sheddable": 0.75,
    }
    holders = [throttler.acquire(priority="sheddable") for _ in range(2)]  # fast path: load 0.5
    s1 = queue(throttler, "sheddable")  # load 0.5 < 0.75: may wait
    refusal = refused(throttler, "sheddable")  # load 0.75: refused at once
    assert (refusal.reason, refusal.priority) == ("overloaded", "sheddable")
    d1 = queue(throttler)  # the default class waits until its room is full
    c1 = queue(throttler, "critical")
    assert outcome(s1) is None
    stats = throttler.stats()
    assert stats.shed_by_priority["sheddable"] == {
        **dict.fromkeys(SHED_REASONS, 0),
        "overloaded": 1,
    }
    assert stats.load == 5 / 4
    assert serve_all(holders[0], {"s1": s1, "d1": d1, "c1": c1}) == ["c1", "d1", "s1"]
    holders[1].release()


def test_explicit_shed_thresholds() -> None:
    throttler = Throttler(
        max_concurrency=1,
        max_queue=9,
        shed_thresholds={"default": 0.5, "sheddable": 0.2},
        clock=Clock(),
        burst_window=0,  # no borrowing: a full room is full
    )
    assert [throttler.shed_threshold_of(p) for p in throttler.priorities] == [1.0, 0.5, 0.2]
    holder = throttler.acquire()  # load 0.1
    s1 = queue(throttler, "sheddable")  # load 0.1 < 0.2
    assert refused(throttler, "sheddable").reason == "overloaded"  # load 0.2
    s1.cancel()
    # A class's load: the slots plus its own waiters, over the slots plus one room.
    waiting = {f"d{i}": queue(throttler) for i in range(1, 5)}  # up to load 0.5
    assert refused(throttler).reason == "overloaded"
    waiting |= {f"c{i}": queue(throttler, "critical") for i in range(1, 10)}  # its room, full
    assert all(outcome(w) is None for w in waiting.values())
    waiting["c10"] = queue(throttler, "critical")  # the newest default waiter gives way
    assert outcome(waiting.pop("d4")) == "queue_full"
    assert serve_all(holder, waiting) == [*(f"c{i}" for i in range(1, 11)), "d1", "d2", "d3"]


def test_a_higher_class_over_its_shed_point_takes_a_lower_class_place() -> None:
    # shed_threshold 0.8: every class is refused once the house is at 0.8 (its shed point
    # reads every class's waiters).
    throttler = Throttler(
        max_concurrency=1, max_queue=4, shed_threshold=0.8, clock=Clock(), burst_window=0
    )
    holder = throttler.acquire()
    s1 = queue(throttler, "sheddable")  # load 0.2
    s2 = queue(throttler, "sheddable")  # load 0.4
    d1 = queue(throttler)  # load 0.6
    # Load 0.8: a critical arrival would be refused while two sheddable waiters, served after
    # it, keep their places: the lower class must be refused first.
    decision = throttler.admit(priority="critical")
    assert isinstance(decision, Waiting)
    assert (outcome(s1), outcome(s2)) == (None, "overloaded")
    assert serve_all(holder, {"c1": decision, "d1": d1, "s1": s1}) == ["c1", "d1", "s1"]


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"priorities": ()}, ValueError, "at least one class"),
        ({"priorities": "critical"}, TypeError, "priorities must be a sequence"),
        ({"priorities": ("a", "a")}, ValueError, "distinct"),
        ({"priorities": ("a", "")}, ValueError, "non-empty strings"),
        ({"priorities": ("a", 1)}, ValueError, "non-empty strings"),
        ({"default_priority": "normal"}, ValueError, "'normal'"),
        ({"priorities": ("gold", "bronze")}, ValueError, "default_priority"),
        ({"shed_thresholds": {"urgent": 0.5}}, ValueError, "unknown class 'urgent'"),
        ({"shed_thresholds": {"sheddable": 0.0}}, ValueError, "shed_thresholds['sheddable']"),
        ({"shed_thresholds": {"sheddable": 1.5}}, ValueError, "shed_thresholds['sheddable']"),
        ({"shed_thresholds": [("sheddable", 0.5)]}, TypeError, "shed_thresholds must be"),
        ({"flow_queue_limit": 0}, ValueError, "flow_queue_limit"),
        ({"burst_window": -0.1}, ValueError, "burst_window"),
        ({"burst_window": "soon"}, TypeError, "burst_window"),
    ],
)
def test_bad_class_configuration_names_the_parameter(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        Throttler(max_concurrency=1, **options)
    assert message in str(info.value)


async def test_an_unknown_class_is_a_value_error_naming_it_and_takes_nothing() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=1)
    calls = [
        lambda: throttler.acquire(priority="urgent"),
        lambda: throttler.try_acquire(priority="urgent"),
        lambda: throttler.admit(priority="urgent"),
        lambda: throttler.shed_threshold_of("urgent"),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="'urgent'"):
            call()
    with pytest.raises(ValueError, match="'urgent'"):
        await throttler.acquire_async(priority="urgent")
    stats = throttler.stats()
    assert (
        stats.in_flight,
        stats.queued,
        stats.admitted_total,
        sum(stats.shed_total.values()),
    ) == (
        0,
        0,
        0,
        0,
    )


# -- the waited permit keeps its deadline ---------------------------------------------------------


def test_a_permit_granted_after_waiting_keeps_the_deadline() -> None:
    clock = Clock()
    throttler = Throttler(max_concurrency=1, max_queue=1, clock=clock)
    holder = throttler.acquire()
    decision = throttler.admit(deadline=clock.now + 30)
    assert isinstance(decision, Waiting)
    clock.advance(1)
    holder.release()
    permit = decision.wait()
    assert permit.deadline == clock.now + 29
    assert permit.remaining() == 29


# -- the middleware: classify, header, trusted peers ----------------------------------------------


def classify_by_path(request: Request) -> Classification:
    if request.path.startswith(("/health", "/checkout")):
        return Classification("critical", flow=request.headers.get("x-api-key"))
    if request.path.startswith("/prefetch"):
        return Classification("sheddable", flow=request.headers.get("x-api-key"))
    if request.path == "/bogus":
        return Classification("urgent")  # not a class of the throttler
    return Classification(flow=request.headers.get("x-api-key"))


async def echo_class(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers with the class its permit was granted in."""
    body = scope["shedder.permit"].priority.encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def asgi_client(app: Any, peer: str = "127.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(peer, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def test_classify_picks_the_class_and_an_unknown_one_falls_back_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = LoadSheddingMiddleware(
        echo_class, max_concurrency=4, classify=classify_by_path, health_path="/health/load"
    )
    async with asgi_client(app) as client:
        paths = ("/checkout", "/search", "/prefetch")
        got = {path: (await client.get(path)).text for path in paths}
        assert got == {"/checkout": "critical", "/search": "default", "/prefetch": "sheddable"}
        with caplog.at_level(logging.ERROR, logger="shedder"):
            assert (await client.get("/bogus")).text == "default"
            assert (await client.get("/bogus")).text == "default"
        health = (await client.get("/health/load")).json()
    errors = [r for r in caplog.records if "unknown priority 'urgent'" in r.getMessage()]
    assert len(errors) == 1
    assert health["priorities"]["critical"]["admitted_total"] == 1
    assert health["priorities"]["default"]["admitted_total"] == 3
    assert health["priorities"]["sheddable"]["admitted_total"] == 1


@pytest.mark.parametrize(
    ("peer", "value", "expected"),
    [
        ("127.0.0.1", "critical", "critical"),
        ("127.0.0.1", "sheddable", "sheddable"),
        ("10.1.2.3", "critical", "critical"),  # inside a trusted network
        ("127.0.0.1", "Critical", "default"),  # class names are exact
        ("127.0.0.1", "urgent", "default"),
        ("127.0.0.1", "crit\u00e9cal", "default"),
        ("127.0.0.1", "", "default"),
        ("192.0.2.7", "critical", "default"),  # an untrusted peer cannot raise itself
        ("not-an-address", "critical", "default"),
    ],
)
async def test_priority_header_is_honoured_only_from_trusted_peers(
    peer: str, value: str, expected: str
) -> None:
    app = LoadSheddingMiddleware(
        echo_class,
        max_concurrency=4,
        priority_header="X-Priority",
        trusted_peers=("127.0.0.1", "10.0.0.0/8"),
    )
    async with asgi_client(app, peer) as client:
        response = await client.get("/", headers={"x-priority": value.encode("latin-1")})
    assert (response.status_code, response.text) == (200, expected)


async def test_classify_wins_over_the_header_unless_it_names_no_class() -> None:
    def only_flows(request: Request) -> Classification | None:
        if request.path == "/none":
            return None
        if request.path == "/flow":
            return Classification(flow="tenant")
        return Classification("sheddable")

    app = LoadSheddingMiddleware(
        echo_class,
        max_concurrency=4,
        classify=only_flows,
        priority_header="x-priority",
        trusted_peers=("127.0.0.1",),
    )
    headers = {"x-priority": "critical"}
    async with asgi_client(app) as client:
        assert (await client.get("/class", headers=headers)).text == "sheddable"
        assert (await client.get("/flow", headers=headers)).text == "critical"
        assert (await client.get("/none", headers=headers)).text == "critical"


def test_bad_gate_configuration_names_the_parameter() -> None:
    with pytest.raises(TypeError, match="classify"):
        LoadSheddingMiddleware(echo_class, max_concurrency=1, classify="critical")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="priority_header"):
        LoadSheddingMiddleware(echo_class, max_concurrency=1, priority_header="")
    with pytest.raises(ValueError, match="trusted_peers"):
        LoadSheddingMiddleware(echo_class, max_concurrency=1, trusted_peers=("gateway",))
    with pytest.raises(TypeError, match="trusted_peers"):
        LoadSheddingMiddleware(echo_class, max_concurrency=1, trusted_peers="127.0.0.1")


# -- stress: threads and tasks, random classes, flows and cancellations ---------------------------


@dataclass
class Tally(ThrottlerListener):
    lock: threading.Lock = field(default_factory=threading.Lock)
    admitted: dict[str, int] = field(default_factory=dict)
    shed: dict[str, int] = field(default_factory=dict)
    cancelled: int = 0
    released: int = 0
    peak_in_flight: int = 0
    peak_queued: int = 0

    def on_queue(self, throttler: Throttler, priority: str) -> None:
        with self.lock:
            self.peak_queued = max(self.peak_queued, throttler.queued)

    def on_admit(self, throttler: Throttler, waited: float, priority: str) -> None:
        with self.lock:
            self.admitted[priority] = self.admitted.get(priority, 0) + 1
            self.peak_in_flight = max(self.peak_in_flight, throttler.in_flight)

    def on_shed(self, throttler: Throttler, reason: str, waited: float, priority: str) -> None:
        with self.lock:
            self.shed[priority] = self.shed.get(priority, 0) + 1

    def on_cancel(self, throttler: Throttler, waited: float) -> None:
        with self.lock:
            self.cancelled += 1

    def on_release(self, throttler: Throttler, held: float) -> None:
        with self.lock:
            self.released += 1


def check_balanced(throttler: Throttler, tally: Tally, attempts: int) -> None:
    stats = throttler.stats()
    assert (stats.in_flight, stats.queued) == (0, 0)
    assert all(n == 0 for n in stats.queued_by_priority.values())
    assert tally.peak_in_flight <= throttler.max_concurrency
    assert tally.peak_queued <= throttler._house <= throttler.max_queue * len(throttler.priorities)
    admitted = sum(tally.admitted.values())
    assert admitted == tally.released == stats.admitted_total
    assert admitted + sum(tally.shed.values()) + tally.cancelled == attempts
    assert dict(stats.admitted_by_priority) == {
        p: tally.admitted.get(p, 0) for p in throttler.priorities
    }
    assert {p: sum(s.values()) for p, s in stats.shed_by_priority.items()} == {
        p: tally.shed.get(p, 0) for p in throttler.priorities
    }
    assert stats.cancelled_total == tally.cancelled
    # Nothing of the flows stays behind once the queue is empty and every slot is back: no
    # waiter, no slot counted against a flow's places (fairness evictions give back exactly).
    lines = throttler._queue._classes
    assert all(not (line.flows or line.order or line.held or line.heap) for line in lines)
    assert not throttler._flowed


CLASSES = [None, "critical", "default", "sheddable"]
stress_configs = st.fixed_dictionaries(
    {
        "max_concurrency": st.integers(1, 3),
        "max_queue": st.integers(0, 6),
        "queue_timeout": st.sampled_from([0.0, 0.002, 0.02]),
        "shed_threshold": st.sampled_from([0.6, 1.0]),
        "queue_discipline": st.sampled_from(["fifo", "lifo", "codel"]),
        "flow_queue_limit": st.sampled_from([None, 1, 2]),
    }
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=stress_configs,
    plan=st.lists(
        st.tuples(
            st.sampled_from(CLASSES),
            st.sampled_from([None, "a", "b", "c"]),  # flow
            st.sampled_from([0.0, 0.001, 0.003]),  # hold time
            st.sampled_from([None, 0.0, 0.0005, 0.002]),  # cancel after (None: never)
        ),
        min_size=1,
        max_size=40,
    ),
)
def test_tasks_with_random_classes_flows_and_cancellations(
    config: dict[str, Any], plan: list[tuple[str | None, str | None, float, float | None]]
) -> None:
    asyncio.run(_tasks_run(config, plan))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=stress_configs, seed=st.integers(0, 2**32 - 1))
def test_tasks_with_a_flood_and_quiet_flows(config: dict[str, Any], seed: int) -> None:
    """One flow crowds the others, so quiet flows keep taking its places (its waiters refused
    for their arrivals), among cancellations: still no slot lost or doubled. The plan comes
    from a seed: hypothesis's own lists shrink towards no class and no flow."""
    rng = random.Random(seed)
    plan = [
        (
            rng.choice([None, None, None, "critical", "sheddable"]),
            rng.choice(["flood"] * 4 + ["quiet", "other", None]),
            rng.choice([0.0, 0.001, 0.003]),
            rng.choice([None, None, 0.0, 0.0005, 0.002]),
        )
        for _ in range(rng.randrange(20, 80))
    ]
    asyncio.run(_tasks_run(config, plan))


async def _tasks_run(
    config: dict[str, Any], plan: list[tuple[str | None, str | None, float, float | None]]
) -> None:
    throttler = Throttler(**config)
    tally = Tally()
    throttler.add_listener(tally)
    occupancy = Occupancy()
    arrived = 0
    classes: list[tuple[str, str]] = []  # (class decided, class asked for)

    async def request(priority: str | None, flow: str | None, hold: float) -> None:
        nonlocal arrived
        await asyncio.sleep(0)
        arrived += 1  # no await between this and the decision inside acquire_async
        try:
            permit = await throttler.acquire_async(priority=priority, flow=flow)
        except Overloaded as refusal:
            classes.append((refusal.priority, priority or "default"))
            return
        with permit, occupancy:
            classes.append((permit.priority, priority or "default"))
            await asyncio.sleep(hold)

    tasks = [asyncio.create_task(request(p, f, h)) for p, f, h, _ in plan]
    cancellers = [
        asyncio.get_running_loop().call_later(after, task.cancel)
        for task, (*_, after) in zip(tasks, plan, strict=True)
        if after is not None
    ]
    await asyncio.gather(*tasks, return_exceptions=True)
    for handle in cancellers:
        handle.cancel()
    assert occupancy.peak <= throttler.max_concurrency
    assert all(got == asked for got, asked in classes)
    check_balanced(throttler, tally, arrived)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=stress_configs, seed=st.integers(0, 2**32 - 1))
def test_threads_and_tasks_with_random_classes_and_flows(config: dict[str, Any], seed: int) -> None:
    """Threads and tasks on one loop share the throttler; some tasks are cancelled."""
    threads_and_tasks(config, seed, CLASSES, [None, "a", "b"])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=stress_configs, seed=st.integers(0, 2**32 - 1))
def test_threads_and_tasks_with_a_flood_and_quiet_flows(config: dict[str, Any], seed: int) -> None:
    """As above with one flow crowding the others, so that quiet flows keep taking the flood's
    places (a waiter refused for an arrival): still no slot lost or doubled."""
    threads_and_tasks(config, seed, [None], ["flood"] * 4 + ["quiet", "other", None])


def threads_and_tasks(
    config: dict[str, Any], seed: int, classes: list[str | None], flows: list[str | None]
) -> None:
    throttler = Throttler(**config)
    tally = Tally()
    throttler.add_listener(tally)
    occupancy = Occupancy()
    rng = random.Random(seed)
    rounds = 10
    plans = [
        [(rng.choice(CLASSES), rng.choice(flows), rng.choice([0.0, 0.001])) for _ in range(rounds)]
        for _ in range(6)
    ]
    attempts = 0
    attempts_lock = threading.Lock()
    start = threading.Barrier(4)

    def count() -> None:
        nonlocal attempts
        with attempts_lock:
            attempts += 1

    async def counted(priority: str | None, flow: str | None) -> Permit:
        count()  # no await between this and the decision: a task cancelled earlier made none
        return await throttler.acquire_async(priority=priority, flow=flow)

    def thread_worker(plan: list[tuple[str | None, str | None, float]]) -> None:
        start.wait()
        for priority, flow, hold in plan:
            count()
            try:
                with throttler.acquire(priority=priority, flow=flow), occupancy:
                    time.sleep(hold)
            except Overloaded:
                pass

    async def task_worker(plan: list[tuple[str | None, str | None, float]], seed: int) -> None:
        cancel = random.Random(seed)
        for priority, flow, hold in plan:
            attempt = asyncio.ensure_future(counted(priority, flow))
            if cancel.random() < 0.3:
                asyncio.get_running_loop().call_later(0.0005, attempt.cancel)
            try:
                permit = await attempt
            except (Overloaded, asyncio.CancelledError):
                continue
            with permit, occupancy:
                await asyncio.sleep(hold)

    def loop_thread() -> None:
        async def main() -> None:
            await asyncio.gather(*(task_worker(plan, i) for i, plan in enumerate(plans[3:])))

        start.wait()
        asyncio.run(main())

    workers = [threading.Thread(target=thread_worker, args=(plan,)) for plan in plans[:3]]
    workers.append(threading.Thread(target=loop_thread))
    run_to_end(workers, 30)
    assert occupancy.peak <= throttler.max_concurrency
    check_balanced(throttler, tally, attempts)
