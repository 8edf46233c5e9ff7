"""The apps tests/test_server_matrix.py runs under every common ASGI and WSGI server.

One slot and no queue: ``/hold`` takes the slot until ``/release`` (exempt) opens its gate, so
the test knows exactly when the next request must be refused. No framework: the middlewares
alone, so a failure points at shedder or the server, nothing between.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from shedder.asgi import LoadSheddingMiddleware as ASGIMiddleware
from shedder.wsgi import LoadSheddingMiddleware as WSGIMiddleware

OPTIONS: dict[str, Any] = {"max_concurrency": 1, "max_queue": 0, "exempt": ["/release"]}

_async_gate: asyncio.Event | None = None  # created on the server's loop, at first use


async def _asgi(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[Any]],
    send: Callable[[Any], Awaitable[None]],
) -> None:
    global _async_gate
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if _async_gate is None:
        _async_gate = asyncio.Event()
    if scope["path"] == "/release":
        _async_gate.set()
    elif scope["path"] == "/hold":
        await _async_gate.wait()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"done"})


asgi_app = ASGIMiddleware(_asgi, **OPTIONS)

_gate = threading.Event()


def _wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO")
    if path == "/release":
        _gate.set()
    elif path == "/hold":
        _gate.wait(timeout=30)
    start_response("200 OK", [("content-type", "text/plain")])
    return [b"done"]


wsgi_app = WSGIMiddleware(_wsgi, **OPTIONS)
