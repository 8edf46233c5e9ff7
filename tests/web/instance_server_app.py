"""The apps the multi-worker instance tests run (``tests/test_instance_server.py``).

``wsgi`` for gunicorn, ``asgi`` for uvicorn: one app-wide throttler (2 slots, no queue, per
worker) and ``/stream?lines=N``, which holds its slot while it streams N lines 0.1 s apart.
With ``INSTANCE_APP_EXTRAS=1`` the health endpoint also reports the throttlers that broke
issue 19: one left at the default name beside the middleware's, and names that are no file
names or that a glob confused. With ``SHEDDER_AGENT_PORT`` each worker runs an agent.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

from shedder import Throttler
from shedder.agent import start_agent
from shedder.asgi import LoadSheddingMiddleware as ASGIMiddleware
from shedder.wsgi import LoadSheddingMiddleware as WSGIMiddleware

__all__ = ["asgi", "wsgi"]

MAX_CONCURRENCY = 2
EXTRAS = os.environ.get("INSTANCE_APP_EXTRAS") == "1"

extras = (
    [
        Throttler(max_concurrency=2),  # name="default", as the middleware's own
        Throttler(max_concurrency=2, name="api/v1"),
        Throttler(max_concurrency=2, name="api"),
        Throttler(max_concurrency=3, name="api.v2"),
    ]
    if EXTRAS
    else []
)
options: dict[str, Any] = {
    "max_concurrency": MAX_CONCURRENCY,
    "max_queue": 0,
    "exempt": ["/static/"],
    "health_throttlers": extras,
}


def _lines(query: str) -> int:
    return int(query.partition("lines=")[2] or 1)


def _wsgi_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    start_response("200 OK", [("content-type", "text/plain")])
    if environ.get("PATH_INFO") != "/stream":
        return [b"ok"]

    def stream(lines: int) -> Iterator[bytes]:
        for number in range(lines):
            yield f"line {number}\n".encode()
            time.sleep(0.1)

    return stream(_lines(environ.get("QUERY_STRING", "")))


async def _asgi_app(scope: Any, receive: Any, send: Any) -> None:
    headers = [(b"content-type", b"text/plain")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    if scope["path"] != "/stream":
        await send({"type": "http.response.body", "body": b"ok"})
        return
    for number in range(_lines(scope["query_string"].decode())):
        await send({"type": "http.response.body", "body": b"line %d\n" % number, "more_body": True})
        await asyncio.sleep(0.1)
    await send({"type": "http.response.body", "body": b""})


wsgi = WSGIMiddleware(_wsgi_app, **options)
asgi = ASGIMiddleware(_asgi_app, **options)

if os.environ.get("SHEDDER_AGENT_PORT"):
    agent = start_agent([wsgi.throttler, *extras], port=int(os.environ["SHEDDER_AGENT_PORT"]))
