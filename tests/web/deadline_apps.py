"""The apps tests/test_deadlines.py runs under real servers (uvicorn and gunicorn).

- ``create_back()`` (uvicorn, factory): ``GET /remaining`` answers what the app sees of the
  request's deadline: ``scope["shedder.deadline"]`` and ``permit.remaining()``, as seconds
  left, and the deadline header that came in.
- ``create_front()`` (uvicorn, factory): ``GET /relay?to=URL&sleep=S`` sleeps S seconds, then
  calls URL with shedder's client, which takes the budget from this request's deadline and
  sends what is left in ``x-envoy-expected-rq-timeout-ms``.
- ``wsgi_app`` (gunicorn): one slot; ``/hold`` takes it until ``/release`` (exempt) is called;
  ``/work`` records the time left it saw; ``/seen`` (exempt) lists what ``/work`` saw.

Loaded as a top-level module by uvicorn (``deadline_apps``) and as ``tests.web.deadline_apps``
by gunicorn: no relative imports.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from shedder.asgi import LoadSheddingMiddleware as ASGIMiddleware
from shedder.wsgi import LoadSheddingMiddleware as WSGIMiddleware

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def _json(send: Send, payload: Any, status: int = 200) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def create_back() -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        deadline = scope.get("shedder.deadline")
        await _json(
            send,
            {
                "remaining": None if deadline is None else deadline - time.monotonic(),
                "permit_remaining": scope["shedder.permit"].remaining(),
                "header": _header(scope, b"x-envoy-expected-rq-timeout-ms"),
            },
        )

    return ASGIMiddleware(app, max_concurrency=4, name="back")


def create_front() -> Any:
    from urllib.parse import parse_qs

    from shedder.client import AsyncBackpressureAwareClient, RetryPolicy

    policy = RetryPolicy(deadline_header="x-envoy-expected-rq-timeout-ms")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        query = parse_qs(scope["query_string"].decode())
        await asyncio.sleep(float(query["sleep"][0]))
        # No deadline_scope here: the middleware set this request's deadline for the client.
        async with AsyncBackpressureAwareClient(policy=policy) as client:
            downstream = (await client.get(query["to"][0])).json()
        await _json(send, {"downstream": downstream})

    return ASGIMiddleware(app, max_concurrency=4, name="front")


# --- WSGI, for gunicorn ------------------------------------------------------------------------

_release = threading.Event()
_seen: list[float | None] = []
_lock = threading.Lock()


def _wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    if path == "/hold":
        _release.wait(10)
    elif path == "/release":
        _release.set()
    elif path == "/work":
        with _lock:
            _seen.append(environ["shedder.permit"].remaining())
    elif path == "/seen":
        with _lock:
            body = json.dumps({"seen": _seen, "deadline": "shedder.deadline" in environ}).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


wsgi_app = WSGIMiddleware(
    _wsgi,
    max_concurrency=1,
    max_queue=4,
    queue_timeout=10.0,
    exempt=["/release", "/seen"],
    name="gunicorn-deadlines",
)
