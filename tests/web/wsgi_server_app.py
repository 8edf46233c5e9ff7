"""The Flask app tests/test_wsgi_server.py runs under a real gunicorn (gthread) worker.

The views count their own concurrency (``/stats`` reports the peak) and block on named gates
that the test opens over HTTP, so the test controls exactly what is in flight.
"""

from __future__ import annotations

import atexit
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import flask

from shedder import Throttler
from shedder.flask import shed_load
from shedder.wsgi import LoadSheddingMiddleware

MAX_CONCURRENCY = 4
MAX_QUEUE = 4
FILE_BODY = b"0123456789" * 10_000

app = flask.Flask(__name__)
heavy = Throttler(max_concurrency=1, max_queue=0, retry_after=2, name="heavy")

_lock = threading.Lock()
_gates: dict[str, threading.Event] = {}
_state: dict[str, Any] = {"active": 0, "peak": 0, "file_results": []}

_fd, FILE_PATH = tempfile.mkstemp(prefix="shedder-wsgi-test-")
os.write(_fd, FILE_BODY)
os.close(_fd)
atexit.register(os.unlink, FILE_PATH)


def _gate(name: str) -> threading.Event:
    with _lock:
        return _gates.setdefault(name, threading.Event())


class _Counted:
    """Counts how many requests are inside the app right now; records the peak."""

    def __enter__(self) -> None:
        with _lock:
            _state["active"] += 1
            _state["peak"] = max(_state["peak"], _state["active"])

    def __exit__(self, *exc: object) -> None:
        with _lock:
            _state["active"] -= 1


@app.get("/slow")
def slow() -> str:
    with _Counted():
        _gate(flask.request.args["gate"]).wait(20)
    return "slow done"


@app.get("/work")
def work() -> str:
    with _Counted():
        time.sleep(float(flask.request.args.get("ms", "50")) / 1000)  # simulated work
    return "work done"


@app.get("/stream")
def stream() -> flask.Response:
    gate = _gate(flask.request.args["gate"])

    def chunks() -> Iterator[bytes]:
        with _Counted():
            yield b"first\n"
            gate.wait(20)
            yield b"last\n"

    return flask.Response(chunks(), mimetype="text/plain")


@app.get("/boom")
def boom() -> str:
    raise RuntimeError("boom")


@app.get("/file")
def file() -> flask.Response:
    return flask.send_file(FILE_PATH, mimetype="application/octet-stream")


@app.get("/heavy")
@shed_load(heavy)
def heavy_view() -> str:
    _gate(flask.request.args["gate"]).wait(20)
    return "heavy done"


@app.get("/open")
def open_gate() -> str:
    _gate(flask.request.args["gate"]).set()
    return "opened"


@app.get("/stats")
def stats() -> dict[str, Any]:
    with _lock:
        return dict(_state)


@app.post("/reset")
def reset() -> str:
    with _lock:
        _state.update(active=0, peak=0, file_results=[])
    return "reset"


app.wsgi_app = LoadSheddingMiddleware(  # type: ignore[method-assign]
    app.wsgi_app,
    max_concurrency=MAX_CONCURRENCY,
    max_queue=MAX_QUEUE,
    queue_timeout=10,
    retry_after=3,
    name="app",
    exempt=["/open", "/stats", "/reset"],
    health_throttlers=[heavy],
)


def _recording(wsgi: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """Records whether gunicorn gets its own file wrapper back (its condition for sendfile)."""

    def application(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        result = wsgi(environ, start_response)
        if environ.get("PATH_INFO") == "/file":
            with _lock:
                _state["file_results"].append(isinstance(result, environ["wsgi.file_wrapper"]))
        return result

    return application


application = _recording(app)
