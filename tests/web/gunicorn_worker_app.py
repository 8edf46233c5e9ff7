"""The WSGI app tests/test_gunicorn.py serves under ``shedder.gunicorn.ThreadWorker``.

``/hold/<name>`` blocks until ``/open/<name>`` (gates live in this worker process);
``/sleep/<seconds>`` takes that long;
``/echo`` answers what the worker passed in the environ. Sizes come from the environment so
each test picks its own: ``MAX_CONCURRENCY``, ``MAX_QUEUE``, ``QUEUE_TIMEOUT``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from shedder.wsgi import LoadSheddingMiddleware

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

_lock = threading.Lock()
_gates: dict[str, threading.Event] = {}


def _gate(name: str) -> threading.Event:
    with _lock:
        return _gates.setdefault(name, threading.Event())


def _json(start_response: StartResponse, payload: object, status: str = "200 OK") -> list[bytes]:
    body = json.dumps(payload).encode()
    start_response(
        status, [("content-type", "application/json"), ("content-length", str(len(body)))]
    )
    return [body]


def inner(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    if path.startswith("/hold/"):
        _gate(path[len("/hold/") :]).wait(30)
    elif path.startswith("/open/"):
        _gate(path[len("/open/") :]).set()
    elif path.startswith("/sleep/"):
        time.sleep(float(path[len("/sleep/") :]))  # a request that takes this long to serve
    elif path == "/upload":
        environ["wsgi.input"].read()
    permit = environ.get("shedder.permit")
    return _json(
        start_response,
        {
            "path": path,
            "pid": os.getpid(),
            "queued_in_server": environ.get("shedder.queued_in_server"),
            "waited": None if permit is None else permit.waited,
        },
    )


app = LoadSheddingMiddleware(
    inner,
    max_concurrency=int(os.environ.get("MAX_CONCURRENCY", "2")),
    max_queue=int(os.environ.get("MAX_QUEUE", "1")),
    queue_timeout=float(os.environ.get("QUEUE_TIMEOUT", "5")),
    exempt=["/open/"],
    instance_dir=os.environ.get("SHEDDER_INSTANCE_DIR") or None,
)
