"""The app of the end-to-end client tests, served by uvicorn
(``tests.support.client_server:create_shedding_app``, a factory).

``create_shedding_app`` is a small Starlette app that sheds on demand and records when each
request arrived and when the client was told it might come back.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

# --- the shedding app ------------------------------------------------------------------------


def create_shedding_app() -> Any:
    """A Starlette app that refuses on demand and keeps a log of arrivals per key.

    - ``GET /shed/{key}?first=N&retry_after=V``: the first N requests for ``key`` get
      ``503`` with ``Retry-After: V`` (``V = "date:S"`` sends an HTTP-date S seconds ahead),
      later ones ``200 {"answer": 42}``.
    - ``GET /hold?seconds=S``: takes the only slot of a 1-slot, no-queue ``Throttler`` and
      streams ``admitted`` at once, then holds the slot S seconds before finishing.
    - ``GET /work/{key}``: needs that slot; refused with shedder's own 503 while it is held.
    - ``GET /arrivals/{key}``: ``[{"at", "not_before", "status"}]``, wall-clock seconds;
      ``not_before`` is when the 503 said the client might come back (None on success).
    - ``GET /hop/{key}/{n}?retry_after=V``: the first request to each hop is refused with
      ``503`` + ``Retry-After: V``, the next redirected (307) to hop ``n + 1``: a chain without
      end, each hop shedding once.
    - ``GET /loop/{key}?retry_after=V``: ``503`` + ``Retry-After: V`` and a 307 to itself, in
      turn, forever.
    - ``GET /relay?to=URL``: calls ``URL`` with a ``BackpressureAwareClient`` inside a
      ``deadline_scope`` set from its own ``x-deadline`` header (seconds), sending the budget
      on in ``x-deadline``; answers ``{"received": <its header>, "downstream": <URL's JSON>}``.
    - ``GET /deadline``: ``{"received": <the x-deadline header>}``.
    """
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    from shedder import Overloaded, Throttler
    from shedder._web.http import shed_response

    arrivals: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
    throttler = Throttler(max_concurrency=1, max_queue=0, retry_after=1, name="client-e2e")

    def record(key: str, at: float, status: int, not_before: float | None) -> None:
        arrivals[key].append({"at": at, "not_before": not_before, "status": status})

    async def shed(request: Request) -> Response:
        at = time.time()
        key = request.path_params["key"]
        if len(arrivals[key]) < int(request.query_params.get("first", "2")):
            value = request.query_params.get("retry_after", "1")
            if value.startswith("date:"):
                # HTTP-dates have whole seconds: the client may come back at that second.
                not_before = float(math.floor(at) + int(value[5:]))
                value = email.utils.formatdate(not_before, usegmt=True)
            else:
                not_before = at + int(value)
            record(key, at, 503, not_before)
            return JSONResponse({"error": "overloaded"}, 503, headers={"Retry-After": value})
        record(key, at, 200, None)
        return JSONResponse({"answer": 42})

    async def hold(request: Request) -> Response:
        permit = await throttler.acquire_async()
        seconds = float(request.query_params.get("seconds", "1"))

        async def body() -> AsyncIterator[bytes]:
            try:
                yield b"admitted\n"
                await asyncio.sleep(seconds)
                yield b"done\n"
            finally:
                permit.release()

        return StreamingResponse(body(), media_type="text/plain")

    async def work(request: Request) -> Response:
        at = time.time()
        key = request.path_params["key"]
        try:
            permit = await throttler.acquire_async()
        except Overloaded as exc:
            refusal = shed_response(exc)
            record(key, at, refusal.status, at + exc.retry_after)
            return Response(refusal.body, refusal.status, headers=dict(refusal.headers))
        try:
            record(key, at, 200, None)
            return JSONResponse({"answer": 42})
        finally:
            permit.release()

    async def log(request: Request) -> Response:
        return JSONResponse(arrivals[request.path_params["key"]])

    def shed_once_then(request: Request, key: str, location: str) -> Response:
        at = time.time()
        value = request.query_params.get("retry_after", "1")
        if len(arrivals[key]) % 2 == 0:
            record(key, at, 503, at + int(value))
            return JSONResponse({"error": "overloaded"}, 503, headers={"Retry-After": value})
        record(key, at, 307, None)
        return Response(status_code=307, headers={"Location": f"{location}?{request.url.query}"})

    async def hop(request: Request) -> Response:
        key, n = request.path_params["key"], int(request.path_params["n"])
        arrivals[key].append({"hop": n})  # the whole chain's log, for the test
        return shed_once_then(request, f"{key}/{n}", f"/hop/{key}/{n + 1}")

    async def loop(request: Request) -> Response:
        key = request.path_params["key"]
        return shed_once_then(request, key, f"/loop/{key}")

    def relay(request: Request) -> Response:
        # A sync endpoint: it runs in a worker thread, as a WSGI app's handler would.
        from shedder.client import BackpressureAwareClient, RetryPolicy, deadline_scope

        received = request.headers["x-deadline"]
        policy = RetryPolicy(deadline_header="x-deadline")
        with (
            deadline_scope(time.monotonic() + float(received)),
            BackpressureAwareClient(policy=policy) as client,
        ):
            downstream = client.get(request.query_params["to"]).json()
        return JSONResponse({"received": received, "downstream": downstream})

    async def deadline(request: Request) -> Response:
        return JSONResponse({"received": request.headers.get("x-deadline")})

    return Starlette(
        routes=[
            Route("/shed/{key}", shed),
            Route("/hold", hold),
            Route("/work/{key}", work),
            Route("/arrivals/{key}", log),
            Route("/hop/{key}/{n}", hop),
            Route("/loop/{key}", loop),
            Route("/relay", relay),
            Route("/deadline", deadline),
        ]
    )
