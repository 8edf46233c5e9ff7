"""A small Flask service protected by shedder, for gunicorn's gthread worker.

Run from the repository root (with shedder installed, or ``PYTHONPATH=src``)::

    gunicorn -k gthread --threads 32 examples.flask_app.app:app

Routes:
    GET /                  cheap: answers at once
    GET /report            heavy: 200 ms of simulated work, at most 2 at a time (own throttler)
    GET /stream?lines=N    streams N lines, 100 ms apart; holds its slot until the last one
    GET /health/load       load report for load balancers (200 ok / 503 shedding)
    GET /metrics           Prometheus exposition

Sizing: the app-wide throttler admits 16 requests and queues 8 more. Each of those holds one
of gunicorn's threads (waiting happens on the worker thread), so ``--threads`` must be at
least 16 + 8, plus a few spare threads so /health/load and /metrics, and the instant 503s,
are answered even when the house is full: hence 32.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from flask import Flask, Response, request

from shedder import Throttler
from shedder.flask import shed_load
from shedder.wsgi import LoadSheddingMiddleware

APP_CONCURRENCY = 16
APP_QUEUE = 8

app = Flask(__name__)

# The heavy route gets a throttler of its own, far tighter than the app-wide one, so a burst
# of reports cannot take every slot from the cheap routes. Its queue is short and its
# timeout is well under the app's, since a waiting report also holds an app-wide slot.
report_throttler = Throttler(
    max_concurrency=2, max_queue=4, queue_timeout=0.5, retry_after="auto", name="report"
)


@app.get("/")
def index() -> dict[str, str]:
    return {"hello": "world"}


@app.get("/report")
@shed_load(report_throttler)
def report() -> dict[str, str]:
    time.sleep(0.2)  # stands in for a slow query or CPU-heavy rendering
    return {"report": "ready"}


@app.get("/stream")
def stream() -> Response:
    lines = min(int(request.args.get("lines", "10")), 100)

    def generate() -> Iterator[str]:
        for number in range(lines):
            yield f"line {number}\n"
            time.sleep(0.1)

    return Response(generate(), mimetype="text/plain")


app.wsgi_app = LoadSheddingMiddleware(  # type: ignore[method-assign]
    app.wsgi_app,
    max_concurrency=APP_CONCURRENCY,
    max_queue=APP_QUEUE,
    queue_timeout=1.0,
    retry_after=1,
    name="app",
    health_throttlers=[report_throttler],  # /health/load reports both throttlers
    metrics_path="/metrics",
)
