"""The app the uvicorn tests run (``tests/web/test_asgi_server.py``): slow, streaming, failing.

Routes under ``/control/`` are exempt from throttling and let the tests open the gate the slow
routes wait on and read what ran.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from shedder.asgi import LoadSheddingMiddleware

state: dict[str, object] = {}


def reset() -> None:
    state.update(gate=asyncio.Event(), running=0, max_running=0, started=[])


reset()


def gate() -> asyncio.Event:
    event = state["gate"]
    assert isinstance(event, asyncio.Event)
    return event


async def slow(request: Request) -> Response:
    started = state["started"]
    assert isinstance(started, list)
    started.append(request.query_params.get("id", ""))
    running = int(str(state["running"])) + 1
    state["running"] = running
    state["max_running"] = max(running, int(str(state["max_running"])))
    try:
        await gate().wait()
    finally:
        state["running"] = int(str(state["running"])) - 1
    return PlainTextResponse("slow")


async def stream(request: Request) -> Response:
    async def body() -> AsyncIterator[bytes]:
        yield b"first\n"
        await gate().wait()
        yield b"last\n"

    return StreamingResponse(body(), media_type="text/plain")


async def boom(request: Request) -> Response:
    raise RuntimeError("boom")


async def control(request: Request) -> Response:
    action = request.path_params["action"]
    if action == "open":
        gate().set()
    elif action == "reset":
        gate().set()
        reset()
    return JSONResponse(
        {key: value for key, value in state.items() if key != "gate"} | {"open": gate().is_set()}
    )


app = LoadSheddingMiddleware(
    Starlette(
        routes=[
            Route("/slow", slow),
            Route("/stream", stream),
            Route("/boom", boom),
            Route("/control/{action}", control, methods=["GET", "POST"]),
        ]
    ),
    max_concurrency=2,
    max_queue=2,
    queue_timeout=20,
    exempt=["/control/"],
)
