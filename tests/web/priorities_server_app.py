"""The apps tests/test_priorities_server.py runs under uvicorn (``asgi_app``) and gunicorn
(``wsgi_app``): one slot pair and two queue places, classes from ``classify`` or a header.

``PRIO_MODE`` picks how a request gets its class:

* ``classify`` (default): by path (``/checkout`` critical, ``/prefetch`` sheddable, anything
  else default), flow by the ``x-api-key`` header; the ``x-priority`` header is configured too,
  but trusted only from 192.0.2.1, so from 127.0.0.1 it is ignored.
* ``header``: by the ``x-priority`` header, trusted from 127.0.0.1.

Every throttled route answers with the class its slot was granted in; with ``?wait=1`` it
first records ``?id=`` and waits until ``/control/open?id=`` (or ``/control/open`` for all).
``/control/*`` is not throttled.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from shedder import Classification, Request, Throttler, asgi, wsgi

MODE = os.environ.get("PRIO_MODE", "classify")
MAX_CONCURRENCY = 2
MAX_QUEUE = 2

started: list[str] = []


def classify(request: Request) -> Classification:
    flow = request.headers.get("x-api-key")
    if request.path.startswith("/checkout"):
        return Classification("critical", flow)
    if request.path.startswith("/prefetch"):
        return Classification("sheddable", flow)
    return Classification(flow=flow)


def options() -> dict[str, Any]:
    if MODE == "header":
        return {"priority_header": "x-priority", "trusted_peers": ("127.0.0.1",)}
    return {"classify": classify, "priority_header": "x-priority", "trusted_peers": ("192.0.2.1",)}


def throttler(name: str) -> Throttler:
    return Throttler(MAX_CONCURRENCY, MAX_QUEUE, queue_timeout=10.0, name=name)


def query(raw: bytes | str) -> dict[str, str]:
    text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    return {key: values[-1] for key, values in parse_qs(text).items()}


# -- ASGI ---------------------------------------------------------------------------------------

_opened_all = False
_gates: dict[str, asyncio.Event] = {}


def _gate(label: str) -> asyncio.Event:
    gate = _gates.get(label)
    if gate is None:
        gate = _gates[label] = asyncio.Event()
        if _opened_all:
            gate.set()
    return gate


async def _asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global _opened_all
    if scope["type"] != "http":
        return
    path = scope["path"]
    args = query(scope.get("query_string", b""))
    if path == "/control/open":
        if "id" in args:
            _gate(args["id"]).set()
        else:
            _opened_all = True
            for gate in _gates.values():
                gate.set()
        body = b"open"
    elif path == "/control/reset":
        _opened_all = False
        _gates.clear()
        started.clear()
        body = b"reset"
    elif path == "/control/started":
        body = json.dumps(started).encode()
    else:
        if args.get("wait"):
            label = args.get("id", "")
            started.append(label)
            await _gate(label).wait()
        body = scope["shedder.permit"].priority.encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


asgi_app = asgi.LoadSheddingMiddleware(_asgi, throttler("asgi"), exempt=("/control/",), **options())

# -- WSGI ---------------------------------------------------------------------------------------

_lock = threading.Lock()
_thread_gates: dict[str, threading.Event] = {}
_thread_opened_all = False


def _thread_gate(label: str) -> threading.Event:
    with _lock:
        gate = _thread_gates.get(label)
        if gate is None:
            gate = _thread_gates[label] = threading.Event()
            if _thread_opened_all:
                gate.set()
        return gate


def _wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    global _thread_opened_all
    path = environ["PATH_INFO"]
    args = query(environ.get("QUERY_STRING", ""))
    if path == "/control/open":
        if "id" in args:
            _thread_gate(args["id"]).set()
        else:
            with _lock:
                _thread_opened_all = True
                for gate in _thread_gates.values():
                    gate.set()
        body = b"open"
    elif path == "/control/reset":
        with _lock:
            _thread_opened_all = False
            _thread_gates.clear()
            started.clear()
        body = b"reset"
    elif path == "/control/started":
        with _lock:
            body = json.dumps(started).encode()
    else:
        if args.get("wait"):
            label = args.get("id", "")
            with _lock:
                started.append(label)
            _thread_gate(label).wait(30)
        body = environ["shedder.permit"].priority.encode()
    start_response("200 OK", [("content-length", str(len(body)))])
    return [body]


wsgi_app = wsgi.LoadSheddingMiddleware(_wsgi, throttler("wsgi"), exempt=("/control/",), **options())
