"""The ASGI target: ``uvicorn shedder._demo.asgi_app:app`` (settings from the environment).

``GET /ready`` answers at once (readiness probe); every other path runs one query on a
:class:`~shedder._demo.database.SimulatedDatabase` of ``pool`` connections x ``hold_ms``. A raw
ASGI app rather than a framework one, so that the benchmark measures the server and the
shedding, not routing.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .database import SimulatedDatabase
from .recorder import Recorder
from .settings import AppSettings, throttler_options

__all__ = ["app", "make_app"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_HEADERS = [(b"content-type", b"text/plain"), (b"content-length", b"2")]


def make_app(settings: AppSettings) -> ASGIApp:
    """The bare app, wrapped in shedder's ASGI middleware when ``settings.shedder`` is set."""
    slowdown = settings.factor_at if settings.slowdown else None
    database = SimulatedDatabase(settings.pool, settings.hold_ms / 1000.0, slowdown)
    recorder = Recorder(settings.record) if settings.record else None

    async def bare(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if recorder is not None:
            if path == "/bench/stats":
                body = json.dumps(recorder.report()).encode()
                headers = [(b"content-type", b"application/json")]
                headers.append((b"content-length", str(len(body)).encode()))
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            if path != "/ready":
                recorder.arrived(scope["headers"])
        if path != "/ready":
            await database.query_async()
        await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
        await send({"type": "http.response.body", "body": b"ok"})

    if not settings.shedder:
        return bare
    # Imported here, so the bare variant never loads it; by name, because the options come
    # from JSON and cannot be checked against ThrottlerOptions before run time.
    middleware = importlib.import_module("shedder.asgi").LoadSheddingMiddleware

    options = throttler_options(settings.shedder)
    # The readiness probe is exempt unless the options say otherwise (a cold-start experiment).
    options.setdefault("exempt", ["/ready", "/bench/"])
    shedded = middleware(bare, **options)
    if recorder is not None:
        recorder.watch(shedded.throttler)
    return shedded  # type: ignore[no-any-return]


app = make_app(AppSettings.from_env())
