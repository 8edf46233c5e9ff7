"""Flows: waiters of different flows (tenants, API keys) in one class are served in turn, a flow
holds at most ``flow_queue_limit`` places, and the flow table never outgrows the queue.

Same single-thread technique as tests/test_priorities.py: arrivals are queued with ``admit()``
on a deterministic clock and each release grants exactly one waiter.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from shedder import Classification, Overloaded, Request, Throttler, ThrottlerListener, Waiting
from shedder._core.waitqueue import WaiterQueue
from shedder.asgi import LoadSheddingMiddleware

from .test_priorities import Clock, asgi_client, outcome, queue, refused, serve_all


def flow_sizes(throttler: Throttler) -> list[int]:
    """How many flows each class's line knows of (internal: the table must stay bounded)."""
    return [len(line.flows) for line in throttler._queue._classes]


def test_flows_of_one_class_are_served_in_turn() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=20, flow_queue_limit=10, clock=Clock())
    holder = throttler.acquire()
    waiting = {f"a{i}": queue(throttler, flow="a") for i in range(1, 7)}
    waiting |= {"b1": queue(throttler, flow="b"), "b2": queue(throttler, flow="b")}
    waiting["c1"] = queue(throttler, flow="c")
    assert flow_sizes(throttler) == [0, 3, 0]
    # Round-robin: one from each flow with waiters, in the order the flows arrived.
    assert serve_all(holder, waiting) == ["a1", "b1", "c1", "a2", "b2", "a3", "a4", "a5", "a6"]
    assert flow_sizes(throttler) == [0, 0, 0]


def test_classes_come_before_flows() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=20, clock=Clock())
    holder = throttler.acquire()
    waiting = {
        "a-s": queue(throttler, "sheddable", flow="a"),
        "a-d1": queue(throttler, flow="a"),
        "a-d2": queue(throttler, flow="a"),
        "b-d1": queue(throttler, flow="b"),
        "b-c1": queue(throttler, "critical", flow="b"),
        "a-c1": queue(throttler, "critical", flow="a"),
        "b-c2": queue(throttler, "critical", flow="b"),
    }
    assert serve_all(holder, waiting) == ["b-c1", "a-c1", "b-c2", "a-d1", "b-d1", "a-d2", "a-s"]


def test_unflowed_waiters_share_one_line() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=20, flow_queue_limit=1, clock=Clock())
    holder = throttler.acquire()
    # No flow: no flow limit either, and together they take one turn, like one flow.
    waiting = {f"n{i}": queue(throttler) for i in range(1, 4)}
    waiting["t1"] = queue(throttler, flow="tenant")
    assert serve_all(holder, waiting) == ["n1", "t1", "n2", "n3"]


def test_lifo_serves_each_flow_newest_first_still_in_turn() -> None:
    throttler = Throttler(
        max_concurrency=1, max_queue=10, queue_discipline="lifo", flow_queue_limit=5, clock=Clock()
    )
    holder = throttler.acquire()
    waiting = {f"a{i}": queue(throttler, flow="a") for i in range(1, 4)}
    waiting |= {f"b{i}": queue(throttler, flow="b") for i in range(1, 3)}
    order = serve_all(holder, waiting)
    assert [w for w in order if w[0] == "a"] == ["a3", "a2", "a1"]
    assert [w for w in order if w[0] == "b"] == ["b2", "b1"]
    assert order[0][0] != order[1][0] != order[2][0]  # in turn while both have waiters


@pytest.mark.parametrize("discipline", ["lifo", "codel"])
def test_newest_first_holds_across_flows_too(discipline: str) -> None:
    clock = Clock()
    throttler = Throttler(
        max_concurrency=1,
        max_queue=10,
        queue_discipline=discipline,
        codel_target=1.0,
        codel_interval=0.1,
        clock=clock,
    )
    holder = throttler.acquire()
    waiting = {"client0": queue(throttler, flow="client0")}  # CoDel: not empty from now on
    clock.advance(0.2)  # ... so it stands from the next arrival
    waiting |= {f"client{i}": queue(throttler, flow=f"client{i}") for i in range(1, 4)}
    assert throttler.discipline.newest_first
    assert serve_all(holder, waiting) == ["client3", "client2", "client1", "client0"]


def test_a_flow_may_hold_at_most_flow_queue_limit_places_per_class() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=10, flow_queue_limit=2, clock=Clock())
    holder = throttler.acquire()
    waiting = {"a1": queue(throttler, flow="a"), "a2": queue(throttler, flow="a")}
    refusal = refused(throttler, flow="a")
    assert (refusal.reason, refusal.priority) == ("queue_full", "default")
    # Other flows, and the same flow in another class, still have room.
    waiting["b1"] = queue(throttler, flow="b")
    waiting["a-crit"] = queue(throttler, "critical", flow="a")
    assert throttler.stats().shed_by_priority["default"]["queue_full"] == 1
    # Once one of its waiters is served, the flow may queue again.
    holder.release()
    assert outcome(waiting["a-crit"]) == "granted"
    holder = waiting.pop("a-crit").wait()
    holder.release()
    assert outcome(waiting["a1"]) == "granted"
    holder = waiting.pop("a1").wait()
    waiting["a3"] = queue(throttler, flow="a")
    assert serve_all(holder, waiting) == ["b1", "a2", "a3"]


@pytest.mark.parametrize(("max_queue", "limit"), [(2, 1), (5, 3), (8, 4), (64, 32)])
def test_default_flow_queue_limit_is_half_the_queue(max_queue: int, limit: int) -> None:
    throttler = Throttler(max_concurrency=1, max_queue=max_queue, clock=Clock())
    holder = throttler.acquire()
    waiting = [queue(throttler, flow="noisy") for _ in range(limit)]
    assert refused(throttler, flow="noisy").reason == "queue_full"
    waiting.append(queue(throttler, flow="other"))  # the room itself is not full
    for w in waiting:
        w.cancel()
    holder.release()
    assert throttler.stats().cancelled_total == limit + 1


def test_a_noisy_flow_cannot_take_the_whole_queue() -> None:
    # One tenant floods; another sends one request. The flood gets half the room, and the quiet
    # tenant is served after at most one of the flood's waiters.
    throttler = Throttler(max_concurrency=1, max_queue=8, clock=Clock())
    holder = throttler.acquire(flow="noisy")
    noisy = [throttler.admit(flow="noisy") for _ in range(20)]
    queued_noisy = [d for d in noisy if isinstance(d, Waiting)]
    assert len(queued_noisy) == 4
    assert all(d.reason == "queue_full" for d in noisy if isinstance(d, Overloaded))
    quiet = queue(throttler, flow="quiet")
    waiting = {f"noisy{i}": w for i, w in enumerate(queued_noisy)} | {"quiet": quiet}
    assert serve_all(holder, waiting)[:2] == ["noisy0", "quiet"]


def test_flows_that_leave_the_queue_any_way_leave_no_entry() -> None:
    clock = Clock()
    throttler = Throttler(
        max_concurrency=1,
        max_queue=2,
        queue_timeout=0.0,
        shed_thresholds={"sheddable": 1.0},
        clock=clock,
    )
    holder = throttler.acquire()
    cancelled = queue(throttler, flow="cancelled")
    timed_out = queue(throttler, "sheddable", flow="timed out")
    assert flow_sizes(throttler) == [0, 1, 1]
    cancelled.cancel()
    with pytest.raises(Overloaded):
        timed_out.wait()  # queue_timeout=0: times out at once
    assert flow_sizes(throttler) == [0, 0, 0]
    evicted = queue(throttler, "sheddable", flow="evicted")
    served = throttler.admit(flow="served", timeout=5)  # it waits for the holder's slot
    assert isinstance(served, Waiting)
    queue(throttler, "critical", flow="evictor").cancel()  # the room is full: evicts
    assert outcome(evicted) == "queue_full"
    assert flow_sizes(throttler) == [0, 1, 0]
    holder.release()
    served.wait().release()
    assert flow_sizes(throttler) == [0, 0, 0]
    assert throttler.stats().queued == 0


def test_a_million_distinct_flows_leave_nothing_behind_in_the_queue() -> None:
    class Waiter:
        __slots__ = ("flow", "rank", "since")

    waiters = WaiterQueue(3)
    batch = [Waiter() for _ in range(100)]
    largest = 0
    for base in range(0, 1_000_000, len(batch)):
        for offset, waiter in enumerate(batch):
            waiters.push(waiter, offset % 3, ("tenant", base + offset), 0.0)
        largest = max(largest, sum(len(line.flows) for line in waiters._classes))
        for waiter in batch[::2]:  # half leave from the middle (cancelled, timed out)
            assert waiters.remove(waiter)
        while waiters:
            waiters.pop_next(newest_first=base % 200 == 0)
    assert largest == len(batch)  # the table holds the flows that wait, no more
    assert not any(line.flows or line.order for line in waiters._classes)


def test_a_hundred_thousand_tenants_through_the_throttler_leave_nothing_behind() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=50, queue_discipline="lifo")
    holder = throttler.acquire()
    for base in range(0, 100_000, 100):
        # 100 arrivals into 50 places: LIFO refuses the oldest for each one past 50.
        arrivals = [throttler.admit(flow=base + i) for i in range(100)]
        assert all(isinstance(d, Waiting) for d in arrivals)
        assert [outcome(d) for d in arrivals[:50]] == ["queue_full"] * 50
        assert flow_sizes(throttler) == [0, 50, 0]
        survivors = arrivals[50:]
        for waiting in survivors[::2]:
            waiting.cancel()
        left = survivors[1::2]
        while left:
            holder.release()
            granted = [w for w in left if outcome(w) == "granted"]
            assert len(granted) == 1
            left.remove(granted[0])
            holder = granted[0].wait()
    holder.release()
    assert flow_sizes(throttler) == [0, 0, 0]
    stats = throttler.stats()
    assert (stats.in_flight, stats.queued) == (0, 0)
    assert stats.admitted_total == 1 + 25_000
    assert stats.shed_total["queue_full"] == 50_000


def test_the_gate_trust_cache_stays_bounded_over_many_peers() -> None:
    app = LoadSheddingMiddleware(
        _ok, max_concurrency=1, priority_header="x-priority", trusted_peers=("10.0.0.0/8",)
    )
    gate = app._gate
    for n in range(20_000):
        address = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
        assert gate.is_trusted(address)
        assert not gate.is_trusted(f"192.0.{n >> 8 & 255}.{n & 255}")
    assert len(gate._trust_cache) <= 4096


async def _ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


class Changes(ThrottlerListener):
    """Wakes a task after every event of the throttler (on the loop's own thread)."""

    def __init__(self) -> None:
        self.changed = asyncio.Event()
        self.refused: list[str] = []

    def on_queue(self, throttler: Throttler, priority: str) -> None:
        self.changed.set()

    def on_shed(self, throttler: Throttler, reason: str, waited: float, priority: str) -> None:
        self.refused.append(reason)
        self.changed.set()

    async def until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 10)


async def test_per_tenant_fairness_by_api_key_through_the_asgi_middleware() -> None:
    started: list[str] = []
    go = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        started.append(dict(scope["headers"])[b"x-api-key"].decode())
        await go.wait()
        await _ok(scope, receive, send)

    def by_api_key(request: Request) -> Classification:
        return Classification(flow=request.headers.get("x-api-key"))

    throttler = Throttler(max_concurrency=1, max_queue=6)  # a tenant may hold 3 places
    changes = Changes()
    throttler.add_listener(changes)
    middleware = LoadSheddingMiddleware(app, throttler, classify=by_api_key)
    async with asgi_client(middleware) as client:

        def send(key: str) -> asyncio.Task[httpx.Response]:
            return asyncio.create_task(client.get("/", headers={"x-api-key": key}))

        noisy = [send("noisy") for _ in range(6)]
        await changes.until(lambda: throttler.queued == 3 and len(changes.refused) == 2)
        quiet = send("quiet")
        await changes.until(lambda: throttler.queued == 4)
        go.set()
        responses = await asyncio.gather(*noisy, quiet)
    assert sorted(r.status_code for r in responses) == [200] * 5 + [503] * 2
    assert changes.refused == ["queue_full", "queue_full"]
    # The quiet tenant ran after one more of the flood's requests, not after all of them.
    assert started == ["noisy", "noisy", "quiet", "noisy", "noisy"]
