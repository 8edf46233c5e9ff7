"""The example app: see the package docstring for the routes and how to run it.

Sizing: the app-wide middleware admits 32 requests at once and queues 64 more for at most a
second; beyond that, new requests get an immediate 503 with ``Retry-After``. The heavy routes
have throttlers of their own, far tighter, so a burst of reports cannot take every slot from
the cheap route. A request to a heavy route holds an app-wide slot while it waits for its own,
so their queue timeouts are short. ``/thumbnail`` is a sync endpoint: its slot is taken on the
event loop before the call goes to anyio's thread pool (40 threads), and its limit of 4 stays
well under that pool, so an admitted call never waits for a thread.

Who is refused first: ``classify`` puts the checkout and the deep health check in the
``critical`` class, prefetch and batch exports in ``sheddable`` (refused from three quarters
load, and first to give up a queue place), everything else in ``default``; and it makes each
tenant (the ``X-API-Key`` header) a flow, so tenants' waiting requests are served in turn and
one tenant may hold at most half the queue.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

import shedder
from shedder import Classification, Throttler
from shedder.asgi import LoadSheddingMiddleware
from shedder.starlette import shed_load

report_throttler = Throttler(
    max_concurrency=2, max_queue=4, queue_timeout=0.5, retry_after="auto", name="report"
)
thumbnail_throttler = Throttler(max_concurrency=4, max_queue=8, queue_timeout=0.5, name="thumbnail")


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


def served_as(request: Request) -> str:
    """The class the request's slot was granted in."""
    permit: shedder.Permit = request.scope["shedder.permit"]
    return permit.priority


async def index(request: Request) -> JSONResponse:
    return JSONResponse({"hello": "world"})


async def checkout(request: Request) -> JSONResponse:
    await asyncio.sleep(0.01)  # stands in for a payment call
    return JSONResponse({"order": "placed", "priority": served_as(request)})


async def healthz(request: Request) -> JSONResponse:
    # A deep check (database, cache) that goes through the app: critical, so a busy instance
    # is not taken out of rotation for shedding its own health checks.
    return JSONResponse({"status": "ok", "priority": served_as(request)})


async def search(request: Request) -> JSONResponse:
    query = request.query_params.get("q", "")
    return JSONResponse({"results": [query] if query else [], "priority": served_as(request)})


async def prefetch(request: Request) -> JSONResponse:
    return JSONResponse({"prefetched": True, "priority": served_as(request)})


async def export(request: Request) -> JSONResponse:
    await asyncio.sleep(0.05)  # stands in for a batch export
    return JSONResponse({"export": "done", "priority": served_as(request)})


@shed_load(report_throttler)
async def report(request: Request) -> JSONResponse:
    await asyncio.sleep(0.2)  # stands in for a slow query
    return JSONResponse({"report": "ready"})


@shed_load(thumbnail_throttler)
def thumbnail(request: Request) -> JSONResponse:
    time.sleep(0.05)  # stands in for blocking work: image resizing, a sync client
    return JSONResponse({"thumbnail": "rendered"})


async def events(request: Request) -> StreamingResponse:
    count = min(int(request.query_params.get("n", "10")), 100)

    async def stream() -> AsyncIterator[str]:
        for number in range(count):
            yield f"data: event {number}\n\n"
            await asyncio.sleep(0.1)

    return StreamingResponse(stream(), media_type="text/event-stream")


app = LoadSheddingMiddleware(
    Starlette(
        routes=[
            Route("/", index),
            Route("/checkout", checkout, methods=["GET", "POST"]),
            Route("/healthz", healthz),
            Route("/search", search),
            Route("/prefetch", prefetch),
            Route("/export", export),
            Route("/report", report),
            Route("/thumbnail", thumbnail),
            Route("/events", events),
        ]
    ),
    max_concurrency=32,
    max_queue=64,
    queue_timeout=1.0,
    name="app",
    classify=classify,
    # Prefetch and exports stop queueing once the house is three quarters full.
    shed_thresholds={"sheddable": 0.75},
    health_throttlers=[report_throttler, thumbnail_throttler],  # /health/load reports all three
    metrics_path="/metrics",
)
