"""The app tests/test_asgi_watch_memory.py runs under real uvicorn: one slot, a queue, and
endpoints (exempt from throttling) that report this process's traced memory.

``/hold`` keeps the only slot until ``/release``; ``/upload`` answers the length of the body
it read; ``/mem`` answers ``{"current", "peak", "pulled"}`` (bytes traced by tracemalloc since
start-up, and how many body messages the middleware pulled from the server) and resets the
peak if asked (``/mem?reset``). Tracemalloc runs from import on, so the figures cover the
middleware's watch.
"""

from __future__ import annotations

import asyncio
import json
import tracemalloc
from typing import Any

from shedder.asgi import LoadSheddingMiddleware

tracemalloc.start()

_released = asyncio.Event()
_pulled = [0]


async def _answer(send: Any, status: int, body: bytes) -> None:
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _inner(scope: Any, receive: Any, send: Any) -> None:
    path = scope["path"]
    if path == "/hold":
        await _released.wait()
        await _answer(send, 200, b"held")
    elif path == "/release":
        _released.set()
        await _answer(send, 200, b"released")
    elif path == "/mem":
        current, peak = tracemalloc.get_traced_memory()
        if scope["query_string"] == b"reset":
            tracemalloc.reset_peak()
        report = {"current": current, "peak": peak, "pulled": _pulled[0]}
        await _answer(send, 200, json.dumps(report).encode())
    else:
        scope["test.admitted"] = True  # the outer counter stops here
        length = 0
        while True:
            message = await receive()
            length += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        await _answer(send, 200, str(length).encode())


_shedding = LoadSheddingMiddleware(
    _inner, max_concurrency=1, max_queue=8, queue_timeout=60, exempt=["/mem", "/release"]
)


async def app(scope: Any, receive: Any, send: Any) -> None:
    """Counts the body messages the middleware pulls while an upload waits in the queue."""
    if scope["type"] != "http" or scope["path"] != "/upload":
        await _shedding(scope, receive, send)
        return

    async def counted() -> Any:
        message = await receive()
        if message["type"] == "http.request" and not scope.get("test.admitted"):
            _pulled[0] += 1
        return message

    await _shedding(scope, counted, send)
