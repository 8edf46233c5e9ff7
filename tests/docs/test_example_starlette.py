"""examples/starlette_app serves what its docstring promises (in process)."""

from __future__ import annotations

import asyncio

import httpx
from examples.starlette_app.app import app, report_throttler

from shedder import Throttler, ThrottlerListener, Waiting


async def test_example_routes() -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://example") as client:
        index = await client.get("/")
        thumbnail = await client.get("/thumbnail")
        events = await client.get("/events", params={"n": 2})
        health = await client.get("/health/load")
        metrics = await client.get("/metrics")
        report = await client.get("/report")
        with report_throttler.acquire(), report_throttler.acquire():
            # The heavy route's own throttler is full: its request waits 0.5 s, then is shed.
            refused = await client.get("/report")
    assert index.json() == {"hello": "world"}
    assert thumbnail.json() == {"thumbnail": "rendered"}
    assert events.text == "data: event 0\n\ndata: event 1\n\n"
    assert events.headers["content-type"].startswith("text/event-stream")
    assert [t["name"] for t in health.json()["throttlers"]] == ["app", "report", "thumbnail"]
    assert metrics.status_code == 200
    assert report.json() == {"report": "ready"}
    assert refused.status_code == 503
    assert refused.json()["reason"] == "queue_timeout"


async def test_example_classes_by_route() -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://example") as client:
        got = {
            path: (await client.get(path, headers={"x-api-key": "tenant-1"})).json()["priority"]
            for path in ("/checkout", "/healthz", "/search?q=shoes", "/prefetch", "/export")
        }
        health = (await client.get("/health/load")).json()
    assert got == {
        "/checkout": "critical",
        "/healthz": "critical",
        "/search?q=shoes": "default",
        "/prefetch": "sheddable",
        "/export": "sheddable",
    }
    assert health["priorities"]["critical"]["admitted_total"] >= 2


class CriticalQueued(ThrottlerListener):
    def __init__(self) -> None:
        self.queued = asyncio.Event()

    def on_queue(self, throttler: Throttler, priority: str) -> None:
        if priority == "critical":
            self.queued.set()


async def test_example_busy_app_refuses_prefetch_and_serves_checkout_first() -> None:
    throttler = app.throttler
    running = [throttler.acquire() for _ in range(throttler.max_concurrency)]
    # Default-class waiters fill the house to three quarters: sheddable's shed point.
    capacity = throttler.max_concurrency + throttler.max_queue
    waiting = [throttler.admit() for _ in range(capacity * 3 // 4 - len(running))]
    assert all(isinstance(w, Waiting) for w in waiting)
    watch = CriticalQueued()
    throttler.add_listener(watch)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://example") as client:
            prefetch = await client.get("/prefetch")
            assert prefetch.status_code == 503
            assert prefetch.json()["reason"] == "overloaded"
            checkout = asyncio.create_task(client.post("/checkout"))
            await asyncio.wait_for(watch.queued.wait(), 10)
            running.pop().release()  # one slot frees: the checkout, last to arrive, gets it
            response = await checkout
            assert response.json() == {"order": "placed", "priority": "critical"}
            # ... and once it is done, its slot goes to the oldest default waiter.
            assert throttler.stats().queued_by_priority["default"] == len(waiting) - 1
    finally:
        throttler.remove_listener(watch)
        for w in waiting:
            assert isinstance(w, Waiting)
            w.cancel()
        for permit in running:
            permit.release()
    assert (throttler.in_flight, throttler.queued) == (0, 0)
