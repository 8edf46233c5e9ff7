"""examples/flask_app classifies as its docstring promises (in process, Flask's test client
through the WSGI middleware; tests/test_wsgi_server.py runs it under gunicorn)."""

from __future__ import annotations

import threading
from typing import Any

from examples.flask_app.app import app

from shedder import Throttler, ThrottlerListener, Waiting
from shedder.wsgi import LoadSheddingMiddleware


def app_throttler() -> Throttler:
    middleware = app.wsgi_app
    assert isinstance(middleware, LoadSheddingMiddleware)
    return middleware.throttler


# buffered=True: the test client reads and closes each response, which releases its slot.


def test_example_classes_by_route() -> None:
    client = app.test_client()
    got = {
        path: client.get(path, headers={"x-api-key": "tenant-1"}, buffered=True).get_json()[
            "priority"
        ]
        for path in ("/checkout", "/healthz", "/search?q=shoes", "/prefetch", "/export")
    }
    assert got == {
        "/checkout": "critical",
        "/healthz": "critical",
        "/search?q=shoes": "default",
        "/prefetch": "sheddable",
        "/export": "sheddable",
    }
    health = client.get("/health/load", buffered=True).get_json()
    assert health["priorities"]["sheddable"]["admitted_total"] >= 2
    assert (app_throttler().in_flight, app_throttler().queued) == (0, 0)


class CriticalQueued(ThrottlerListener):
    def __init__(self) -> None:
        self.queued = threading.Event()

    def on_queue(self, throttler: Throttler, priority: str) -> None:
        if priority == "critical":
            self.queued.set()


def test_example_busy_app_refuses_prefetch_and_serves_checkout_first() -> None:
    throttler = app_throttler()
    running = [throttler.acquire() for _ in range(throttler.max_concurrency)]
    # Default-class waiters fill the house to three quarters: sheddable's shed point.
    capacity = throttler.max_concurrency + throttler.max_queue
    waiting = [throttler.admit() for _ in range(capacity * 3 // 4 - len(running))]
    assert waiting
    assert all(isinstance(w, Waiting) for w in waiting)
    watch = CriticalQueued()
    throttler.add_listener(watch)
    results: list[Any] = []
    try:
        client = app.test_client()
        prefetch = client.get("/prefetch", buffered=True)
        assert prefetch.status_code == 503
        assert prefetch.get_json()["reason"] == "overloaded"
        checkout = threading.Thread(
            target=lambda: results.append(client.post("/checkout", buffered=True))
        )
        checkout.start()
        assert watch.queued.wait(10)
        running.pop().release()  # one slot frees: the checkout, last to arrive, gets it
        checkout.join(10)
        assert results[0].get_json() == {"order": "placed", "priority": "critical"}
    finally:
        throttler.remove_listener(watch)
        for w in waiting:
            assert isinstance(w, Waiting)
            w.cancel()
        for permit in running:
            permit.release()
    assert (throttler.in_flight, throttler.queued) == (0, 0)
