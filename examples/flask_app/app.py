"""A small Flask service protected by shedder, for gunicorn's gthread worker.

Run from the repository root (with shedder installed, or ``PYTHONPATH=src``)::

    gunicorn -k gthread --threads 32 examples.flask_app.app:app

Routes:
    GET /                  cheap: answers at once
    GET|POST /checkout     critical: served first, refused last
    GET /healthz           critical: a deep health check through the app
    GET /search?q=...      default class
    GET /prefetch          sheddable: refused first under load
    GET /export            sheddable: a 50 ms batch export
    GET /report            heavy: 200 ms of simulated work, at most 2 at a time (own throttler)
    GET /stream?lines=N    streams N lines, 100 ms apart; holds its slot until the last one
    GET /health/load       load report for load balancers (200 ok / 503 shedding)
    GET /metrics           Prometheus exposition

Sizing: the app-wide throttler admits 16 requests and queues 8 more. Each of those holds one
of gunicorn's threads (waiting happens on the worker thread), so ``--threads`` must be at
least 16 + 8, plus a few spare threads so /health/load and /metrics, and the instant 503s,
are answered even when the house is full: hence 32.

Who is refused first: ``classify`` puts the checkout and the deep health check in the
``critical`` class, prefetch and batch exports in ``sheddable`` (refused from three quarters
load, and first to give up a queue place), everything else in ``default``; and it makes each
tenant (the ``X-API-Key`` header) a flow, so tenants' waiting requests are served in turn and
one tenant may hold at most half the queue.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from flask import Flask, Response, request

import shedder
from shedder import Classification, Throttler
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


CRITICAL = ("/checkout", "/healthz")
SHEDDABLE = ("/prefetch", "/export")


def classify(request: shedder.Request) -> Classification:
    """The priority class by route, the flow by tenant: cheap lookups, run on every request."""
    tenant = request.headers.get("x-api-key")
    if request.path.startswith(CRITICAL):
        return Classification("critical", flow=tenant)
    if request.path.startswith(SHEDDABLE):
        return Classification("sheddable", flow=tenant)
    return Classification(flow=tenant)


def served_as() -> str:
    """The class this request's slot was granted in."""
    permit: shedder.Permit = request.environ["shedder.permit"]
    return permit.priority


@app.get("/")
def index() -> dict[str, str]:
    return {"hello": "world"}


@app.route("/checkout", methods=["GET", "POST"])
def checkout() -> dict[str, str]:
    time.sleep(0.01)  # stands in for a payment call
    return {"order": "placed", "priority": served_as()}


@app.get("/healthz")
def healthz() -> dict[str, str]:
    # A deep check (database, cache) that goes through the app: critical, so a busy instance
    # is not taken out of rotation for shedding its own health checks.
    return {"status": "ok", "priority": served_as()}


@app.get("/search")
def search() -> dict[str, object]:
    query = request.args.get("q", "")
    return {"results": [query] if query else [], "priority": served_as()}


@app.get("/prefetch")
def prefetch() -> dict[str, object]:
    return {"prefetched": True, "priority": served_as()}


@app.get("/export")
def export() -> dict[str, str]:
    time.sleep(0.05)  # stands in for a batch export
    return {"export": "done", "priority": served_as()}


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
    classify=classify,
    # Prefetch and exports stop queueing once the house is three quarters full.
    shed_thresholds={"sheddable": 0.75},
    health_throttlers=[report_throttler],  # /health/load reports both throttlers
    metrics_path="/metrics",
)
